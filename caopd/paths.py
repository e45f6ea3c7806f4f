"""Checks on the paths a command is given, made before any work: one line naming the path.

A model or tokenizer name that looks like a path (absolute, ``./``, ``../``, ``~``, or more than one
``/``: a hub id is ``owner/name``) must exist, so a typo is an error at once instead of a hub
lookup that fails after a network timeout. Output files and folders are checked to be writable
before anything is computed, so a wrong ``--output`` never throws away a finished run or scoring.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from caopd.errors import InputError


def data_path(text: str) -> Path:
    """A --data value as a path: ``caopd:<file>`` is a file shipped in the package (train and eval alike)."""
    if text.startswith("caopd:"):
        from importlib import resources

        return Path(str(resources.files("caopd") / text.removeprefix("caopd:")))
    return Path(text)


def looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (a hub id is ``name`` or ``owner/name``)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or "\\" in name
            or name.count("/") > 1 or name.endswith("/"))


def check_local_source(name: str, flag: str) -> None:
    """A ``--model``/``--tokenizer`` value that looks like a path must be an existing folder or file;
    a ``random:`` model a known size or a readable config.json."""
    from caopd.modeling.model_shapes import RANDOM_PREFIX, is_random, shape_values

    if is_random(name):
        shape_values(name.removeprefix(RANDOM_PREFIX))
        return
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise InputError(f"{flag} {name}: no such file or directory (a hub id has the form owner/name)")


def _probe_writable(folder: Path, label: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".caopd-write-test-"):
            pass
    except OSError as e:
        raise InputError(f"{label}: cannot write there ({e.strerror or e})") from None


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    """``path`` as a writable folder (created if missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a folder")
    _probe_writable(path, f"{flag} {path}")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file that can be written (its folder created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path}: the file is not writable")
    _probe_writable(path.parent, f"{flag} {path}")
    return path
