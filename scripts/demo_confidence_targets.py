"""What the teacher asks of the student's confidence in ``caopd demo``, and what the student says.

Two measurements on one seed of a demo run, both exact (every two-decimal value "0.00" ... "1.00"
teacher-forced, no sampling):

1. The frozen teacher's in-context ability: for each value P_acc can take with K = 8 rollouts, the
   teacher's probability of stating exactly the value its context shows (demonstration ending in
   ``Confidence: c`` and the calibration note). CaOPD cannot be better calibrated than the teacher
   copies: a teacher that does not copy a value teaches something else for it.
2. Per candidate count m (held-out questions): the accuracy of each model (from the run's report),
   the mean of the teacher's targets over P_acc ~ Binomial(K, accuracy)/K (what a student that
   matched the teacher on every draw would state on average), and each model's mean stated
   confidence and probability of stating a well-formed value at all.

    python scripts/demo_confidence_targets.py RUN_DIR [--seed 0] [--questions 12] [--json out.json]

RUN_DIR is the ``--out`` folder of ``caopd demo`` (``report.json`` and ``seed-N/`` with ``base``,
``OPD/final``, ``CaOPD/final`` and ``data/heldout.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from caopd.demo.task import candidate_count
from caopd.inputs.data import load_examples
from caopd.inputs.prompts import demonstration, student_messages, teacher_messages
from caopd.scoring.confidence import format_confidence
from caopd.training.loss import chat_ids

K = 8
VALUES = [v / 100 for v in range(101)]


def value_distribution(model, tokenizer, context: list[int], body: str) -> torch.Tensor:
    """P(the completion ends in ``Confidence: v``) for every v in VALUES, given context + body."""
    body_ids = tokenizer(body, add_special_tokens=False).input_ids
    head = body_ids + tokenizer("\nConfidence:", add_special_tokens=False).input_ids
    # the line is tokenized whole, as caopd.training.loss.completion_ids does; the value's tokens follow `head`
    lines = [body_ids + tokenizer("\n" + format_confidence(v), add_special_tokens=False).input_ids for v in VALUES]
    start = len(context) + len(head)
    width = max(map(len, lines))
    ids = torch.tensor([context + line + [tokenizer.pad_token_id] * (width - len(line)) for line in lines])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), -1)
    total = torch.zeros(len(VALUES))
    for row, line in enumerate(lines):
        positions = torch.arange(start, len(context) + len(line))
        total[row] = logprobs[row, positions - 1, ids[row, positions]].sum()
    return total.exp()


def teacher_copy_rates(teacher, tokenizer, examples) -> dict[str, float]:
    rates = {}
    for k in range(K + 1):
        shown = k / K
        index = VALUES.index(float(format_confidence(shown).split()[-1]))
        probs = [value_distribution(teacher, tokenizer, chat_ids(tokenizer, teacher_messages(e, demo, "demo", shown)),
                                    demo)[index].item()
                 for e in examples for demo in [demonstration(e, "science")]]
        rates[f"{shown:.2f}"] = sum(probs) / len(probs)
    return rates


def per_difficulty(models: dict, tokenizer, examples, accuracy: dict[str, dict[int, float]]) -> dict:
    """Per m: accuracy, mean teacher target, and each model's mean stated confidence / P(well-formed)."""
    values = torch.tensor(VALUES)
    rows = {}
    for m in sorted({candidate_count(e.prompt[-1]["content"]) for e in examples}):
        questions = [e for e in examples if candidate_count(e.prompt[-1]["content"]) == m]
        acc = accuracy["CaOPD"][m]
        draws = [math.comb(K, k) * acc ** k * (1 - acc) ** (K - k) for k in range(K + 1)]
        row = {"accuracy": {name: accuracy[name][m] for name in models}, "teacher_target": 0.0,
               "stated": {}, "well_formed": {}}
        for e in questions:
            demo = demonstration(e, "science")
            for k, weight in enumerate(draws):
                p = value_distribution(models["base"], tokenizer,
                                       chat_ids(tokenizer, teacher_messages(e, demo, "demo", k / K)), demo)
                row["teacher_target"] += weight * (p @ values / p.sum()).item() / len(questions)
            for name, model in models.items():
                p = value_distribution(model, tokenizer, chat_ids(tokenizer, student_messages(e)), demo)
                row["stated"][name] = row["stated"].get(name, 0.0) + (p @ values / p.sum()).item() / len(questions)
                row["well_formed"][name] = row["well_formed"].get(name, 0.0) + p.sum().item() / len(questions)
        rows[m] = row
    return rows


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions", type=int, default=12, help="held-out questions per candidate count")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    seed_dir = args.run_dir / f"seed-{args.seed}"
    if not (args.run_dir / "report.json").is_file() or not (seed_dir / "CaOPD" / "final").is_dir():
        parser.error(f"{args.run_dir}: no report.json or seed-{args.seed}/CaOPD/final; pass the --out folder "
                     "of a finished caopd demo run")
    report = json.loads((args.run_dir / "report.json").read_text())
    evaluation = next(s for s in report["per_seed"] if s["seed"] == args.seed)["evaluation"]
    accuracy = {name: {int(m): row["accuracy"] for m, row in evaluation[name]["heldout"]["by_candidates"].items()}
                for name in evaluation}
    tokenizer = AutoTokenizer.from_pretrained(seed_dir / "base")
    models = {name: AutoModelForCausalLM.from_pretrained(seed_dir / path).eval()
              for name, path in (("base", "base"), ("OPD", "OPD/final"), ("CaOPD", "CaOPD/final"))}
    examples = load_examples(seed_dir / "data" / "heldout.jsonl", "science")
    chosen = [e for m in range(1, 6) for e in
              [x for x in examples if candidate_count(x.prompt[-1]["content"]) == m][:args.questions]]

    copy = teacher_copy_rates(models["base"], tokenizer, chosen[::5])
    print("teacher's P(states exactly the shown value):",
          "  ".join(f"{value} {rate:.3f}" for value, rate in copy.items()))
    rows = per_difficulty(models, tokenizer, chosen, accuracy)
    print(f"{'m':>2} | {'acc CaOPD':>9} {'teacher target':>14} | stated (P well-formed): "
          + "  ".join(f"{name:>14}" for name in models))
    for m, row in rows.items():
        cells = "  ".join(f"{row['stated'][name]:.3f} ({row['well_formed'][name]:.2f})" for name in models)
        print(f"{m:>2} | {row['accuracy']['CaOPD']:>9.3f} {row['teacher_target']:>14.3f} | {cells}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "teacher_copy": copy, "per_candidates": rows}, indent=2))


if __name__ == "__main__":
    main()
