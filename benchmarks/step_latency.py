"""Seconds per training step: OPD (1 rollout a prompt) vs CaOPD (K = 8), synchronous vs asynchronous.

(a) OPD, K = 1, synchronous; (b) CaOPD, K = 8, synchronous; (c) CaOPD, K = 8, asynchronous
(max staleness 1). All three train on one completion per prompt (``train_rollouts = 1``): the K
rollouts serve P_acc, so the training work is the same and the ratios show what the extra
rollouts cost. Engines: the real TransformersEngine and (when vllm is installed) the VLLMEngine (on
a CPU, generation and training share the same cores); a waiting engine that sleeps for the
generation time measured with TransformersEngine and returns canned completions (a stand-in for
generation on separate GPUs, which shows what the overlap can hide); and the waiting engine again
with K = 8 generation as long as training (the regime where overlap can hide all of it). The first
step of every run is a warm-up, excluded.

    python benchmarks/step_latency.py            # writes benchmarks/results/step_latency_<device>.{json,md}
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.kernel_kl import device_name, git_sha  # noqa: E402
from caopd.config import TrainConfig  # noqa: E402
from caopd.engines.base import SamplingParams  # noqa: E402
from caopd.evaluation.tables import format_table  # noqa: E402
from caopd.training.trainer import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CANNED = "<reasoning>\nI add the numbers and check the options one by one.\n</reasoning>\n<answer>\nB\n</answer>\n" \
         "Confidence: 0.70"


class WaitingEngine:
    """Sleeps ``seconds`` per generate call (what a generation server would take), then answers."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def update_weights(self, weights) -> None:
        pass

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[str]]:
        time.sleep(self.seconds)
        return [[CANNED] * n for _ in prompts]


def config(out: Path, k: int, async_rollouts: bool, steps: int, rollout_engine: str) -> TrainConfig:
    return TrainConfig(model="tiny-qwen3", tokenizer="fast", output_dir=str(out), num_generations=k, train_rollouts=1,
                       rollout_engine=rollout_engine,
                       empirical_calibration=k > 1, async_rollouts=async_rollouts, max_staleness=1,
                       prompts_per_step=8, micro_batch_prompts=8, max_prompt_length=256, max_completion_length=48,
                       max_steps=steps + 1, save_every=10_000, bf16=False, learning_rate=1e-4)


def measure(name: str, cfg: TrainConfig, engine=None) -> dict:
    start = time.perf_counter()
    history = train(cfg, engine=engine, quiet=True)["history"][1:]  # step 1: warm-up
    wall = time.perf_counter() - start
    mean = {k: statistics.mean(r[k] for r in history) for k in ("time_generate", "time_verify",
                                                                  "time_forward_backward")}
    return {"run": name, "seconds_per_step": sum(mean.values()), "generate_wait": mean["time_generate"],
            "verify": mean["time_verify"], "train": mean["time_forward_backward"], "steps": len(history),
            "wall_with_setup": wall}


NOTES = """Notes. "generate (exposed)" is the time the trainer waited for rollouts; "train" includes the
optimizer step, the EMA update and (async) publishing a weight snapshot. On a CPU the real engines'
generation and training compete for the same cores, so asynchrony hides little there; with
generation elsewhere (the waiting engine) the overlap hides min(generation, training) per step, and
when K = 8 generation takes no longer than training, async CaOPD costs about what synchronous OPD
costs. The vLLM rows include its weight update (in-place reload + prefix-cache reset) in "train";
its start-up (~20 s on CPU) is outside the timed steps."""


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    tmp = Path(tempfile.mkdtemp())
    rows = []
    real_kinds = ("transformers", "vllm") if importlib.util.find_spec("vllm") else ("transformers",)
    kinds = (*real_kinds, "waiting", "waiting, generation = training")
    for engine_kind in kinds:
        real = {r["run"][:1]: r for r in rows if r["engine"] == "transformers"}
        if engine_kind in real_kinds:
            runs = [("a: OPD K=1 sync", 1, False, None), ("b: CaOPD K=8 sync", 8, False, None),
                    ("c: CaOPD K=8 async", 8, True, None)]
        else:  # the real engine's generation times, or K = 8 generation as long as training (same K ratio)
            latency_b = real["b"]["generate_wait"] if engine_kind == "waiting" else real["b"]["train"]
            latency_a = latency_b * real["a"]["generate_wait"] / real["b"]["generate_wait"]
            runs = [("a: OPD K=1 sync", 1, False, WaitingEngine(latency_a)),
                    ("b: CaOPD K=8 sync", 8, False, WaitingEngine(latency_b)),
                    ("c: CaOPD K=8 async", 8, True, WaitingEngine(latency_b))]
        for name, k, async_rollouts, engine in runs:
            cfg = config(tmp / f"{engine_kind}-{k}-{async_rollouts}", k, async_rollouts, steps,
                         "vllm" if engine_kind == "vllm" else "transformers")
            row = measure(name, cfg, engine)
            row["engine"] = engine_kind
            rows.append(row)
            print(json.dumps(row))
    ratios = {}
    for engine_kind in kinds:
        by = {r["run"][:1]: r["seconds_per_step"] for r in rows if r["engine"] == engine_kind}
        ratios[f"{engine_kind}: b/a"] = by["b"] / by["a"]
        ratios[f"{engine_kind}: c/a"] = by["c"] / by["a"]
    meta = {"device": device_name("cuda" if torch.cuda.is_available() else "cpu"), "git": git_sha(),
            "date": time.strftime("%Y-%m-%d"), "steps": steps, "model": "tiny-qwen3 (fast tokenizer)",
            "prompts_per_step": 8, "max_completion_length": 48}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"step_latency_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    table = format_table(["engine", "run", "s/step", "generate (exposed)", "verify", "train"],
                         [[r["engine"], r["run"], r["seconds_per_step"], r["generate_wait"], r["verify"], r["train"]]
                          for r in rows], markdown=True)
    ratio_table = format_table(["ratio", "value"], [[k, v] for k, v in ratios.items()], markdown=True)
    stem.with_suffix(".md").write_text(
        f"# Seconds per training step: OPD vs CaOPD, sync vs async\n\n{meta['device']}; {meta['model']}, "
        f"{meta['prompts_per_step']} prompts a step, {meta['max_completion_length']} completion tokens, "
        f"{steps} timed steps after one warm-up; git {meta['git']}, {meta['date']}. All runs train on one "
        f"completion a prompt.\n\n{table}\n\n{ratio_table}\n\n{NOTES}\n")
    print(table + "\n\n" + ratio_table)


if __name__ == "__main__":
    main()
