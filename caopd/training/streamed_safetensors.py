"""Safetensors files and Hugging Face model folders written one tensor at a time.

A safetensors file is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte
offsets) and the tensors' bytes in order. The header depends only on the tensors' names, shapes and
dtypes, so it is written first, from ``TensorSpec``s, and each tensor's bytes follow as the tensor
arrives: the writer holds one tensor at a time, whatever the file's size. That is what lets a
sharded model be saved as whole tensors gathered one by one (caopd.training.weight_stream), and a
process write its shards of a checkpoint without a host copy of all of them.

``write_model_folder`` lays the files out as ``save_pretrained`` does: ``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` beyond ``max_shard_bytes``;
``from_pretrained`` loads either. Files are read back with safetensors' own readers.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
MAX_SHARD_BYTES = 5 * 10**9  # per file of a model folder (the hub's long-standing convention)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorSpec:
        """The spec of ``tensor`` (a DTensor's global shape), saved as ``dtype`` when given."""
        return cls(name, tuple(tensor.shape), dtype or tensor.dtype)


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    entries: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be written to safetensors")
        entries[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned


def fsync_file(path: Path) -> None:
    """Flush ``path`` (a file or folder) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: str | Path, specs: list[TensorSpec], tensors: Iterable[torch.Tensor],
                      metadata: dict[str, str] | None = None, digest=None) -> None:
    """Write ``tensors`` (in ``specs``' order, each of its spec's shape; cast to the spec's dtype)
    to ``path``, holding one at a time. The file is synced to disk before this returns. ``digest``: a
    hashlib object fed every byte written (the file's checksum without reading it back)."""
    header = _header(specs, metadata)
    update = digest.update if digest is not None else (lambda _: None)
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(header)), header):
            f.write(chunk)
            update(chunk)
        for spec, tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: got shape {tuple(tensor.shape)}, the header says {spec.shape}")
            data = tensor.detach().to("cpu", spec.dtype).contiguous().reshape(-1)
            view = memoryview(data.view(torch.uint8).numpy())
            f.write(view)
            update(view)
            del data, view
    fsync_file(Path(path))


def shard_plan(specs: list[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive specs grouped into files of at most ``max_shard_bytes`` (a larger tensor alone)."""
    files: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if files[-1] and size + spec.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(spec)
        size += spec.nbytes
    return files


def write_model_folder(directory: str | Path, specs: list[TensorSpec], tensors: Iterable[torch.Tensor],
                       write: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES,
                       finish: Callable[[Path], None] | None = None) -> None:
    """A ``from_pretrained`` folder of ``tensors`` (in ``specs``' order), written as ``directory.tmp``
    and renamed when whole. ``write=False`` (the other processes of a sharded save) consumes the
    tensors, so every process drives the same gathers, and writes nothing. ``finish(folder)``
    writes what goes beside the weights (config.json, the tokenizer) before the rename."""
    directory = Path(directory)
    tensors = iter(tensors)
    if not write:
        for _ in zip(specs, tensors, strict=True):
            pass
        return
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = shard_plan(specs, max_shard_bytes)
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    try:
        for name, file_specs in zip(names, files):
            write_safetensors(tmp / name, file_specs, _take(tensors, len(file_specs)))
    except OSError:  # a full disk: drive the remaining gathers, so the other processes finish theirs, then say so
        for _ in tensors:
            pass
        raise
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for name, file_specs in zip(names, files) for s in file_specs}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if finish is not None:
        finish(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def _take(tensors: Iterator[torch.Tensor], count: int) -> Iterator[torch.Tensor]:
    for _ in range(count):
        yield next(tensors)
