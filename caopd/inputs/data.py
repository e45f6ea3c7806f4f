"""Dataset rows as typed ``Example`` objects, from JSON Lines or a saved Hugging Face dataset dir.

JSON Lines: one object a line (the rows of the paper's evaluation sets). A directory: what
``datasets.Dataset.save_to_disk`` writes (``state.json`` + Arrow stream files), as published
with the paper's code (``data/science_data/eval_data``, ``data/tooluse_data/train_data``, ...);
a ``DatasetDict`` directory needs ``split=``. An example's id is its ``id`` field when present,
else its 0-based row index. Every error names the file and the line (or row) and the field.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caopd.errors import InputError
from caopd.scoring.verifiers import get_task, gold_tool_call


@dataclass(frozen=True)
class Example:
    """One dataset row. prompt: plain text or chat messages [{role, content}, ...];
    gold: science: the answer letter, tooluse: the list of gold calls;
    demonstration: a written gold response (training splits), else None."""

    id: int
    prompt: str | list[dict]
    gold: Any
    demonstration: str | None
    source: str


def _check_messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: field {field!r} must be a non-empty list of chat messages")
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise InputError(f"{where}: field {field!r} has a message without string 'role' and 'content'")
    return value


def _require(row: dict, field: str, where: str) -> Any:
    if field not in row:
        raise InputError(f"{where}: missing field {field!r} (fields present: {', '.join(sorted(row))})")
    return row[field]


def _science(row: dict, where: str) -> tuple[Any, Any, str | None]:
    field = "prompt" if "prompt" in row else "messages"
    prompt = _check_messages(_require(row, field, where), where, field)
    gold = _require(row, "answer", where)
    if not isinstance(gold, str) or not gold.strip():
        raise InputError(f"{where}: field 'answer' must be a non-empty string, got {gold!r}")
    demo = row.get("output_text")
    if demo is not None and not isinstance(demo, str):
        raise InputError(f"{where}: field 'output_text' must be a string")
    return prompt, gold.strip(), demo


def _tooluse(row: dict, where: str) -> tuple[Any, Any, str | None]:
    prompt = _require(row, "prompt", where)
    if not isinstance(prompt, str):
        raise InputError(f"{where}: field 'prompt' must be a string")
    gold = _require(row, "golden_answer", where)
    if not isinstance(gold, list) or not gold:
        raise InputError(f"{where}: field 'golden_answer' must be a non-empty list of calls")
    for i, call in enumerate(gold):
        if not (isinstance(call, dict) and isinstance(call.get("Action"), str)
                and isinstance(call.get("Action_Input"), (str, dict))):
            raise InputError(f"{where}: field 'golden_answer[{i}]' needs a string 'Action' and an "
                             "'Action_Input' (JSON string or object)")
    try:
        gold_tool_call(gold[0])
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: field 'golden_answer[0].Action_Input' is not valid JSON ({e.msg})") from None
    demo = row.get("golden_response")
    if isinstance(demo, list) and all(isinstance(line, str) for line in demo):
        demo = "\n".join(demo)
    elif demo is not None and not isinstance(demo, str):
        raise InputError(f"{where}: field 'golden_response' must be a string or a list of strings")
    return prompt, gold, demo


_SCHEMAS = {"science": _science, "tooluse": _tooluse}


def iter_jsonl(path: Path, cut_last_line=None) -> Iterator[tuple[dict, str]]:
    """(object, "file:line") for each non-blank line; a malformed line is an InputError naming it.
    ``cut_last_line``: called with "file:line" of a last line cut off mid-write (no newline at its end,
    not JSON: a crash, a full disk), which is then skipped; without it that line is an error too."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            cut = cut_last_line is not None and not raw.endswith(b"\n")  # only a last line lacks one
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if cut:
                    cut_last_line(where)
                    return
                raise InputError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if cut:
                    cut_last_line(where)
                    return
                raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield row, where


def _arrow_rows(path: Path, split: str | None) -> Iterator[tuple[dict, str]]:
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise InputError(f"{path}: a DatasetDict with splits {splits}; choose one with split=")
        path = path / split
    state_file = path / "state.json"
    if not state_file.exists():
        raise InputError(f"{path}: not a saved Hugging Face dataset (no state.json) and not a file")
    files = [path / f["filename"] for f in json.loads(state_file.read_text())["_data_files"]]
    index = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        for row in table.to_pylist():
            yield row, f"{path} row {index}"
            index += 1


def load_examples(path: str | Path, dataset: str, split: str | None = None) -> list[Example]:
    """All examples of ``path`` (JSON Lines file or saved dataset dir) for task ``dataset``."""
    get_task(dataset)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not (path.is_dir() or path.is_file()):  # a FIFO would block, /dev/zero never end
        raise InputError(f"{path}: not a regular file or a folder (a FIFO or a device is not read)")
    rows = _arrow_rows(path, split) if path.is_dir() else iter_jsonl(path)
    schema = _SCHEMAS[dataset]
    examples: list[Example] = []
    seen: dict[int, str] = {}
    for index, (row, where) in enumerate(rows):
        example_id = row.get("id", index)
        if not isinstance(example_id, int) or isinstance(example_id, bool):
            raise InputError(f"{where}: field 'id' must be an integer, got {example_id!r}")
        if example_id in seen:
            raise InputError(f"{where}: id {example_id} already used at {seen[example_id]}")
        seen[example_id] = where
        prompt, gold, demo = schema(row, where)
        examples.append(Example(example_id, prompt, gold, demo, where))
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples
