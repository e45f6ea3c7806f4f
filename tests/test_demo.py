"""The demo: its generated task, the supervised warm-up, and ``caopd demo --quick`` end to end."""
from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from caopd.cli import main
from caopd.demo.task import IN_DISTRIBUTION_CANDIDATES, OOD_CANDIDATES, WARMUP_CANDIDATES, build_splits, write_jsonl
from caopd.demo.warmup import padded, supervised_warmup, two_widths, warmup_sequences
from caopd.inputs.data import load_examples
from caopd.modeling.models import fast_tokenizer, load_model
from caopd.scoring.confidence import parse_confidence
from caopd.scoring.verifiers import verify_science

SIZES = {"warmup": 50, "train": 40, "heldout": 30, "ood": 21}


def candidates_of(row) -> list[str]:
    return re.search(r"one of ([\d, ]+)\.", row["prompt"][0]["content"]).group(1).split(", ")


def test_splits_are_seeded_graded_and_answerable():
    splits = build_splits(3, SIZES)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    assert splits == build_splits(3, SIZES) and splits != build_splits(4, SIZES)
    for name, rows in splits.items():
        allowed = {"ood": OOD_CANDIDATES, "warmup": WARMUP_CANDIDATES}.get(name, IN_DISTRIBUTION_CANDIDATES)
        assert {r["candidates"] for r in rows} == set(allowed)
        for row in rows:
            options = candidates_of(row)
            assert len(options) == row["candidates"] == len(set(options)) and row["answer"] in options


def test_splits_load_as_science_rows_and_the_gold_verifies(tmp_path):
    path = write_jsonl(build_splits(0, SIZES)["heldout"], tmp_path / "heldout.jsonl")
    examples = load_examples(path, "science")
    assert len(examples) == SIZES["heldout"]
    assert all(verify_science(f"<answer>\n{e.gold}\n</answer>\nConfidence: 0.5", e.gold) for e in examples)


def test_warmup_sequences_teach_the_format_and_following_the_teacher_context(tmp_path):
    examples = load_examples(write_jsonl(build_splits(0, SIZES)["warmup"], tmp_path / "w.jsonl"), "science")
    tokenizer = fast_tokenizer()
    sequences = warmup_sequences(examples, "science", tokenizer, random.Random(0), lambda e, rng: 0.75,
                                 teacher_share=0.5)
    assert len(sequences) == len(examples)
    teacher = student = 0
    for (prompt, reply), example in zip(sequences, examples):
        context, answer = tokenizer.decode(prompt), tokenizer.decode(reply, skip_special_tokens=True)
        assert reply[-1] == tokenizer.eos_token_id and verify_science(answer, example.gold)
        stated = parse_confidence(answer).value
        if "This is an example for a response" in context:  # teacher context: repeat its confidence
            teacher += 1
            assert f"Confidence: {stated:.2f}" in context
        else:
            student += 1
            assert stated == 0.75 and "Confidence: 0" not in context and "Confidence: 1" not in context
    assert teacher > 10 and student > 10


def test_supervised_warmup_lowers_the_loss():
    tokenizer = fast_tokenizer()
    model = load_model("tiny-qwen3", tokenizer, seed=0, layers=1)
    sequences = [(tokenizer("<|im_start|>user\nWhich?").input_ids, tokenizer("<answer>7</answer>").input_ids)] * 4
    losses = supervised_warmup(model, sequences, steps=30, batch_size=4, learning_rate=3e-3, seed=0,
                               pad_id=tokenizer.pad_token_id)
    assert len(losses) == 30 and losses[-1] < 0.3 * losses[0]


def test_the_warmup_splits_a_batch_in_two_widths_without_changing_its_loss():
    assert two_widths([70, 72, 75, 160, 170, 174]) == 3  # student prompts | teacher contexts
    assert two_widths([100, 101, 102, 103]) == 4  # nothing to gain: one batch
    tokenizer = fast_tokenizer()
    short, long = tokenizer("<answer>7</answer>").input_ids, tokenizer("<answer>12345</answer> and more").input_ids
    question = tokenizer("A much longer question " * 8).input_ids
    sequences = [(tokenizer("Q?").input_ids, short)] * 3 + [(question, long)] * 3
    lengths = sorted(len(p) + len(r) for p, r in sequences)
    assert two_widths(lengths) == 3
    grads = []
    for split in (True, False):
        model = load_model("tiny-qwen3", tokenizer, seed=0, layers=1)
        if not split:  # one padded batch of all six: the plain mean over response tokens
            model.train()
            ids, labels, attention = padded(sequences, tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=attention).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the warm-up clips
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            continue
        def keep_grads(step: int, loss: float, model=model) -> None:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})

        supervised_warmup(model, sequences, steps=1, batch_size=6, learning_rate=1e-30, seed=0,
                          pad_id=tokenizer.pad_token_id, on_step=keep_grads)
    for name, grad in grads[1].items():
        assert torch.allclose(grads[0][name], grad, atol=1e-6), name


def test_tokenizer_splits_digits_so_every_confidence_value_is_digit_tokens():
    tokenizer = fast_tokenizer(["Confidence: 0.62 and 0.50, the empirical confidence is 0.62."] * 50)
    for value in ("0.62", "0.50", "0.00", "1.00"):
        ids = tokenizer("Confidence: " + value, add_special_tokens=False).input_ids
        assert [tokenizer.decode([i]) for i in ids][-4:] == list(value)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, dict, str]:
    """``caopd demo --quick`` with one seed (a second seed only repeats it: the several-seed report is
    tested below with the seed's work replaced)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("quick_demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--seeds", "1", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text()), printed.getvalue()


def test_quick_demo_writes_a_complete_report(quick_demo):
    tmp_path, report, printed = quick_demo
    assert report["quick"] and report["seeds"] == [0] and len(report["per_seed"]) == 1
    result = report["per_seed"][0]
    for split in ("heldout", "ood"):  # the paper's direction, even in 8 quick steps: OPD states more
        opd, caopd = (result["evaluation"][m][split]["metrics"] for m in ("OPD", "CaOPD"))
        assert opd["mean_confidence"] > caopd["mean_confidence"] and opd["ocg"] > caopd["ocg"], split
    for model in ("base", "OPD", "CaOPD"):
        for split in ("heldout", "ood"):
            metrics = result["evaluation"][model][split]["metrics"]
            examples = report["settings"]["heldout_examples" if split == "heldout" else "ood_examples"]
            assert metrics["n"] == examples * report["settings"]["eval_samples"]  # missing confidence counts 0
            for key in ("accuracy", "ece", "brier", "spr", "ocg", "mean_confidence"):
                assert math.isfinite(metrics[key]), (model, split, key)
    steps = report["settings"]["train_steps"]
    assert [p["step"] for p in result["trajectory"]["OPD"]] == list(range(1, steps + 1))
    assert set(result["targets_heldout"]) >= {"OPD OCG >= 0.20", "CaOPD ECE <= 0.08"}
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    table = (tmp_path / "report.md").read_text()
    assert "| heldout | CaOPD |" in table and " ± " not in table  # one seed: no spread
    assert "report.json" in printed
    rescored = tmp_path / "rescored.json"  # the saved completions are caopd eval's input
    assert main(["eval", "--dataset", "science", "--data", str(tmp_path / "seed-0" / "data" / "heldout.jsonl"),
                 "--input", str(tmp_path / "seed-0" / "completions" / "CaOPD-heldout.jsonl"),
                 "--missing-confidence", "zero", "--output", str(rescored)]) == 0
    assert json.loads(rescored.read_text())["metrics"]["ece"] == pytest.approx(
        result["evaluation"]["CaOPD"]["heldout"]["metrics"]["ece"])
    check_confidence_targets_script(tmp_path)
    check_ablation_script(tmp_path, report)


def test_several_seeds_report_each_metrics_mean_and_spread(quick_demo, tmp_path, monkeypatch):
    """``--seeds 2``: the seeds run in order, the table holds each metric's mean ± standard deviation over
    them, the figure is written. Each seed's work is the quick demo's seed 0 with its
    held-out ECE set to a known value (0.1 and 0.3: mean 0.200, spread 0.141)."""
    import copy

    from caopd.demo import pipeline

    seed_result = quick_demo[1]["per_seed"][0]
    ran = []

    def fake_run_seed(seed, settings, out, overwrite=False):
        ran.append((seed, out.name))
        result = copy.deepcopy({k: v for k, v in seed_result.items() if k not in ("seconds", "targets_heldout")})
        result["seed"] = seed
        result["evaluation"]["CaOPD"]["heldout"]["metrics"]["ece"] = 0.1 if seed == 0 else 0.3
        return result

    monkeypatch.setattr(pipeline, "run_seed", fake_run_seed)
    report = pipeline.run_demo(tmp_path, seeds=2, quick=True)
    assert ran == [(0, "seed-0"), (1, "seed-1")] and report["seeds"] == [0, 1]
    (row,) = [line for line in (tmp_path / "report.md").read_text().splitlines()
              if line.startswith("| heldout | CaOPD ")]
    assert "| 0.200 ± 0.141 |" in row  # ECE: the mean and the sample standard deviation of 0.1 and 0.3
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def check_ablation_script(run_dir, report):
    """scripts/demo_ablation.py on the quick run, one option on seed 0: the demo's rows are taken from
    its report, the option is trained from the seed's base with its setting changed (the paper's rule
    states other confidences than the default) and evaluated like the demo."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "demo_ablation.py"
    done = subprocess.run([sys.executable, str(script), str(run_dir), "--options", "paper", "--seeds", "0",
                           "--json", str(run_dir / "ablation.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ablation = json.loads((run_dir / "ablation.json").read_text())
    (seed,) = ablation["per_seed"]
    demo = report["per_seed"][0]["evaluation"]
    assert seed["OPD"] == demo["OPD"] and seed[ablation["default"]] == demo["CaOPD"]
    paper = seed["paper"]["heldout"]["metrics"]
    assert paper["n"] == demo["CaOPD"]["heldout"]["metrics"]["n"]
    assert paper["mean_confidence"] != demo["CaOPD"]["heldout"]["metrics"]["mean_confidence"]
    config = (run_dir / "seed-0" / "ablation-paper" / "config.yaml").read_text()
    assert "confidence_prior: 0.0" in config and "divergence: reverse" in config


def check_confidence_targets_script(run_dir):
    """scripts/demo_confidence_targets.py on the quick run: exact value probabilities agree with the
    model's own sequence loss, and the report it writes is complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caopd.inputs.prompts import demonstration, teacher_messages
    from caopd.training.loss import chat_ids

    path = Path(__file__).resolve().parents[1] / "scripts" / "demo_confidence_targets.py"
    spec = importlib.util.spec_from_file_location("demo_confidence_targets", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seed_dir = run_dir / "seed-0"
    tokenizer = AutoTokenizer.from_pretrained(seed_dir / "base")
    teacher = AutoModelForCausalLM.from_pretrained(seed_dir / "base").eval()
    example = load_examples(seed_dir / "data" / "heldout.jsonl", "science")[0]
    demo = demonstration(example, "science")
    context = chat_ids(tokenizer, teacher_messages(example, demo, "demo", 0.25))
    probs = script.value_distribution(teacher, tokenizer, context, demo)
    assert probs.shape == (101,) and 0 < probs.sum() <= 1
    head = tokenizer(demo, add_special_tokens=False).input_ids + \
        tokenizer("\nConfidence:", add_special_tokens=False).input_ids
    line = tokenizer(demo, add_special_tokens=False).input_ids + \
        tokenizer("\nConfidence: 0.25", add_special_tokens=False).input_ids
    ids = torch.tensor([context + line])
    labels = ids.clone()
    labels[0, :len(context) + len(head)] = -100
    with torch.no_grad():
        mean_nll = teacher(ids, labels=labels).loss.item()
    assert probs[25].item() == pytest.approx(math.exp(-mean_nll * (len(line) - len(head))), rel=1e-4)
    out = run_dir / "targets.json"
    argv = ["demo_confidence_targets.py", str(run_dir), "--questions", "1", "--json", str(out)]
    old_argv, sys.argv = sys.argv, argv
    try:
        script.main()
    finally:
        sys.argv = old_argv
    written = json.loads(out.read_text())
    assert len(written["teacher_copy"]) == 9 and all(0 <= p <= 1 for p in written["teacher_copy"].values())
    assert sorted(written["per_candidates"]) == ["1", "2", "3", "4", "5"]
    for row in written["per_candidates"].values():
        assert 0 <= row["teacher_target"] <= 1
        assert set(row["stated"]) == {"base", "OPD", "CaOPD"}
        assert all(0 < p <= 1 + 1e-6 for p in row["well_formed"].values())


def test_demo_rejects_zero_seeds(capsys):
    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_demo_refuses_an_earlier_demo_before_any_work(tmp_path, capsys):
    (tmp_path / "seed-0" / "CaOPD").mkdir(parents=True)
    (tmp_path / "seed-0" / "CaOPD" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an earlier demo's runs" in err and "--overwrite" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed-0"]  # no data, no warm-up written
