"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``step-000012`` written as ``step-000012.tmp`` and renamed when
complete, so a killed run never leaves a half-written checkpoint that looks whole. It holds the
student, the EMA teacher, optimizer, scheduler, RNG states and the data position.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done; the data position is step * prompts_per_step


def save_checkpoint(directory: Path, state: TrainState, student, teacher, optimizer, scheduler) -> Path:
    final = Path(directory) / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({
        "state": asdict(state),
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }, tmp / "checkpoint.pt")
    with open(tmp / "checkpoint.pt", "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    done = sorted(p for p in Path(directory).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(path: Path, student, teacher, optimizer, scheduler) -> TrainState:
    blob = torch.load(Path(path) / "checkpoint.pt", map_location="cpu", weights_only=False)
    student.load_state_dict(blob["student"])
    teacher.load_state_dict(blob["teacher"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    random.setstate(blob["rng"]["python"])
    np.random.set_state(blob["rng"]["numpy"])
    torch.set_rng_state(blob["rng"]["torch"])
    if blob["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return TrainState(**blob["state"])
