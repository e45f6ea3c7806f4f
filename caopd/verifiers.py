"""Task verifiers: did a completion get the right answer? One small function per dataset.

``TASKS[name].verify(completion, gold) -> bool``; ``TASKS[name].render_answer(gold) -> str``
writes the gold answer the way a completion would (used for demonstrations and for tests that
a gold answer verifies). Completions are untrusted text: they are parsed (regex, ``json``),
never evaluated; malformed text is a wrong answer, not an exception.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from caopd.errors import InputError

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ACTION = re.compile(r"\bAction\s*:[ \t]*([^\n]*)")
_ACTION_INPUT = re.compile(r"\bAction[ _]Input\s*:\s*")


def verify_science(completion: str, gold: str) -> bool:
    """Correct when the last ``<answer>X</answer>`` equals the gold letter (case-insensitive)."""
    answers = _ANSWER_TAG.findall(completion)
    return bool(answers) and answers[-1].strip().upper() == gold.strip().upper()


def render_science(gold: str) -> str:
    return f"<answer>\n{gold}\n</answer>"


def parse_tool_call(completion: str) -> tuple[str, Any] | None:
    """The first ``Action:`` name and the JSON value after the next ``Action Input:``.

    None when either is missing or the JSON is malformed.
    """
    action = _ACTION.search(completion)
    if action is None:
        return None
    start = _ACTION_INPUT.search(completion, action.end())
    if start is None:
        return None
    try:
        arguments, _ = json.JSONDecoder().raw_decode(completion, start.end())
    except json.JSONDecodeError:
        return None
    return action.group(1).strip(), arguments


def gold_tool_call(call: dict) -> tuple[str, Any]:
    """(name, parsed arguments) of a gold ``{"Action": ..., "Action_Input": json-or-dict}``."""
    arguments = call["Action_Input"]
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    return call["Action"].strip(), arguments


def verify_tooluse(completion: str, gold: list[dict]) -> bool:
    """Correct when the first tool call equals the first gold call (JSON compared as objects)."""
    predicted = parse_tool_call(completion)
    return predicted is not None and predicted == gold_tool_call(gold[0])


def render_tooluse(gold: list[dict]) -> str:
    name, arguments = gold_tool_call(gold[0])
    return f"Action: {name}\nAction Input: {json.dumps(arguments)}"


@dataclass(frozen=True)
class Task:
    name: str
    verify: Callable[[str, Any], bool]
    render_answer: Callable[[Any], str]


TASKS: dict[str, Task] = {
    "science": Task("science", verify_science, render_science),
    "tooluse": Task("tooluse", verify_tooluse, render_tooluse),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
