"""`caopd memory`'s estimate against the measured peak of one real training step on this CPU.

Each setting runs in a fresh process: a minimal warm-up run (tiny-qwen3, one prompt, one 4-token
completion) loads every module and thread pool the trainer uses, then the measured run — one step
through the real trainer (rollouts, verify, loss, backward, Adam, EMA; no checkpoint) — under
PeakRSS, the kernel benchmark's sampler
of this process's resident memory. The estimate is `caopd.modeling.memory.estimate(device="cpu")` with the
step's own prompt and completion lengths (the longest of the step's prompts, the completion cap).

    python -m benchmarks.memory_check          # tiny and random:Qwen3-0.6B (about 5 minutes, 16 GB)
Writes benchmarks/results/memory_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_SCIENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "caopd" / "science_eval.jsonl"
SETTINGS = {
    "tiny-qwen3 (--config tiny)": ["--max-steps", "2"],
    "random:Qwen3-0.6B, K = 2": ["--model", "random:Qwen3-0.6B", "--tokenizer", "qwen3", "--dataset", "science",
                                 "--data", str(SHARED_SCIENCE), "--num-generations", "2", "--prompts-per-step", "1",
                                 "--micro-batch-prompts", "1", "--max-completion-length", "16",
                                 "--max-prompt-length", "512", "--max-steps", "2"],
}


def worker(setting: str) -> dict:
    from benchmarks.kernel_kl import PeakRSS, rss_bytes
    from caopd.config import load_config
    from caopd.modeling.memory import Plan, estimate
    from caopd.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        train(load_config("tiny", ["--output-dir", f"{tmp}/warm", "--max-steps", "2", "--num-generations", "1",
                                   "--prompts-per-step", "1", "--micro-batch-prompts", "1", "--max-completion-length",
                                   "4", "--max-prompt-length", "16"]), stop_after_steps=1, quiet=True)
        config = load_config("tiny", [*SETTINGS[setting], "--output-dir", f"{tmp}/run"])
        before = rss_bytes()
        with PeakRSS() as peak:
            result = train(config, stop_after_steps=1, quiet=True)
    measured = peak.peak - before
    (row,) = result["history"]
    from caopd.inputs.data import load_examples
    from caopd.inputs.prompts import student_messages
    from caopd.training.loss import chat_ids

    examples = load_examples(config.data_path(), config.dataset, config.split)
    prompt = max(len(chat_ids(result["tokenizer"], student_messages(examples[i]), config.chat_template_kwargs)
                     [-config.max_prompt_length:]) for i in row["prompts"])
    plan = Plan(config.model.removeprefix("random:"), prompt_tokens=prompt,
                completion_tokens=config.max_completion_length, num_generations=config.num_generations,
                prompts_per_step=config.prompts_per_step, micro_batch_prompts=config.micro_batch_prompts,
                shared_prefix=config.shared_prefix, device="cpu")
    estimated = estimate(plan)
    return {"setting": setting, "measured_gib": measured / 2**30, "estimated_gib": estimated.peak / 2**30,
            "ratio": estimated.peak / measured, "prompt_tokens": prompt,
            "rows": [(name, b / 2**30) for name, b in estimated.rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    rows = []
    for setting in SETTINGS:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_check", "--worker", setting],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode:
            raise SystemExit(f"{setting}: {proc.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import torch

    from benchmarks.kernel_kl import device_name, git_sha

    device, commit = device_name("cuda" if torch.cuda.is_available() else "cpu"), git_sha()
    lines = ["| run | prompt tokens | measured peak extra GiB | estimated GiB | estimate / measured |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['prompt_tokens']} | {r['measured_gib']:.3f} | {r['estimated_gib']:.3f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    for r in rows:
        lines += ["", f"{r['setting']}, the estimate's components:", "", "| component | GiB |", "|---|---|"]
        lines += [f"| {name} | {gib:.3f} |" for name, gib in r["rows"]]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_cpu.json").write_text(json.dumps({"device": device, "commit": commit, "rows": rows},
                                                        indent=1) + "\n")
    (RESULTS / "memory_cpu.md").write_text(
        f"# `caopd memory` against measured peaks (CPU)\n\n{device}; commit {commit}. Measured: peak resident "
        "memory of one training step above the process's (warmed-up) start. Estimated: `caopd memory "
        "--device cpu` for the same settings.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
