"""Many processes (issues 15, 23): FSDP2 on CPU with gloo, two real processes under torchrun.

Three steps of `--config tiny` on 2 processes with --fsdp end with the same weights and log the same
losses as on 1 process, with FSDP2's CPU offload too (the process group then keyed by device); a
2-process run stopped after a checkpoint and resumed equals an uninterrupted one; the metrics file
has one row per step; `caopd export` joins a sharded checkpoint into the final model; the sharded
placement streams whole tensors one at a time, loads exactly, and its bf16 teacher follows the EMA.
Deliberate bugs these catch: a loss not normalized by the global number of sequences (each
process's mean: the gradient doubles), ranks sampling the same prompts (rank_slice ignoring the
rank), every rank writing metrics rows, a weight stream that gathers the whole model before
yielding (all tensors alive at once), a broadcast that slices the wrong rank's piece, export joining
pieces in the wrong order, the teacher EMA applied to a gathered copy (the shards never move).
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
from caopd.training.distributed import Ranks, backend_for, rank_slice
from caopd.training.trainer import merge_step_stats

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--max-steps", "3", "--num-generations", "3", "--max-completion-length", "24"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def environment(env: dict | None = None) -> dict:
    return {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(ROOT),
            **(env or {})}


def caopd(args: list[str], processes: int = 1, env: dict | None = None, command: str = "train",
          check: bool = True, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    import resource

    start = [*launch(processes), "-m", "caopd"] if processes > 1 else [sys.executable, "-m", "caopd"]
    limit = None if file_size_limit is None else \
        (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit)))
    done = subprocess.run(start + [command, *args], capture_output=True, text=True, cwd=ROOT, env=environment(env),
                          timeout=600, preexec_fn=limit)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    first = load_file((a if (a / "model.safetensors").exists() else a / "final") / "model.safetensors")
    second = load_file((b if (b / "model.safetensors").exists() else b / "final") / "model.safetensors")
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
    # issue 27 item 4: the norms of the same gradients differed by up to 5e-4 (fp32 sums over the vocabulary rows)
    assert [r["grad_norm"] for r in double] == pytest.approx([r["grad_norm"] for r in single], rel=1e-6)
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


def test_processes_agree_on_the_checkpoint_they_resume(two_processes, tmp_path):
    """Issue 26 item 1: one process's newest shard changed at the same size; that process fell back
    alone and the two trained on different steps' shards (then crashed or hung)."""
    stopped = tmp_path / "run"
    shutil.copytree(two_processes, stopped)
    shutil.rmtree(stopped / "final")
    damaged = stopped / "checkpoints" / "step-000003" / "model.rank00001-of-00002.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-8:] = bytes(8)  # its tensors still load
    damaged.write_bytes(bytes(data))
    done = caopd([*TINY, "--output-dir", str(stopped), "--fsdp", "true", "--save-every", "1", "--resume", "true",
                  "--max-steps", "4"], processes=2)
    assert "process 1: skipping checkpoint" in done.stderr and "does not match its checksum" in done.stderr
    assert "resuming from" in done.stderr and "(step 2)" in done.stderr  # both processes: step 2
    assert [r["step"] for r in rows(stopped)] == [1, 2, 3, 4]
    straight = rows(two_processes)
    assert [r["prompts"] for r in rows(stopped)[:3]] == [r["prompts"] for r in straight]
    assert [r["loss"] for r in rows(stopped)[:3]] == pytest.approx([r["loss"] for r in straight], rel=1e-6)


def test_a_save_that_fails_on_a_full_disk_stops_every_process_and_resumes(two_processes, tmp_path):
    """Issue 26: a full disk during a multi-process save (a file-size limit here: writes fail with EFBIG):
    every process stops with one line (none waits for another), the half-written folder is not taken for
    a checkpoint, and a resume with space continues exactly (over the folder the failed save left, as a
    process killed mid-save leaves it)."""
    stopped = tmp_path / "run"
    shutil.copytree(two_processes, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step-000003")
    shutil.rmtree(stopped / "final")
    args = [*TINY, "--output-dir", str(stopped), "--fsdp", "true", "--save-every", "1", "--resume", "true"]
    full = caopd(args, processes=2, check=False, file_size_limit=256 * 1024)
    assert full.returncode == 1, full.stderr[-2000:]
    assert "writing checkpoint 3 failed (process 0: [Errno 27] File too large); stopped at step 3" in full.stderr
    assert (stopped / "checkpoints" / "step-000003.tmp").is_dir()
    assert not (stopped / "checkpoints" / "step-000003").exists()
    done = caopd(args, processes=2)
    assert "resuming from" in done.stderr and "(step 2)" in done.stderr
    assert [r["step"] for r in rows(stopped)] == [1, 2, 3]
    assert [r["loss"] for r in rows(stopped)] == pytest.approx([r["loss"] for r in rows(two_processes)], rel=1e-6)
    assert_same_weights(stopped, two_processes)
    assert not (stopped / "checkpoints" / "step-000003.tmp").exists()


def accelerate(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args, "-m", "caopd", "train", *TINY,
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT,
                          env=environment(), timeout=600)


def test_accelerate_launch_records_what_ran(one_process, tmp_path):
    """Issue 27 item 4: the shipped 2-process CPU accelerate config trains what one process trains and the
    run records fsdp true (from the launcher); accelerate's simple launcher, asked for 2 processes without a
    distributed type, started one with FSDP off, silently."""
    import yaml

    config = ROOT / "caopd" / "configs" / "accelerate" / "fsdp2-cpu-2proc.yaml"
    done = accelerate(["--config_file", str(config), "--main_process_port", str(free_port())], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from the launcher: fsdp" in done.stdout.splitlines()[0]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["fsdp"] is True
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert saved["config"]["fsdp"] is True and saved["world_size"] == 2
    assert [r["loss"] for r in rows(tmp_path / "run")] == pytest.approx([r["loss"] for r in rows(one_process)],
                                                                       rel=1e-4)
    shutil.rmtree(tmp_path / "run")
    simple = accelerate(["--num_processes", "2", "--cpu", "--main_process_port", str(free_port())], tmp_path)
    assert simple.returncode != 0 and "accelerate launch started one process, not the several asked for" in \
        simple.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


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


def test_an_offloaded_two_process_run_trains_what_one_process_trains(one_process, tmp_path):
    """FSDP2's CPUOffloadPolicy (unpinned on CPU), with the process group keyed by device as on GPUs."""
    out = tmp_path / "run"
    done = caopd([*TINY, "--output-dir", str(out), "--fsdp", "true", "--fsdp-cpu-offload", "true"], processes=2)
    assert "2 process(es) (cpu:gloo)" in done.stdout  # the run's summary line
    assert [r["loss"] for r in rows(out)] == pytest.approx([r["loss"] for r in rows(one_process)], rel=1e-4)
    assert_same_weights(out, one_process)


def test_the_process_group_backend_follows_the_devices():
    assert backend_for(cuda=True, cpu_offload=False) == "nccl"
    assert backend_for(cuda=True, cpu_offload=True) == "cpu:gloo,cuda:nccl"  # gradient norms over host shards
    assert backend_for(cuda=False, cpu_offload=False) == "gloo"
    assert backend_for(cuda=True, cpu_offload=True, choice="gloo") == "gloo"  # processes sharing one GPU


def test_the_timeout_and_backend_reach_the_process_group(monkeypatch):
    import datetime

    import torch.distributed as dist

    from caopd.training.distributed import join_process_group

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(backend=backend,
                                                                                        timeout=timeout))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert join_process_group(12.5, cpu_offload=True) == Ranks(1, 2, "cpu:gloo")
    assert seen == {"backend": "cpu:gloo", "timeout": datetime.timedelta(minutes=12.5)}


def test_fsdp_without_a_launcher_is_one_line(monkeypatch, tmp_path, capsys):
    """Issue 26 item 7: --fsdp true without torchrun was a traceback ending in 'RANK expected'."""
    from caopd.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--config", "tiny", "--fsdp", "true", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--fsdp true runs under a launcher" in err and "torchrun --nproc_per_node N" in err and "\n" not in err


def test_export_joins_a_sharded_checkpoint_into_the_final_model(two_processes, tmp_path):
    from transformers import AutoModelForCausalLM

    exported = tmp_path / "step3"
    done = caopd([str(two_processes), "--output", str(exported)], command="export")
    assert "step-000003" in done.stdout
    assert_same_weights(exported, two_processes)  # the last checkpoint is the final model, joined exactly
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert torch.equal(model.model.norm.weight, load_file(exported / "model.safetensors")["model.norm.weight"])
    earlier = tmp_path / "step2"
    caopd([str(two_processes), "--checkpoint", "2", "--output", str(earlier), "--dtype", "bf16"], command="export")
    assert {t.dtype for t in load_file(earlier / "model.safetensors").values()} == {torch.bfloat16}
    refused = caopd([str(two_processes), "--output", str(exported)], command="export", check=False)
    assert refused.returncode == 2 and "exists" in refused.stderr and refused.stderr.count("\n") == 1
    missing = caopd([str(two_processes), "--checkpoint", "9", "--output", str(tmp_path / "x")], command="export",
                    check=False)
    assert missing.returncode == 2 and "--checkpoint 9" in missing.stderr and missing.stderr.count("\n") == 1


def test_the_sharded_placement_streams_whole_tensors_one_at_a_time(tmp_path):
    """tests/fsdp_worker.py on 2 processes: see its docstring."""
    done = subprocess.run([*launch(2), str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, env=environment(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0]["names"] == seen[1]["names"] and len(seen[0]["names"]) == 25  # the tied lm_head by name too
    assert seen[0]["names"][-1] == "lm_head.weight"
    for rank in seen:
        assert rank["most_alive"] == 1  # the consumer drops each: never two whole tensors at once
        assert rank["worst_difference"] == 0.0  # the broadcast load is exact
        assert rank["teacher_dtypes"] == ["torch.bfloat16"] and rank["teacher_is_the_student"]
        assert rank["teacher_local_elements"] < 0.55 * rank["student_elements"]  # each holds half the teacher
        assert abs(rank["gap_closed"] - 0.634) < 0.05  # 1 - 0.99^100 of the way, as fp32's EMA
        assert rank["moved_share"] > 0.5


def test_async_rollouts_under_fsdp_are_refused_in_one_line(tmp_path):
    done = caopd([*TINY, "--output-dir", str(tmp_path / "run"), "--fsdp", "true", "--async-rollouts", "true"],
                 check=False)
    assert done.returncode == 2 and "--async-rollouts with --fsdp" in done.stderr
    assert done.stderr.count("\n") == 1
