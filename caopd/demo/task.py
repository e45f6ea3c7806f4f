"""The demo's task: name a secret digit from a list of candidates, generated from a seed.

"A secret digit is one of 4, 1, 8. Which is it?" The digit is drawn uniformly from the listed
candidates, so no model can do better than 1/m on a question with m candidates: accuracy varies
from question to question (1.0 down to 0.2 in distribution, m = 1..5), each question shows its
own difficulty, and the calibrated confidence is the model's accuracy at that m (1/m at best).
Out of distribution: 6 to 8 candidates, which the warm-up covers (a pretrained model has seen such
questions) but distillation never shows (calibration there must carry over from other questions).
A teacher shown the drawn digit (the demonstration) is always right: the privileged context that
makes on-policy distillation overconfident, in its plainest form.
Rows are in the ``science`` format (``prompt`` as chat messages, ``answer`` the digit), so the
trainer, verifier (the last ``<answer>`` equals the digit) and evaluation run on them unchanged.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

IN_DISTRIBUTION_CANDIDATES = (1, 2, 3, 4, 5)
OOD_CANDIDATES = (6, 7, 8)
WARMUP_CANDIDATES = IN_DISTRIBUTION_CANDIDATES + OOD_CANDIDATES
SPLITS = ("warmup", "train", "heldout", "ood")


def question(candidates: list[int]) -> str:
    return f"A secret digit is one of {', '.join(map(str, candidates))}. Which is it?"


def candidate_count(question_text: str) -> int:
    return question_text.split(" is one of ", 1)[1].count(",") + 1


def _rows(rng: random.Random, count: int, sizes: tuple[int, ...]) -> list[dict]:
    """``count`` questions, the candidate counts in equal shares (in turn)."""
    rows = []
    for i in range(count):
        m = sizes[i % len(sizes)]
        candidates = rng.sample(range(10), m)
        rows.append({"id": i, "prompt": [{"role": "user", "content": question(candidates)}],
                     "answer": str(rng.choice(candidates)), "candidates": m})
    return rows


def build_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """``warmup`` (the supervised warm-up: 1 to 8 candidates), ``train`` (distilled on) and
    ``heldout`` (1 to 5), ``ood`` (6 to 8), each drawn with its own stream of the seed."""
    counts = {"warmup": WARMUP_CANDIDATES, "ood": OOD_CANDIDATES}
    return {name: _rows(random.Random(f"{seed}-{name}"), sizes[name], counts.get(name, IN_DISTRIBUTION_CANDIDATES))
            for name in SPLITS}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
