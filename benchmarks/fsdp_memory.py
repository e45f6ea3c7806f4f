"""What each process holds: one training run on 1 process and on 2 (FSDP2, gloo), per phase, on this CPU.

For each model shape, `caopd train` runs 2 CaOPD steps on 1 process and on 2 (torchrun, --fsdp true),
and each process's peak resident memory per phase comes from the run's memory.json (the trainer
measures it: VmHWM reset at each phase). Beside it: `caopd memory --device cpu --gpus N`'s estimate
for the same run. Two shapes: one where the decoder layers dominate, as in Qwen3-32B (95 % of its
parameters), and the issue's example of Qwen3's vocabulary at 1024 wide, where the two lm_heads the
fused loss gathers whole are more than half the model.

    python -m benchmarks.fsdp_memory          # about 4 minutes, 8 GB
Writes benchmarks/results/fsdp_memory_cpu.{json,md}.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMON = {"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
          "head_dim": 64, "max_position_embeddings": 4096}
SHAPES = {
    "layers dominate: 16 layers, intermediate 4096, vocabulary 1024 (0.25B)":
        ({**COMMON, "vocab_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 16,
          "tie_word_embeddings": False}, "fast"),
    "Qwen3's vocabulary: 8 layers, intermediate 3072, vocabulary 151,936 tied (0.28B)":
        ({**COMMON, "vocab_size": 151_936, "intermediate_size": 3072, "num_hidden_layers": 8,
          "tie_word_embeddings": True}, "qwen3"),
}
PHASES = ("load", "steps", "checkpoint_save", "final_save")
RUN = ["--config", "tiny", "--num-generations", "2", "--prompts-per-step", "2", "--micro-batch-prompts", "1",
       "--max-completion-length", "4", "--max-steps", "2", "--save-every", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args: list[str], processes: int) -> None:
    start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), "-m", "caopd"] if processes > 1 else [sys.executable, "-m", "caopd"]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*start, "train", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])


def estimated(config: Path, run: Path, processes: int) -> list[float]:
    from benchmarks.memory_check import longest_prompt
    from caopd.modeling.memory import GIB, Plan, estimate

    prompt = longest_prompt(run, "tiny-qwen3", ROOT / "caopd" / "examples" / "arith_mc.jsonl", "science")
    plan = Plan(str(config), device="cpu", gpus=processes, fsdp=processes > 1, prompt_tokens=prompt,
                completion_tokens=4, num_generations=2, prompts_per_step=2)
    return [estimate(plan, main=rank == 0).peak / GIB for rank in range(processes)]


def main() -> None:
    import torch

    from benchmarks.kernel_kl import device_name, git_sha

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (shape, tokenizer) in SHAPES.items():
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps(shape))
            measured = {}
            for processes in (1, 2):
                run = Path(tmp) / f"run{processes}"
                train([*RUN, "--model", f"random:{config}", "--tokenizer", tokenizer, "--output-dir", str(run),
                       "--overwrite", "true", *(["--fsdp", "true"] if processes > 1 else [])], processes)
                memory = json.loads((run / "memory.json").read_text())
                measured[processes] = {phase: [r["host_gib"] for r in memory[phase]] for phase in PHASES}
                measured[processes]["estimated_peak"] = estimated(config, run, processes)
            rows.append({"shape": label, "one": measured[1], "two": measured[2]})
            print(json.dumps(rows[-1]), flush=True)
    device, commit = device_name("cuda" if torch.cuda.is_available() else "cpu"), git_sha()
    lines = []
    for row in rows:
        one, two = row["one"], row["two"]
        lines += [f"### {row['shape']}", "", "| phase | 1 process GiB | 2 processes: main, other GiB | ratio (worst) |",
                  "|---|---|---|---|"]
        for phase in PHASES:
            worst = max(two[phase]) / one[phase][0]
            lines.append(f"| {phase} | {one[phase][0]:.2f} | {two[phase][0]:.2f}, {two[phase][1]:.2f} | "
                         f"{worst:.2f} |")
        peaks1 = max(one[p][0] for p in PHASES)
        peaks2 = [max(two[p][r] for p in PHASES) for r in range(2)]
        lines += ["", f"Peak: 1 process {peaks1:.2f} GiB (estimated {one['estimated_peak'][0]:.2f}); 2 processes "
                  f"{peaks2[0]:.2f} and {peaks2[1]:.2f} GiB (estimated {two['estimated_peak'][0]:.2f} and "
                  f"{two['estimated_peak'][1]:.2f}).", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fsdp_memory_cpu.json").write_text(json.dumps({"device": device, "commit": commit, "rows": rows},
                                                             indent=1) + "\n")
    (RESULTS / "fsdp_memory_cpu.md").write_text(
        f"# What each process holds: 1 process vs 2 (FSDP2, gloo), per phase\n\n{device}; commit {commit}. "
        "Peak resident memory per phase from each run's memory.json (2 CaOPD steps, K = 2, 4-token completions); "
        "estimated: `caopd memory --device cpu --gpus N` for the same run.\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
