"""Shared fixtures: the real data in ../shared/data/caopd (tests skip with a reason without it)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

# Triton kernels run under the interpreter on machines without CUDA; it must be set before triton loads.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "caopd"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it lives in ../shared, beside the checkout)")
    return path


@pytest.fixture
def science_path() -> Path:
    return shared_file("science_eval.jsonl")


@pytest.fixture
def tooluse_path() -> Path:
    return shared_file("tooluse_eval.jsonl")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class DeadlineExceeded(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging) when the block runs longer than ``seconds``: a guard against
    super-linear parsing, not a benchmark. SIGALRM interrupts a running regex match too."""
    def expire(*_):
        raise DeadlineExceeded(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
