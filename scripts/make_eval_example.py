"""Write the example that ``caopd demo`` evaluates (``caopd/examples/``), deterministically.

A generated arithmetic multiple-choice set in the science format (system prompt with
``<answer>`` tags, a question with options A-D, the gold letter) and 4 completions per question
from a *simulated* model: its chance of being right falls with the question's difficulty while
its stated confidence stays high (overconfidence, as OPD produces). A few completions state no
confidence and a few state one outside [0, 1], so the report shows how those are counted.

Run: python scripts/make_eval_example.py [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = ("Given a question and four options, please select the right answer. Respond in the format\n"
          "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\nthen a line 'Confidence: x.xx'.")
LETTERS = "ABCD"


def make_question(rng: random.Random, difficulty: int) -> tuple[str, int]:
    digits = 1 + difficulty
    a, b = rng.randrange(10 ** (digits - 1), 10 ** digits), rng.randrange(2, 10 ** digits)
    op = rng.choice("+-*" if difficulty else "+-")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions", type=int, default=120)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "caopd" / "examples"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, completions = [], []
    for i in range(args.questions):
        difficulty = i % 4
        question, value = make_question(rng, difficulty)
        options = {value}
        while len(options) < 4:
            options.add(value + rng.choice([-1, 1]) * rng.randrange(1, 12))
        options = sorted(options)
        rng.shuffle(options)
        gold = LETTERS[options.index(value)]
        user = question + "\n\n" + "\n".join(f"{L}: {o}" for L, o in zip(LETTERS, options))
        data.append({"id": i, "prompt": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": user}], "answer": gold})
        p_correct = 0.95 - 0.22 * difficulty
        for _ in range(args.samples):
            letter = gold if rng.random() < p_correct else rng.choice([x for x in LETTERS if x != gold])
            text = f"<reasoning>\nI compute {question[8:-1]}.\n</reasoning>\n<answer>\n{letter}\n</answer>"
            roll = rng.random()
            if roll < 0.03:
                pass  # states no confidence
            elif roll < 0.05:
                text += "\nConfidence: 1.2"  # out of range: clipped and counted
            else:
                text += f"\nConfidence: {min(1.0, rng.gauss(0.9, 0.06)):.2f}"
            completions.append({"id": i, "completion": text})
    for name, rows in (("arith_mc.jsonl", data), ("arith_mc_completions.jsonl", completions)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {out / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
