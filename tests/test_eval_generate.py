"""`caopd eval --model` (issues 17, 26): generate with a rollout engine, then score; resume; compare runs;
the data location rules; a resumed eval is the eval that was asked for (settings recorded beside the
completions), its rows checked, its generation values one line each.

Deliberate bugs these catch: a resumed run generating questions again (or dropping a half-written
one), seeds that follow the batch instead of the question (resume would change the samples), the
engines disagreeing on greedy decoding, a default data path into ../shared.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from caopd.cli import main
from caopd.engines.hf import TransformersEngine
from caopd.engines.vllm_engine import vllm_available
from caopd.errors import InputError
from caopd.evaluation.benchmark_eval import GenerationSettings, default_data, done_ids, generate_and_score
from caopd.inputs.data import load_examples
from caopd.modeling.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny model saved as a folder, as `caopd train` leaves final/."""
    folder = tmp_path_factory.mktemp("model") / "final"
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    load_model("tiny-qwen3", tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class CountingEngine(TransformersEngine):
    def __init__(self, *args):
        super().__init__(*args)
        self.prompts = 0

    def generate(self, prompts, n, sampling):
        self.prompts += len(prompts)
        return super().generate(prompts, n, sampling)


def test_an_interrupted_generation_resumes_with_the_same_samples(saved_tiny, science_rows_path, tmp_path):
    tokenizer = load_tokenizer(str(saved_tiny))
    model = load_model(str(saved_tiny), tokenizer)
    examples = load_examples(science_rows_path, "science")[:6]
    settings = GenerationSettings(samples=2, temperature=1.0, max_tokens=8, seed=3, batch_size=4)
    whole = tmp_path / "whole.jsonl"
    report, _ = generate_and_score(CountingEngine(model, tokenizer), tokenizer, examples, "science", settings, whole,
                                   progress=None)
    assert report.n_completions == 12
    rows = whole.read_text().splitlines()
    partial = tmp_path / "partial.jsonl"  # questions 1 and 3 done, half of the 4th (a gap: the 2nd is missing)
    partial.write_text("\n".join(rows[0:2] + rows[4:6] + rows[6:7]) + "\n")
    assert done_ids(partial, 2) == {examples[0].id, examples[2].id}
    engine = CountingEngine(model, tokenizer)
    generate_and_score(engine, tokenizer, examples, "science", settings, partial, progress=None)
    assert engine.prompts == 4  # the 2nd, the 4th again, the 5th and 6th; not the 1st or 3rd
    assert sorted(partial.read_text().splitlines()) == sorted(rows)  # the same samples: seeded by question


def test_eval_model_on_both_engines_gives_the_same_greedy_metrics(saved_tiny, science_rows_path, tmp_path, capsys):
    engines = ["transformers", "vllm"] if vllm_available() else ["transformers"]
    metrics = {}
    for engine in engines:
        out = tmp_path / f"{engine}.json"
        assert main(["eval", "--model", str(saved_tiny), "--dataset", "science", "--data", str(science_rows_path),
                     "--limit", "4", "--max-tokens", "12", "--engine", engine, "--output", str(out),
                     "--missing-confidence", "zero"]) == 0  # a tiny model states no confidence
        metrics[engine] = json.loads(out.read_text())
        assert metrics[engine]["n_completions"] == 4 and metrics[engine]["generation"]["temperature"] == 0.0
        assert Path(metrics[engine]["completions"]).exists()
    if len(engines) == 2:
        texts = [Path(metrics[e]["completions"]).read_text() for e in engines]
        assert texts[0] == texts[1]
        assert metrics["vllm"]["metrics"] == metrics["transformers"]["metrics"]
    capsys.readouterr()
    runs = [str(tmp_path / f"{e}.json") for e in engines]
    assert main(["eval", "--compare", *runs, runs[0], "--plot", str(tmp_path / "cmp.png"),
                 "--output", str(tmp_path / "cmp.json")]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "ECE" in table and "OCG" in table and "AUROC" in table
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert main(["eval", "--compare", str(science_rows_path)]) == 2
    assert "not a caopd eval metrics file" in capsys.readouterr().err


def test_k_samples_report_the_spread_and_the_p_acc_view(saved_tiny, science_rows_path, tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["eval", "--model", str(saved_tiny), "--dataset", "science", "--data", str(science_rows_path),
                 "--limit", "3", "--samples", "3", "--temperature", "1", "--max-tokens", "6", "--engine",
                 "transformers", "--output", str(out), "--missing-confidence", "zero"]) == 0
    view = json.loads(out.read_text())["samples_view"]
    assert view["questions"] == 3 and 0 <= view["accuracy_stdev"] <= 0.5
    assert view["all_right"] + view["all_wrong"] <= 3


def test_the_p_acc_view_by_hand():
    from caopd.evaluation.benchmark_eval import sample_mean_view
    from caopd.evaluation.evaluate import ScoredCompletion

    # question 1: 2 of 4 right, stated 0.9 each; question 2: 0 of 4, stated 0.1, 0.1, 0.3, none
    scored = [ScoredCompletion(1, c, 0.9, False) for c in (True, True, False, False)]
    scored += [ScoredCompletion(2, False, c, False) for c in (0.1, 0.1, 0.3, None)]
    view = sample_mean_view(scored)
    assert view["accuracy_mean"] == pytest.approx(0.25) and view["accuracy_stdev"] == pytest.approx(0.25)
    assert (view["all_right"], view["all_wrong"]) == (0, 1)
    assert view["mean_abs_stated_minus_p_acc"] == pytest.approx(((0.9 - 0.5) + (0.125 - 0.0)) / 2)
    assert view["mean_stated_ece"] == pytest.approx((4 * 0.4 + 4 * 0.125) / 8)  # two bins, 4 samples each


def test_data_comes_from_data_or_caopd_data_dir(tmp_path, monkeypatch, science_rows_path):
    monkeypatch.delenv("CAOPD_DATA_DIR", raising=False)
    with pytest.raises(InputError, match="--data is needed: the evaluation sets are the CaOPD paper's .*CC BY-NC"):
        default_data("science")
    monkeypatch.setenv("CAOPD_DATA_DIR", str(tmp_path))
    with pytest.raises(InputError, match="no JSONL file or saved dataset there"):
        default_data("science")
    (tmp_path / "science").mkdir()
    (tmp_path / "science" / "eval.jsonl").write_text(science_rows_path.read_text())
    assert default_data("science") == tmp_path / "science" / "eval.jsonl"


def test_the_product_never_points_into_shared():
    pattern = re.compile(r"shared/data|\.\./shared")
    offenders = [str(p.relative_to(ROOT)) for folder in ("caopd", "kernels") for p in (ROOT / folder).rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_eval_a_random_architecture_from_its_config(science_rows_path, tmp_path):
    config = {"model_type": "qwen3", "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m.json"
    assert main(["eval", "--model", f"random:{tmp_path / 'config.json'}", "--tokenizer", "fast", "--dataset",
                 "science", "--data", str(science_rows_path), "--limit", "2", "--max-tokens", "4", "--output",
                 str(out), "--missing-confidence", "zero"]) == 0
    assert json.loads(out.read_text())["n_completions"] == 2


def eval_model(saved_tiny, science_rows_path, out: Path, *extra: str) -> int:
    return main(["eval", "--model", str(saved_tiny), "--dataset", "science", "--data", str(science_rows_path),
                 "--limit", "2", "--max-tokens", "6", "--engine", "transformers", "--missing-confidence", "zero",
                 "--save-completions", str(out), *extra])


def test_a_rerun_with_other_settings_is_refused(saved_tiny, science_rows_path, tmp_path, capsys):
    """Issue 26 item 2: a rerun scored the old completions under the new settings."""
    out = tmp_path / "c.jsonl"
    assert eval_model(saved_tiny, science_rows_path, out) == 0
    first = out.read_text()
    assert json.loads((tmp_path / "c.jsonl.settings.json").read_text())["max_tokens"] == 6
    capsys.readouterr()
    assert eval_model(saved_tiny, science_rows_path, out, "--max-tokens", "8", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "max_tokens: 6 -> 8" in err and "seed: 0 -> 1" in err and "--overwrite" in err and "\n" not in err.strip()
    assert eval_model(saved_tiny, science_rows_path, out, "--samples", "2", "--temperature", "1") == 2
    assert "samples: 1 -> 2; temperature: 0.0 -> 1.0" in capsys.readouterr().err
    assert out.read_text() == first  # nothing dropped
    assert eval_model(saved_tiny, science_rows_path, out) == 0 and out.read_text() == first  # same: resumes
    assert eval_model(saved_tiny, science_rows_path, out, "--samples", "2", "--temperature", "1", "--overwrite") == 0
    assert len(out.read_text().splitlines()) == 4
    (tmp_path / "c.jsonl.settings.json").unlink()  # completions from elsewhere: nothing says how they were made
    assert eval_model(saved_tiny, science_rows_path, out, "--samples", "2", "--temperature", "1") == 2
    assert "no record of how they were generated" in capsys.readouterr().err


@pytest.mark.parametrize("rows, message", [
    ([{"id": 0, "completion": "x"}, {"completion": "y"}], "c.jsonl:2: missing field 'id'"),
    ([{"id": 0, "completion": 5}], "c.jsonl:1: field 'completion' must be str, got int"),
    ([{"id": [0], "completion": "x"}], "c.jsonl:1: field 'id' must be int, got list"),
    ([{"id": True, "completion": "x"}, {"id": 5.0, "completion": "x"}],
     "c.jsonl:1: field 'id' must be int, got bool (1 more such rows refused)"),
    ([{"id": 0, "completion": "x"}, {"id": 0, "completion": "x"}],
     "1 question(s) have more rows than --samples 1 (a duplicated id; first: id 0 at"),
])
def test_completions_file_rows_are_checked(saved_tiny, science_rows_path, tmp_path, capsys, rows, message):
    """Issue 26 item 3: these rows gave tracebacks, or were scored as other questions or twice."""
    from tests.conftest import write_jsonl

    out = tmp_path / "c.jsonl"
    assert eval_model(saved_tiny, science_rows_path, out) == 0  # the settings record
    write_jsonl(out, rows)
    capsys.readouterr()
    assert eval_model(saved_tiny, science_rows_path, out) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_cut_last_line_is_dropped_and_generated_again(saved_tiny, science_rows_path, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert eval_model(saved_tiny, science_rows_path, out) == 0
    whole = out.read_text()
    lines = whole.splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:10])  # killed mid-write (or a full disk)
    capsys.readouterr()
    assert eval_model(saved_tiny, science_rows_path, out) == 0
    assert capsys.readouterr().err.count("c.jsonl:2: a last line cut off mid-write") == 1  # read once, said once
    assert out.read_text() == whole  # the question generated again, the same greedy completion


def test_no_scored_completions_is_an_error(saved_tiny, science_rows_path, tmp_path, capsys):
    """Issue 26 item 3: ECE 0, Brier 0, AUROC 0.5 over nothing read as perfect."""
    assert main(["eval", "--model", str(saved_tiny), "--dataset", "science", "--data", str(science_rows_path),
                 "--limit", "2", "--max-tokens", "6", "--engine", "transformers",
                 "--save-completions", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "no scored completions (2 completions, 2 stating no confidence" in err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**31)"),
    (["--samples", "2"], "--samples 2 with --temperature 0 (greedy)"),
])
def test_generation_values_are_one_line(saved_tiny, science_rows_path, tmp_path, capsys, flags, message):
    """Issue 26 item 8: these ran greedy silently, were recorded as given, or gave tracebacks."""
    assert eval_model(saved_tiny, science_rows_path, tmp_path / "c.jsonl", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "c.jsonl").exists()


def test_data_that_is_not_a_regular_file_is_one_line(tmp_path, monkeypatch, science_rows_path, capsys):
    """Issue 26: CAOPD_DATA_DIR at a FIFO (a read would block) or /dev/zero (it would never end)."""
    import os

    (tmp_path / "science").mkdir()
    os.mkfifo(tmp_path / "science" / "eval.jsonl")
    monkeypatch.setenv("CAOPD_DATA_DIR", str(tmp_path))
    with pytest.raises(InputError, match="no JSONL file or saved dataset there"):
        default_data("science")
    monkeypatch.setenv("CAOPD_DATA_DIR", "/dev/zero")
    with pytest.raises(InputError, match="^/dev/zero/science: no JSONL file or saved dataset there"):
        default_data("science")
    for data in (tmp_path / "science" / "eval.jsonl", Path("/dev/zero")):
        assert main(["eval", "--input", str(science_rows_path), "--dataset", "science", "--data", str(data)]) == 2
        assert f"{data}: not a regular file or a folder" in capsys.readouterr().err


def test_eval_of_an_adapters_only_folder_is_one_line(tmp_path, science_rows_path, capsys):
    """Issue 26: `caopd eval --model` on a LoRA run's final/ (adapters only)."""
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-qwen3"}))
    args = ["eval", "--model", str(final), "--dataset", "science", "--data", str(science_rows_path),
            "--save-completions", str(tmp_path / "c.jsonl")]
    assert main(args) == 2
    assert "LoRA adapters only (adapter_config.json)" in capsys.readouterr().err
    (final / "merged").mkdir()
    (final / "merged" / "config.json").write_text("{}")
    assert main(args) == 2
    assert f"evaluate {final / 'merged'}, the merged weights" in capsys.readouterr().err
