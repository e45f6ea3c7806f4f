"""Task verifiers: did a completion get the right answer? One small function per dataset.

``TASKS[name].check(completion, gold) -> Verdict`` (correct, and why not when wrong);
``TASKS[name].verify`` is its boolean; ``TASKS[name].render_answer(gold) -> str`` writes the gold
answer the way a completion would (used for demonstrations and for tests that a gold answer
verifies). Completions are untrusted text: they are scanned in time linear in their length and
parsed (regex, ``json``), never evaluated; any failure to parse is a wrong answer with a reason
(``WRONG_REASONS``), never an exception.

Tool-call arguments are compared as JSON values: objects by keys and values, arrays in order,
``true``/``false`` never equal to a number (Python's ``True == 1`` is not JSON's), and numbers by
value, so ``3.0`` equals ``3`` (JSON has one number type). A call with no ``Action Input``, or with
``none``, ``null`` or an empty input, has the empty arguments ``{}``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from caopd.errors import InputError

_ANSWER_TAGS = re.compile(r"<(/?)answer>", re.IGNORECASE)
_ACTION = re.compile(r"\bAction\s*:[ \t]*([^\n]*)")
_ACTION_INPUT = re.compile(r"\bAction[ _]Input\s*:\s*")
_NO_ARGUMENTS = re.compile(r"(?:none|null)?\s*(?:\n|$)", re.IGNORECASE)

# Why a wrong answer is wrong (caopd eval counts them).
WRONG_REASONS = ("no answer", "wrong answer", "no call", "malformed call", "over-deep call", "over-long call",
                 "wrong call")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str | None = None  # one of WRONG_REASONS when not correct


def last_answer(completion: str) -> str | None:
    """What ``re.findall(r"<answer>(.*?)</answer>")[-1]`` gives (each open tag pairs with the first
    close tag after it, matches do not overlap), in one pass over the tags instead of a lazy scan
    to the end of the text from every unclosed tag."""
    answer, opened_at = None, None
    for tag in _ANSWER_TAGS.finditer(completion):
        if tag.group(1) and opened_at is not None:
            answer, opened_at = completion[opened_at:tag.start()], None
        elif not tag.group(1) and opened_at is None:
            opened_at = tag.end()
    return answer


def check_science(completion: str, gold: str) -> Verdict:
    """Correct when the last ``<answer>X</answer>`` equals the gold letter (case-insensitive)."""
    answer = last_answer(completion)
    if answer is None:
        return Verdict(False, "no answer")
    if answer.strip().upper() != gold.strip().upper():
        return Verdict(False, "wrong answer")
    return Verdict(True)


def verify_science(completion: str, gold: str) -> bool:
    return check_science(completion, gold).correct


def render_science(gold: str) -> str:
    return f"<answer>\n{gold}\n</answer>"


class ToolCallError(ValueError):
    """Model text that is not a tool call; ``reason`` is one of WRONG_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _empty_if_none(arguments: Any) -> Any:
    return {} if arguments is None else arguments


MAX_JSON_DEPTH = 64  # deeper arguments are refused, whatever sys.getrecursionlimit() another library set


def _json_depth(text: str, start: int) -> int:
    """Nesting depth of the JSON value at ``start`` (0 for a scalar), scanning only until that value
    closes or the depth passes MAX_JSON_DEPTH: linear, and independent of the recursion limit that
    json's parser would otherwise hit (imported libraries raise it)."""
    depth = deepest = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
        elif c in "]}":
            depth -= 1
            if depth <= 0:
                break
        elif depth == 0 and not c.isspace():
            break  # a scalar
    return deepest


def parse_tool_call(completion: str) -> tuple[str, Any]:
    """The first ``Action:`` name and the JSON value after the next ``Action Input:`` ({} when
    there is none, or it says none/null/nothing). Raises ToolCallError when there is no call or
    its input is malformed JSON, nested deeper than MAX_JSON_DEPTH, or holds a number
    over Python's integer-digit limit."""
    action = _ACTION.search(completion)
    if action is None:
        raise ToolCallError("no call", "no 'Action:' line")
    name = action.group(1).strip()
    start = _ACTION_INPUT.search(completion, action.end())
    if start is None or _NO_ARGUMENTS.match(completion, start.end()):
        return name, {}
    if _json_depth(completion, start.end()) > MAX_JSON_DEPTH:
        raise ToolCallError("over-deep call", f"JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        arguments, _ = json.JSONDecoder().raw_decode(completion, start.end())
    except json.JSONDecodeError as e:
        raise ToolCallError("malformed call", e.msg) from None
    except RecursionError:
        raise ToolCallError("over-deep call", "JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise ToolCallError("over-long call", str(e)) from None
    return name, _empty_if_none(arguments)


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: booleans are not numbers, numbers compare by value (3.0 == 3)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def gold_tool_call(call: dict) -> tuple[str, Any]:
    """(name, parsed arguments) of a gold ``{"Action": ..., "Action_Input": json-or-dict}``."""
    arguments = call["Action_Input"]
    if isinstance(arguments, str):
        text = arguments.strip()
        arguments = {} if text.lower() in ("", "none") else json.loads(text)  # JSON null: None, then {}
    return call["Action"].strip(), _empty_if_none(arguments)


def check_tooluse(completion: str, gold: list[dict]) -> Verdict:
    """Correct when the first tool call equals the first gold call (arguments as JSON values)."""
    try:
        name, arguments = parse_tool_call(completion)
    except ToolCallError as e:
        return Verdict(False, e.reason)
    gold_name, gold_arguments = gold_tool_call(gold[0])
    if name != gold_name or not same_json(arguments, gold_arguments):
        return Verdict(False, "wrong call")
    return Verdict(True)


def verify_tooluse(completion: str, gold: list[dict]) -> bool:
    return check_tooluse(completion, gold).correct


def render_tooluse(gold: list[dict]) -> str:
    name, arguments = gold_tool_call(gold[0])
    return f"Action: {name}\nAction Input: {json.dumps(arguments)}"


@dataclass(frozen=True)
class Task:
    name: str
    check: Callable[[str, Any], Verdict]
    render_answer: Callable[[Any], str]

    def verify(self, completion: str, gold: Any) -> bool:
        return self.check(completion, gold).correct


TASKS: dict[str, Task] = {
    "science": Task("science", check_science, render_science),
    "tooluse": Task("tooluse", check_tooluse, render_tooluse),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
