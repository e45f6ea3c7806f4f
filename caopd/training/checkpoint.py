"""Checkpoints that load without running code, written atomically, checked for completeness.

A checkpoint is a folder ``step-000012`` written as ``step-000012.tmp`` and renamed when whole:

    model.safetensors      the student (tied weights stored once, as transformers does)
    teacher.safetensors    the EMA teacher (none with --teacher-model, reloaded, or --teacher-server)
    state.safetensors      optimizer tensors (per-parameter Adam moments and steps), RNG byte states
    trainer_state.json     step, scheduler, optimizer hyper-parameters, Python/NumPy RNG states, the
                           run's config (compared on --resume)
    config.json            the model's transformers config (``caopd export`` writes it beside the weights)
    manifest.json          written last: each file's size and BLAKE2b digest, so a truncated or
                           corrupted checkpoint is detected (the digests are checked on --resume)

With FSDP2 (many processes) the three tensor files are one per process, each holding that
process's shards (``model.rank00000-of-00002.safetensors``, ...): see save_sharded_checkpoint.
Tensor files are written a tensor at a time (caopd.training.streamed_safetensors).

Nothing here unpickles: tensors are safetensors, everything else JSON. A checkpoint without a
manifest, or whose files are missing, of another size or another digest, is incomplete; ``resume``
then falls back to the newest complete one that loads, with a warning. With many processes each
checks its own files and the shared ones, and all take the newest checkpoint that every one of them
can read, or all stop with one line; every process's warnings reach the main process's log.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model

from caopd.errors import InputError
from caopd.training.streamed_safetensors import fsync_file

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
SHARDING = "fsdp2-dim0"  # each process holds a torch.chunk of every tensor along dim 0, in rank order
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done; the data position is step * prompts_per_step


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def _optimizer_tensors(optimizer, local=lambda t: t) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors as ``state.<param index>.<name>``, JSON-able rest) of an optimizer's state_dict;
    ``local`` takes a sharded tensor to this process's shard."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = local(value.detach())
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in saved["plain_state"].items()}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _trainable(module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, state: TrainState, student, teacher, optimizer, scheduler,
                    config: dict, trainable_only: bool = False) -> Path:
    """Write checkpoint ``step-<state.step>`` under ``directory`` atomically; returns its path.
    ``trainable_only`` (LoRA): the student's trainable tensors and the teacher's own state only (the
    frozen base is rebuilt from --model on resume)."""
    final = Path(directory) / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = {}
    if trainable_only:
        entries["model.safetensors"] = _write_tensors(tmp / "model.safetensors", _trainable(student))
        if teacher is not None:
            entries["teacher.safetensors"] = _write_tensors(tmp / "teacher.safetensors",
                                                            {k: v.detach() for k, v in teacher.state_dict().items()})
    else:
        from caopd.training.weight_stream import saved_tensors

        entries["model.safetensors"] = _write_tensors(tmp / "model.safetensors",
                                                      {k: v.detach() for k, v in saved_tensors(student)})
        if teacher is not None:
            entries["teacher.safetensors"] = _write_tensors(tmp / "teacher.safetensors",
                                                            {k: v.detach() for k, v in saved_tensors(teacher)})
        _write_model_config(tmp, student)
    tensors, optimizer_rest = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    entries["state.safetensors"] = _write_tensors(tmp / "state.safetensors", tensors)
    numpy_state = np.random.get_state()
    _write_json(tmp / TRAINER_STATE, {
        "state": asdict(state), "scheduler": scheduler.state_dict(), "optimizer": optimizer_rest,
        "rng": {"python": random.getstate(), "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]},
        "config": config})
    _seal(tmp, final, state.step, entries)
    return final


def file_digest(path: Path) -> str:
    """BLAKE2b (128-bit) of the file's bytes, read 8 MiB at a time."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _entries(folder: Path, names) -> dict[str, dict]:
    """The manifest's entry of each file: its size and digest."""
    return {name: {"size": (folder / name).stat().st_size, "blake2b": file_digest(folder / name)} for name in names}


def _seal(tmp: Path, final: Path, step: int, entries: dict[str, dict] | None = None) -> None:
    """Sync every file of ``tmp``, write the manifest last (``entries``: files already described, by
    the processes that wrote them), rename ``tmp`` to ``final``."""
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        fsync_file(tmp / name)
    entries = {**(entries or {}), **_entries(tmp, [n for n in files if n not in (entries or {})])}
    _write_json(tmp / MANIFEST, {"step": step, "files": dict(sorted(entries.items()))})
    fsync_file(tmp / MANIFEST)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_file(final.parent)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """A safetensors file of ``tensors`` (each moved to host memory as it is written, one at a time);
    returns its manifest entry (size, and the digest of the bytes as they were written)."""
    from caopd.training.streamed_safetensors import TensorSpec, write_safetensors

    digest = hashlib.blake2b(digest_size=16)
    write_safetensors(path, [TensorSpec.of(name, t) for name, t in tensors.items()], tensors.values(), metadata,
                      digest)
    return {"size": path.stat().st_size, "blake2b": digest.hexdigest()}


def _shards(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(this process's shard of each parameter, metadata naming each parameter's whole shape)."""
    from caopd.training.weight_stream import local

    shards = {name: local(p.detach()) for name, p in module.named_parameters()}
    shapes = {name: list(p.shape) for name, p in module.named_parameters()}
    return shards, {"sharding": SHARDING, "whole_shapes": json.dumps(shapes)}


class SaveFailed(Exception):
    """Writing a checkpoint failed on some process (a full disk, a file-size limit): the message names it."""


def _together(ranks, work):
    """``work()`` on every process, then each one's result on all; when it raised OSError on any process,
    SaveFailed on all (every process still reaches the same collectives: none waits for a lost one)."""
    from caopd.training.distributed import all_gather

    result, failure = None, None
    try:
        result = work()
    except OSError as e:
        failure = f"process {ranks.rank}: {e}"
    gathered = all_gather((result, failure), ranks)
    failures = [f for _, f in gathered if f]
    if failures:
        raise SaveFailed(failures[0])
    return [r for r, _ in gathered]


def save_sharded_checkpoint(directory: Path, state: TrainState, student, teacher, optimizer, scheduler, config: dict,
                            ranks) -> Path:
    """save_checkpoint for FSDP2-sharded models: each process writes its own shards
    (``model.rank00000-of-00002.safetensors``, teacher and optimizer state likewise, as
    safetensors, a tensor at a time: nothing here or in the load unpickles, and no process holds a
    host copy of its shards) and describes them (size, digest); the main process then writes
    config.json, trainer_state.json and the manifest over all files, and renames the folder. A write
    that fails on any process stops all of them (SaveFailed), the folder left unsealed. Loads on the
    same number of processes; ``caopd export`` joins the shards into whole tensors."""
    from caopd.training.weight_stream import local

    final = Path(directory) / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    suffix = f"rank{ranks.rank:05d}-of-{ranks.world:05d}.safetensors"

    def prepare():
        if ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_own() -> dict[str, dict]:
        own = {}
        for module, name in _saved_models(student, teacher):
            shards, metadata = _shards(module)
            own[f"{name}.{suffix}"] = _write_tensors(tmp / f"{name}.{suffix}", shards, metadata)
        tensors, _ = _optimizer_tensors(optimizer, local)
        tensors["rng.torch"] = torch.get_rng_state()
        own[f"state.{suffix}"] = _write_tensors(tmp / f"state.{suffix}", tensors)
        return own

    def seal(entries: dict[str, dict]):
        if ranks.is_main:
            _write_model_config(tmp, student)
            _write_json(tmp / TRAINER_STATE, {"state": asdict(state), "scheduler": scheduler.state_dict(),
                                              "optimizer": _optimizer_tensors(optimizer, local)[1],
                                              "world_size": ranks.world, "config": config})
            _seal(tmp, final, state.step, entries)

    _together(ranks, prepare)
    entries = {name: entry for part in _together(ranks, write_own) for name, entry in part.items()}
    _together(ranks, lambda: seal(entries))
    return final


def _saved_models(student, teacher) -> list[tuple[torch.nn.Module, str]]:
    """(model, file stem) of what a checkpoint holds: the student, and the EMA teacher unless the run's
    teacher is a --teacher-model (None here: frozen, reloaded from its source on resume)."""
    return [(student, "model")] + ([] if teacher is None else [(teacher, "teacher")])


def _write_model_config(folder: Path, model: torch.nn.Module) -> None:
    """The model's config.json (its architecture): what ``caopd export`` writes beside the weights."""
    from caopd.modeling.models import describe_model

    if hasattr(model, "config"):
        describe_model(folder, model)


def load_sharded_checkpoint(path: Path, student, teacher, optimizer, scheduler, ranks) -> TrainState:
    """Restore a save_sharded_checkpoint into models sharded the same way on as many processes."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from caopd.training.weight_stream import local

    path = Path(path)
    saved = json.loads((path / TRAINER_STATE).read_text())
    if saved.get("world_size") != ranks.world:
        raise InputError(f"--resume: {path} was written by {saved.get('world_size', 1)} process(es); this run has "
                         f"{ranks.world}: resume on as many")
    suffix = f"rank{ranks.rank:05d}-of-{ranks.world:05d}.safetensors"
    for module, name in _saved_models(student, teacher):
        params = dict(module.named_parameters())
        with safe_open(str(path / f"{name}.{suffix}"), framework="pt") as f, torch.no_grad():
            if set(f.keys()) != set(params):
                raise ValueError(f"{name}.{suffix} holds other parameters than the model")
            for key, param in params.items():  # a tensor at a time
                local(param).copy_(f.get_tensor(key))
    tensors = load_file(str(path / f"state.{suffix}"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state_dict = _optimizer_state_dict(tensors, saved["optimizer"])
    for index, entries in state_dict["state"].items():
        param = params[index]
        for key, value in entries.items():
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.dim() > 0:
                entries[key] = DTensor.from_local(value.to(local(param).device), param.device_mesh, param.placements,
                                                  shape=param.shape, stride=param.stride())
    optimizer.load_state_dict(state_dict)
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return TrainState(**saved["state"])


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def incomplete_reason(path: Path, verify: bool = False, rank: int | None = None) -> str | None:
    """Why the checkpoint folder ``path`` is not whole, or None when its manifest checks out: every file
    there with its size, and with ``verify`` its digest too (a manifest of an older caopd has sizes
    only). ``rank``: the files one process reads (its own shards and the shared files)."""
    if (path / "checkpoint.pt").exists() and not (path / MANIFEST).exists():
        return "a checkpoint.pt of an older caopd, which is not loaded (unpickling can run code)"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        entries = {name: entry if isinstance(entry, dict) else {"size": entry} for name, entry in files.items()}
        sizes = {name: int(entry["size"]) for name, entry in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {MANIFEST} (written last: the save did not finish)"
    for name, size in sizes.items():
        if rank is not None and ".rank" in name and f".rank{rank:05d}-of-" not in name:
            continue  # another process's shard
        if not (path / name).is_file():
            return f"{name} is missing"
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} bytes, the manifest says {size}"
        if verify and "blake2b" in entries[name] and file_digest(path / name) != entries[name]["blake2b"]:
            return f"{name} does not match its checksum in the manifest (its bytes changed after the save)"
    return None


def checkpoints(directory: Path) -> list[Path]:
    """Every checkpoint folder ``step-N`` under ``directory`` (complete or not), oldest first."""
    found = [(step, p) for p in Path(directory).glob("step-*") if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def complete_checkpoints(directory: Path) -> list[Path]:
    return [p for p in checkpoints(directory) if incomplete_reason(p) is None]


def saved_config(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())["config"]


def load_checkpoint(path: Path, student, teacher, optimizer, scheduler, trainable_only: bool = False) -> TrainState:
    """Restore everything from the complete checkpoint ``path``; raises on a damaged one."""
    path = Path(path)
    saved = json.loads((path / TRAINER_STATE).read_text())
    tensors = load_file(str(path / "state.safetensors"))
    if trainable_only:
        weights, params = load_file(str(path / "model.safetensors")), dict(student.named_parameters())
        if set(weights) != {n for n, p in params.items() if p.requires_grad}:
            raise ValueError("model.safetensors holds other trainable tensors than the model's")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        if teacher is not None:
            teacher.load_state_dict(load_file(str(path / "teacher.safetensors")), strict=True)
    else:
        for target, name in _saved_models(student, teacher):
            load_model(target, str(path / f"{name}.safetensors"), strict=True)
    optimizer.load_state_dict(_optimizer_state_dict(tensors, saved["optimizer"]))
    scheduler.load_state_dict(saved["scheduler"])
    version, internal, gauss = saved["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = saved["rng"]["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return TrainState(**saved["state"])


def resume(directory: Path, student, teacher, optimizer, scheduler, warn=print, ranks=None,
           trainable_only: bool = False) -> tuple[Path, TrainState]:
    """Load the newest checkpoint under ``directory`` that is complete (sizes and checksums) and
    loads, warning about each newer one passed over. One-line InputError when there is none.
    ``ranks``: sharded models (load_sharded_checkpoint); the processes agree first (``_agree``)."""
    if ranks is not None and ranks.world > 1:
        return _resume_together(directory, student, teacher, optimizer, scheduler, warn, ranks)
    candidates = checkpoints(directory)
    for path in reversed(candidates):
        reason = incomplete_reason(path, verify=True)
        if reason is None:
            try:
                if ranks is not None:
                    return path, load_sharded_checkpoint(path, student, teacher, optimizer, scheduler, ranks)
                return path, load_checkpoint(path, student, teacher, optimizer, scheduler, trainable_only)
            except InputError:
                raise
            except Exception as e:  # a damaged file: any reader's error means the same
                reason = _load_error(e)
        warn(f"warning: skipping checkpoint {path}: {reason}")
    raise InputError(f"--resume: {directory} holds no complete checkpoint (looked for step-NNNNNN folders "
                     f"with a {MANIFEST}; found {len(candidates)} incomplete)")


def _load_error(e: Exception) -> str:
    return f"it does not load ({type(e).__name__}: {' '.join(str(e).split())[:200]})"


def _resume_together(directory: Path, student, teacher, optimizer, scheduler, warn, ranks) -> tuple[Path, TrainState]:
    """resume on many processes: each checks its own files of every checkpoint, all take the newest
    that every process can read (or all stop with one line), and a process whose load then fails
    stops them all; every process's warnings are gathered and logged by the main one."""
    from caopd.training.distributed import all_gather

    candidates = checkpoints(directory)
    readable, warnings = [], []
    for path in candidates:
        reason = incomplete_reason(path, verify=True, rank=ranks.rank)
        if reason is None:
            readable.append(path.name)
        else:
            warnings.append(f"warning: process {ranks.rank}: skipping checkpoint {path}: {reason}")
    views = all_gather((readable, warnings), ranks)
    for _, said in views:
        for line in said:
            warn(line)
    common = set.intersection(*(set(names) for names, _ in views))
    chosen = [path for path in candidates if path.name in common]
    if not chosen:
        raise InputError(f"--resume: {directory} holds no checkpoint that all {ranks.world} processes can read "
                         f"whole (found {len(candidates)}; see the warnings above)")
    path, failure, state = chosen[-1], None, None
    if path != candidates[-1]:
        warn(f"warning: resuming from {path.name}, the newest checkpoint every process can read")
    try:
        state = load_sharded_checkpoint(path, student, teacher, optimizer, scheduler, ranks)
    except InputError as e:
        failure = str(e)
    except Exception as e:
        failure = f"process {ranks.rank}: checkpoint {path}: {_load_error(e)}"
    failures = [f for f in all_gather(failure, ranks) if f]
    if failures:  # the others already hold that checkpoint's state: stop all, a line each
        raise InputError(f"--resume: {failures[0]}")
    return path, state


def rotate_checkpoints(directory: Path, keep: int, up_to_step: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints of steps <= ``up_to_step`` (keep 0:
    delete none); returns what was deleted. Checkpoints past ``up_to_step`` (a resumed run's
    damaged leftovers) are left to be overwritten when the run reaches them."""
    if keep <= 0:
        return []
    done = [p for p in complete_checkpoints(directory) if checkpoint_step(p) <= up_to_step]
    deleted = done[:-keep]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``path`` (metrics.jsonl) logged after ``step`` (a killed run's steps past its
    last checkpoint); returns how many were dropped. Rewritten atomically."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            row_step = None  # a line cut off by the kill
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


