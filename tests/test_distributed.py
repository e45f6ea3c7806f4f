"""Many processes (issue 15): FSDP2 on CPU with gloo, two real processes under torchrun.

Three steps of `--config tiny` on 2 processes with --fsdp end with the same weights and log the same
losses as on 1 process; a 2-process run stopped after a checkpoint and resumed equals an
uninterrupted one; the metrics file has one row per step. Deliberate bugs these catch: a loss not
normalized by the global number of sequences (each process's mean: the gradient doubles), ranks
sampling the same prompts (rank_slice ignoring the rank), every rank writing metrics rows.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caopd.errors import InputError
from caopd.training.distributed import Ranks, rank_slice
from caopd.training.trainer import merge_step_stats

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--max-steps", "3", "--num-generations", "3", "--max-completion-length", "24"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caopd(args: list[str], processes: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
              "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "caopd"] if processes > 1 \
        else [sys.executable, "-m", "caopd"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(ROOT),
           **(env or {})}
    done = subprocess.run(launch + ["train", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert first.keys() == second.keys()
    largest = max(float(t.abs().max()) for t in first.values())
    worst = max(float((first[k] - second[k]).abs().max()) for k in first)
    assert worst <= 1e-4 * largest, (worst, largest)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    caopd([*TINY, "--output-dir", str(out)])
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    caopd([*TINY, "--output-dir", str(out), "--fsdp", "true", "--save-every", "1"], processes=2)
    return out


def test_two_processes_train_what_one_process_trains(one_process, two_processes):
    single, double = rows(one_process), rows(two_processes)
    assert [r["step"] for r in double] == [1, 2, 3]  # one row per step: only the main process writes
    assert [r["prompts"] for r in double] == [r["prompts"] for r in single]  # the whole step, in order
    assert [r["mean_p_acc"] for r in double] == [r["mean_p_acc"] for r in single]  # the same rollouts
    assert [r["loss"] for r in double] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    assert [r["grad_norm"] for r in double] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)
    assert_same_weights(one_process, two_processes)
    shards = sorted(p.name for p in (two_processes / "checkpoints" / "step-000003").iterdir())
    assert "model.rank00001-of-00002.safetensors" in shards and "manifest.json" in shards


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(two_processes, tmp_path):
    stopped = tmp_path / "run"
    shutil.copytree(two_processes, stopped)
    # as if killed during step 3 after logging it: its checkpoint and the final model never written
    shutil.rmtree(stopped / "checkpoints" / "step-000003")
    shutil.rmtree(stopped / "final")
    done = caopd([*TINY, "--output-dir", str(stopped), "--fsdp", "true", "--save-every", "1", "--resume", "true"],
                 processes=2)
    assert "resuming from" in done.stderr and "step 2" in done.stderr
    assert [r["step"] for r in rows(stopped)] == [1, 2, 3]
    assert [r["loss"] for r in rows(stopped)] == pytest.approx([r["loss"] for r in rows(two_processes)], rel=1e-6)
    assert_same_weights(stopped, two_processes)
    teacher = [load_file(run / "checkpoints" / "step-000003" / "teacher.rank00000-of-00002.safetensors")
               for run in (stopped, two_processes)]
    assert all(torch.allclose(teacher[0][k], teacher[1][k], atol=1e-6) for k in teacher[0])


def test_each_process_owns_a_contiguous_share_of_whole_prompts():
    assert [rank_slice(8, Ranks(r, 4)) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert rank_slice(5, Ranks()) == slice(0, 5)
    with pytest.raises(InputError, match="--prompts-per-step 6 does not divide by the 4 processes"):
        rank_slice(6, Ranks(0, 4))


def test_merged_step_stats_are_the_one_process_stats():
    a = {"p_acc": [0.5], "correct": [1.0, 0.0], "format_adherence": [1.0], "reasons": ["wrong answer"],
         "confidences": [0.9], "fallbacks": 1, "tokens": 10, "loss": 0.25, "prompts": [3]}
    b = {"p_acc": [1.0], "correct": [1.0, 1.0], "format_adherence": [0.5], "reasons": [], "confidences": [],
         "fallbacks": 0, "tokens": 7, "loss": 0.5, "prompts": [1]}
    merged = merge_step_stats([a, b])
    assert merged["prompts"] == [3, 1] and merged["p_acc"] == [0.5, 1.0] and merged["correct"] == [1.0, 0.0, 1.0, 1.0]
    assert (merged["tokens"], merged["loss"], merged["fallbacks"]) == (17, 0.75, 1)
    assert merged["reasons"] == ["wrong answer"] and merged["confidences"] == [0.9]


def test_shipped_accelerate_configs_turn_fsdp_on(one_process, tmp_path):
    """accelerate launch's own parsing of each shipped config gives the environment its launcher
    sets; caopd under that environment (2 CPU processes here) shards, without --fsdp on the line."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    envs = {}
    for name, processes in (("fsdp2-1node-8gpu", 8), ("fsdp2-multinode", 16)):
        config = ROOT / "caopd" / "configs" / "accelerate" / f"{name}.yaml"
        args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "caopd", "train"])
        args, _, _ = _validate_launch_command(args)
        assert args.use_fsdp and args.num_processes == processes, name
        envs[name] = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}
        assert envs[name]["ACCELERATE_USE_FSDP"] == "true" and envs[name]["FSDP_VERSION"] == "2", name
    out = tmp_path / "run"
    caopd([*TINY, "--output-dir", str(out)], processes=2, env=envs["fsdp2-1node-8gpu"])
    assert (out / "checkpoints" / "step-000003" / "model.rank00001-of-00002.safetensors").exists()
    assert_same_weights(out, one_process)
