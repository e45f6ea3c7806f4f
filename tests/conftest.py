"""Shared fixtures: the real data in ../shared/data/caopd (tests skip with a reason without it) and
its stand-ins for core tests: the shipped science example and synthetic tool-use rows."""
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


EXAMPLE_SCIENCE = Path(__file__).resolve().parents[1] / "caopd" / "examples" / "arith_mc.jsonl"
TOOLS = ["get_weather", "search_books", "convert_currency", "list_files", "get_time", "translate"]


def synthetic_tooluse_rows(n: int = 10) -> list[dict]:
    """Tool-use rows in the format of the paper's ReAct data (a tool list, ``Begin!``, gold calls
    with JSON-string inputs, a written gold response); some calls take no arguments ("{}")."""
    rows = []
    for i in range(n):
        tool = TOOLS[i % len(TOOLS)]
        arguments = {} if i % 4 == 3 else {"query": f"item {i}", "limit": i % 3 + 1}
        prompt = ("Answer the question using the tools below.\nTools:\n"
                  + "\n".join(f"- {t}: takes a JSON object" for t in TOOLS)
                  + "\nUse the format:\nThought: ...\nAction: the tool name\nAction Input: a JSON object"
                  + f"\n\nBegin!\nQuestion: task {i} needs {tool}")
        call = {"Action": tool, "Action_Input": json.dumps(arguments)}
        response = [f"Thought: task {i} needs {tool}.", f"Action: {tool}", f"Action Input: {json.dumps(arguments)}"]
        rows.append({"id": i, "prompt": prompt, "golden_answer": [call], "golden_response": response})
    return rows


@pytest.fixture
def science_rows_path() -> Path:
    """Science-format rows shipped with the package (arithmetic multiple choice): core tests use
    these, so they never skip without ../shared."""
    return EXAMPLE_SCIENCE


@pytest.fixture
def tooluse_rows_path(tmp_path) -> Path:
    """Synthetic tool-use rows written for the test (core tests never skip without ../shared)."""
    return write_jsonl(tmp_path / "tooluse_rows.jsonl", synthetic_tooluse_rows())


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
