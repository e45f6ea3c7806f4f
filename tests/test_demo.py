"""The demo: its generated task, the supervised warm-up, and ``caopd demo --quick`` end to end."""
from __future__ import annotations

import json
import math
import random
import re

import pytest

from caopd.cli import main
from caopd.confidence import parse_confidence
from caopd.data import load_examples
from caopd.demo_task import IN_DISTRIBUTION_CANDIDATES, OOD_CANDIDATES, WARMUP_CANDIDATES, build_splits, write_jsonl
from caopd.models import fast_tokenizer, load_model
from caopd.verifiers import verify_science
from caopd.warmup import supervised_warmup, warmup_sequences

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


def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quick"] and report["seeds"] == [0] and len(report["per_seed"]) == 1
    result = report["per_seed"][0]
    for model in ("base", "OPD", "CaOPD"):
        for split in ("heldout", "ood"):
            metrics = result["evaluation"][model][split]["metrics"]
            assert metrics["n"] > 0
            for key in ("accuracy", "ece", "brier", "spr", "ocg", "mean_confidence"):
                assert math.isfinite(metrics[key]), (model, split, key)
    steps = report["settings"]["train_steps"]
    assert [p["step"] for p in result["trajectory"]["OPD"]] == list(range(1, steps + 1))
    assert set(result["targets_heldout"]) >= {"OPD OCG >= 0.20", "CaOPD ECE <= 0.08"}
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "| heldout | CaOPD |" in (tmp_path / "report.md").read_text()
    assert "report.json" in capsys.readouterr().out
    rescored = tmp_path / "rescored.json"  # the saved completions are caopd eval's input
    assert main(["eval", "--dataset", "science", "--data", str(tmp_path / "seed-0" / "data" / "heldout.jsonl"),
                 "--input", str(tmp_path / "seed-0" / "completions" / "CaOPD-heldout.jsonl"),
                 "--missing-confidence", "zero", "--output", str(rescored)]) == 0
    assert json.loads(rescored.read_text())["metrics"]["ece"] == pytest.approx(
        result["evaluation"]["CaOPD"]["heldout"]["metrics"]["ece"])


def test_demo_rejects_zero_seeds(capsys):
    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
