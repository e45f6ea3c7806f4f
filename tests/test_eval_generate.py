"""`caopd eval --model` (issue 17): generate with a rollout engine, then score; resume; compare runs;
the data location rules.

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
                     "--limit", "4", "--max-tokens", "12", "--engine", engine, "--output", str(out)]) == 0
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
                 "transformers", "--output", str(out)]) == 0
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
                 str(out)]) == 0
    assert json.loads(out.read_text())["n_completions"] == 2
