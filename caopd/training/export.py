"""``caopd export``: a run's checkpoint as a ``from_pretrained`` folder, so a mid-run model can be evaluated.

A checkpoint of one process holds the student whole (``model.safetensors``); one of N processes
holds N files of shards (``model.rankRRRRR-of-NNNNN.safetensors``: each tensor's torch.chunk along
dim 0, in rank order, with the whole shapes in the files' metadata). Either way the student is
written out a tensor at a time (a sharded tensor joined from its N pieces), as ``final/`` is, with
the checkpoint's config.json and the run's tokenizer: one process, one whole tensor in memory.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from caopd.errors import InputError
from caopd.training.checkpoint import SHARDING, TRAINER_STATE, checkpoints, incomplete_reason
from caopd.training.streamed_safetensors import TensorSpec, write_model_folder

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def find_checkpoint(run: Path, step: int | None) -> Path:
    """The newest complete checkpoint of ``run`` (a run folder), or the one of ``step``; one line otherwise."""
    found = checkpoints(run / "checkpoints")
    if not found:
        raise InputError(f"{run}: no checkpoints/step-NNNNNN folders (is it a caopd train --output-dir?)")
    if step is not None:
        chosen = [p for p in found if p.name == f"step-{step:06d}"]
        if not chosen:
            raise InputError(f"--checkpoint {step}: {run / 'checkpoints'} has steps "
                             f"{', '.join(str(int(p.name[5:])) for p in found)}")
        found = chosen
    for path in reversed(found):
        if incomplete_reason(path, verify=True) is None:
            return path
    raise InputError(f"{run}: no complete checkpoint ({found[-1].name}: {incomplete_reason(found[-1], verify=True)})")


def _pieces(path: Path, world: int) -> tuple[list[Path], dict[str, list[int]] | None]:
    """The student's files, and (sharded) each tensor's whole shape."""
    if world == 1:
        return [path / "model.safetensors"], None
    from safetensors import safe_open

    files = [path / f"model.rank{r:05d}-of-{world:05d}.safetensors" for r in range(world)]
    with safe_open(str(files[0]), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("sharding") != SHARDING:
        raise InputError(f"{files[0]}: not a caopd sharded checkpoint file (no {SHARDING} metadata)")
    return files, json.loads(metadata["whole_shapes"])


def _tensors(files: list[Path], shapes: dict[str, list[int]] | None, names: list[str]) -> Iterator[torch.Tensor]:
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in files]
    for name in names:
        if shapes is None:
            yield handles[0].get_tensor(name)
            continue
        whole = torch.cat([h.get_tensor(name) for h in handles])  # torch.chunk pieces along dim 0, in rank order
        if list(whole.shape) != shapes[name]:
            raise InputError(f"{files[0].parent}: the pieces of {name} join to {list(whole.shape)}, not {shapes[name]}")
        yield whole


def export_checkpoint(run: str | Path, output: str | Path, step: int | None = None, dtype: str = "auto",
                      overwrite: bool = False) -> Path:
    """Write checkpoint ``step`` (default: the newest complete one) of ``run`` to ``output``."""
    from safetensors import safe_open

    run, output = Path(run), Path(output)
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder")
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists: choose another --output, or --overwrite to replace it")
    path = find_checkpoint(run, step)
    saved = json.loads((path / TRAINER_STATE).read_text())
    if saved.get("config", {}).get("lora_r"):
        raise InputError(f"{path} is a LoRA checkpoint (adapters only): its run's final/ holds them in peft's format, "
                         "and --merge-lora true writes final/merged")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json (written by caopd before this version): export needs it")
    files, shapes = _pieces(path, int(saved.get("world_size", 1)))
    out_dtype = DTYPES.get(dtype)
    specs = []
    with safe_open(str(files[0]), framework="pt") as f:
        for name in (list(shapes) if shapes is not None else list(f.keys())):
            piece = f.get_slice(name)
            kind = _TORCH_DTYPES[piece.get_dtype()]
            shape = shapes[name] if shapes is not None else piece.get_shape()
            specs.append(TensorSpec(name, tuple(shape), out_dtype if out_dtype and kind.is_floating_point else kind))
    names = [spec.name for spec in specs]

    def finish(folder: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        if out_dtype is not None:
            config["dtype"] = str(out_dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for extra in ("generation_config.json",):
            if (path / extra).is_file():
                shutil.copy(path / extra, folder / extra)
        tokenizer = run / "tokenizer"
        if tokenizer.is_dir():
            for item in tokenizer.iterdir():
                if item.is_file():
                    shutil.copy(item, folder / item.name)

    write_model_folder(output, specs, _tensors(files, shapes, names), finish=finish)
    return path


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
