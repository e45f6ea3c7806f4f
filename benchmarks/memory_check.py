"""`caopd memory`'s estimate against the measured peak of real training runs on this CPU.

Each setting is a fresh `caopd train` process of two steps (rollouts, verify, loss, backward, Adam,
EMA, checkpoint, final save); the trainer measures its own peak resident memory per phase
(memory.json: VmHWM, reset at each phase). The estimate is `caopd memory --device cpu` for the same
settings (``memory.plan_of``, as `caopd memory --config` plans), with the steps' longest prompt and the
completion cap; for several processes, the process furthest from its estimate.

    python -m benchmarks.memory_check          # tiny, random:Qwen3-0.6B whole, LoRA, 2 processes, a teacher model
    python -m benchmarks.memory_check --only teacher-model   # the settings whose name holds that text
Writes benchmarks/results/memory_cpu.{json,md} (with --only: those rows replaced, the others kept).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_SCIENCE = ROOT.parent / "shared" / "data" / "caopd" / "science_eval.jsonl"
PHASES = ("load", "steps", "checkpoint_save", "final_save")
QWEN3_0_6B = ["--model", "random:Qwen3-0.6B", "--tokenizer", "qwen3", "--dataset", "science", "--data",
              str(SHARED_SCIENCE), "--num-generations", "2", "--prompts-per-step", "2", "--micro-batch-prompts", "1",
              "--max-completion-length", "16", "--max-prompt-length", "512", "--max-steps", "2", "--save-every", "2"]
SETTINGS = {  # name: (processes, train's flags over --config tiny)
    "tiny-qwen3 (--config tiny)": (1, ["--max-steps", "2", "--save-every", "2"]),
    "random:Qwen3-0.6B, K = 2": (1, QWEN3_0_6B),
    "random:Qwen3-0.6B, K = 2, LoRA r 16": (1, [*QWEN3_0_6B, "--lora-r", "16"]),
    "random:Qwen3-0.6B, K = 2, 2 processes (FSDP2)": (2, [*QWEN3_0_6B, "--fsdp", "true"]),
    "random:Qwen3-0.6B, K = 2, --teacher-model random:Qwen3-1.7B (bf16)":
        (1, [*QWEN3_0_6B, "--teacher-model", "random:Qwen3-1.7B", "--teacher-dtype", "bf16"]),
}


def longest_prompt(run: Path, model: str, data: Path, dataset: str, max_prompt_length: int = 1024) -> int:
    """Tokens of the longest student prompt the run's steps trained on (metrics.jsonl's prompts)."""
    from caopd.inputs.data import load_examples
    from caopd.inputs.prompts import student_messages
    from caopd.modeling.models import load_tokenizer
    from caopd.training.loss import chat_ids

    tokenizer = load_tokenizer(model, str(run / "tokenizer"))
    examples = load_examples(data, dataset)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(len(chat_ids(tokenizer, student_messages(examples[i]), {"enable_thinking": False})[-max_prompt_length:])
               for row in steps for i in row["prompts"])


def measure(setting: str, out: Path) -> dict:
    """One run of ``setting``: each process's measured peak against the planner's (main, other) estimates."""
    from caopd.config import load_config
    from caopd.modeling.memory import GIB, estimate, plan_of

    processes, flags = SETTINGS[setting]
    args = [*flags, "--output-dir", str(out)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
              "127.0.0.1", "--master_port", "29591"] if processes > 1 else [sys.executable]
    done = subprocess.run([*launch, "-m", "caopd", "train", "--config", "tiny", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(f"{setting}: {done.stderr.strip().splitlines()[-1]}")
    memory = json.loads((out / "memory.json").read_text())
    config = load_config("tiny", args)
    prompt = longest_prompt(out, config.model, config.data_path(), config.dataset, config.max_prompt_length)
    plan = plan_of(config, gpus=processes, device="cpu", prompt_tokens=prompt)
    measured = [max(memory[phase][rank]["host_gib"] for phase in PHASES) for rank in range(processes)]
    estimated = [estimate(plan, main=rank == 0).peak / GIB for rank in range(processes)]
    worst = max(range(processes), key=lambda rank: abs(estimated[rank] / measured[rank] - 1))
    return {"setting": setting, "processes": processes, "measured_gib": measured[worst],
            "estimated_gib": estimated[worst], "ratio": estimated[worst] / measured[worst], "process": worst,
            "measured_by_process_gib": measured, "estimated_by_process_gib": estimated, "prompt_tokens": prompt,
            "phases_gib": {phase: memory[phase][worst]["host_gib"] for phase in PHASES},
            "rows": [(r.name, r.bytes / GIB) for r in estimate(plan, main=worst == 0).rows]}


def main() -> None:
    import argparse

    import torch

    from benchmarks.kernel_kl import device_name, git_sha

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="run the settings whose name holds one of these")
    args = parser.parse_args()
    chosen = [s for s in SETTINGS if args.only is None or any(part in s for part in args.only)]
    if not chosen:
        raise SystemExit(f"--only {' '.join(args.only)}: no setting matches ({'; '.join(SETTINGS)})")
    saved = RESULTS / "memory_cpu.json"
    old = json.loads(saved.read_text()) if args.only and saved.exists() else {"rows": []}
    kept = [{**r, "commit": r.get("commit", old.get("commit"))} for r in old["rows"]]
    new = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(chosen):
            new[setting] = measure(setting, Path(tmp) / f"run{i}")
            print(json.dumps({k: v for k, v in new[setting].items() if k != "rows"}), flush=True)
    for r in new.values():
        r["commit"] = git_sha()
    rows = [new.pop(r["setting"], r) for r in kept] + list(new.values())  # the others' rows keep their commit
    device, commit = device_name("cuda" if torch.cuda.is_available() else "cpu"), git_sha()
    lines = ["| run | prompt tokens | process (the worst) | measured peak GiB | estimated GiB | estimate / measured "
             "| commit |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['prompt_tokens']} | {r['process']} of {r['processes']} | "
              f"{r['measured_gib']:.3f} | {r['estimated_gib']:.3f} | {r['ratio']:.2f} | {r['commit']} |" for r in rows]
    for r in rows:
        lines += ["", f"{r['setting']}, the estimate's components:", "", "| component | GiB |", "|---|---|"]
        lines += [f"| {name} | {gib:.3f} |" for name, gib in r["rows"]]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_cpu.json").write_text(json.dumps({"device": device, "commit": commit, "rows": rows},
                                                        indent=1) + "\n")
    (RESULTS / "memory_cpu.md").write_text(
        f"# `caopd memory` against measured peaks (CPU)\n\n{device}; each row's commit in its column (this file "
        f"written at {commit}). Measured: the peak resident "
        "memory of a fresh `caopd train` process over its phases (memory.json; 2 steps). Estimated: `caopd memory "
        "--device cpu` for the same settings (the fixed per-process cost included).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
