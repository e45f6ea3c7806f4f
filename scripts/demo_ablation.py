"""CaOPD's confidence-target options on the demo's task, from the demo's own starts (issue 28).

For each seed of a finished ``caopd demo --out RUN_DIR`` run: trains every option below from that
seed's warmed-up ``base`` on the same data and steps as the demo's OPD and CaOPD, and evaluates it
as the demo does (held-out and OOD, the same sampling seed). Rows ``base``, ``OPD`` and the demo's
``CaOPD`` (the default) come from ``RUN_DIR/report.json``; nothing is trained twice.

    python scripts/demo_ablation.py RUN_DIR [--options "paper,forward, P_acc"] [--seeds 0] [--json F] [--md F]

Options are separated by commas and named as in OPTIONS (names may hold ", ": split on "," only
where the next character is not a space).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

from caopd.demo.pipeline import EVAL_SPLITS, METRICS, DemoSettings, evaluate_model, summary_rows, train_config
from caopd.evaluation.tables import format_table
from caopd.inputs.data import load_examples
from caopd.modeling.models import load_tokenizer
from caopd.training.trainer import train

OPTIONS = {  # name: what it changes in the demo's CaOPD (forward KL, confidence prior 8, lr 2e-3, 150 steps)
    "paper": {"divergence": "reverse", "confidence_prior": 0.0},  # the paper's CaOPD: reverse KL, P_acc = correct/K
    "forward, P_acc": {"confidence_prior": 0.0},  # the forward KL alone
    "reverse, prior 8": {"divergence": "reverse"},  # the prior alone
    "reverse + forward on the confidence": {"divergence": "reverse", "confidence_divergence": "forward"},
    "forward, prior 16": {"confidence_prior": 16.0},
    "teacher top 20": {"teacher_top_k": 20},  # a served teacher's top-20 log-probabilities and a tail bucket
}


def run_option(seed_dir: Path, seed: int, settings: DemoSettings, name: str) -> dict:
    data, folder = seed_dir / "data", "ablation-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    run = train(train_config(settings, seed_dir / "base", data / "train.jsonl", seed_dir / folder, True,
                             seed, overwrite=True), progress=f"seed {seed}: {name}")
    tokenizer = load_tokenizer(str(seed_dir / "base"))
    result = {}
    for split in EVAL_SPLITS:
        examples = load_examples(data / f"{split}.jsonl", "science")
        report, breakdown = evaluate_model(run["student"], tokenizer, examples, settings.eval_samples, seed * 7919 + 1,
                                           seed_dir / "completions" / f"{folder}-{split}.jsonl")
        result[split] = {"metrics": dataclasses.asdict(report.metrics), "format_adherence": report.format_adherence,
                         "by_candidates": breakdown}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--seeds", help="only these of the run's seeds, comma-separated")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    report = json.loads((args.run_dir / "report.json").read_text())
    base_settings = DemoSettings(**{k: tuple(tuple(p) for p in v) if k == "model_sizes" else v
                                    for k, v in report["settings"].items()})
    default = f"CaOPD ({base_settings.divergence}, prior {base_settings.confidence_prior:g}: the default)"
    options = re.split(r",(?! )", args.options)
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        parser.error(f"--options: unknown {', '.join(map(repr, unknown))}; the options: {' | '.join(OPTIONS)}")
    names = ["base", "OPD", default, *options]
    per_seed, seconds = [], {}
    if args.seeds:
        report["per_seed"] = [e for e in report["per_seed"] if str(e["seed"]) in args.seeds.split(",")]
    for entry in report["per_seed"]:
        seed = entry["seed"]
        evaluation = entry["evaluation"]
        results = {"base": evaluation["base"], "OPD": evaluation["OPD"], default: evaluation["CaOPD"]}
        for name in options:
            start = time.perf_counter()
            results[name] = run_option(args.run_dir / f"seed-{seed}", seed,
                                       dataclasses.replace(base_settings, **OPTIONS[name]), name)
            seconds.setdefault(name, []).append(time.perf_counter() - start)
        per_seed.append(results)
    table = format_table(["split", "model", *(label for _, label in METRICS)],
                         summary_rows([{"evaluation": results} for results in per_seed], tuple(names)), markdown=True)
    print(table)
    if args.json:
        seeds = [e["seed"] for e in report["per_seed"]]
        args.json.write_text(json.dumps({"device": report["device"], "seeds": seeds, "default": default,
                                         "options": {n: OPTIONS[n] for n in options},
                                         "per_seed": per_seed, "seconds": seconds}, indent=1) + "\n")
    if args.md:
        args.md.write_text(f"# CaOPD confidence-target ablation on the demo's task\n\n{report['device']}; seeds "
                           f"{', '.join(str(e['seed']) for e in report['per_seed'])}; each option trained from the "
                           f"demo's own warmed-up start with its data and steps.\n\n{table}\n")


if __name__ == "__main__":
    main()
