"""Weights between FSDP2 shards and whole tensors, one tensor at a time.

Out of the shards (``full_tensors``): each parameter, a DTensor, is moved to its compute device
and all-gathered, yielded as ``(name, whole tensor)``, and dropped by the consumer before the next
is gathered, so a process holds its shards plus one whole tensor (TRL's vLLM sync and verl's
weight generator work this way). This is a collective: every process iterates the same tensors in
the same order, including the ones that only consume and discard them.

Into the shards (``broadcast_into_shards``): the main process reads the weights once (a
``from_pretrained`` model, or seeded random weights); tensor by tensor it broadcasts the whole
tensor, every process keeps its slice, and the main process frees its copy of that tensor (as
accelerate's and verl's FSDP2 loaders do). Host memory at load is then one model on the main
process and a shard plus one tensor in flight on the others. Non-persistent buffers (rotary
frequencies) travel too: the sharded model was built on the meta device, where they are empty.

Names are the model's own (``model.layers.0.self_attn.q_proj.weight``): what ``from_pretrained``,
vLLM's ``load_weights`` and safetensors readers expect. Tied weights appear once, under their first
name, as ``save_pretrained`` writes them.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from caopd.training.streamed_safetensors import TensorSpec


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly sharded) tensor."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def whole(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every process calls it). A shard offloaded to
    host memory is moved to the compute device first, so the gather runs on that device's backend."""
    if not is_sharded(tensor):
        return tensor
    if tensor.device != device:
        tensor = tensor.to(device)
    return tensor.full_tensor()


def saved_tensors(model: torch.nn.Module, tied_once: bool = True) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's state: parameters and persistent buffers. ``tied_once``: a tied
    tensor once, under its first name, as ``save_pretrained`` writes it; otherwise under each of its
    names, as an inference engine loads it (vLLM's in-place reload leaves a tied lm_head unloaded
    without its own name). Sharded tensors stay sharded (nothing is gathered)."""
    seen, out = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen or not tied_once:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def tensor_specs(model: torch.nn.Module, dtype: torch.dtype | None = None, tied_once: bool = True) -> list[TensorSpec]:
    """The specs of ``saved_tensors`` (whole shapes), floating-point ones saved as ``dtype`` when given."""
    return [TensorSpec.of(name, t, dtype if dtype is not None and t.is_floating_point() else None)
            for name, t in saved_tensors(model, tied_once)]


def full_tensors(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None,
                 tied_once: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of ``saved_tensors``, gathered one at a time on ``device`` (cast to ``dtype``
    when given). The consumer must drop each tensor before asking for the next."""
    with torch.no_grad():
        for name, tensor in saved_tensors(model, tied_once):
            full = whole(tensor.detach(), device)
            if dtype is not None and full.is_floating_point():
                full = full.to(dtype)
            yield name, full
            del full


def weight_stream(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None):
    """The model's weights for an inference engine: every name (tied tensors under each), whole
    tensors gathered one at a time on each pass."""
    from caopd.engines.base import WeightStream

    specs = [(s.name, s.shape, s.dtype) for s in tensor_specs(model, dtype, tied_once=False)]
    return WeightStream(specs, lambda: full_tensors(model, device, dtype, tied_once=False), model.config)


def _loaded_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter (tied ones once) and every buffer, persistent or not, in module order."""
    return [*model.named_parameters(), *model.named_buffers()]


@torch.no_grad()
def broadcast_into_shards(target: torch.nn.Module, source: torch.nn.Module | None, device: torch.device,
                          dtype: torch.dtype) -> None:
    """Fill ``target`` (FSDP2-sharded, materialized but uninitialized) from ``source``, a whole model
    of the same architecture that only the main process holds (None elsewhere). Each tensor is
    broadcast in ``dtype`` (floating point; the load dtype), sliced into this process's shard, and
    freed on the main process once sent."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    main = dist.get_rank() == 0
    entries = _loaded_tensors(target)
    sources = dict(_loaded_tensors(source)) if main else {}
    if main and set(sources) != {name for name, _ in entries}:
        missing = sorted({name for name, _ in entries} ^ set(sources))[:5]
        raise ValueError(f"the loaded model's tensors differ from the sharded model's: {missing}")
    for name, tensor in entries:
        wire = dtype if tensor.is_floating_point() else tensor.dtype
        if main:
            full = sources.pop(name).detach().to(device, wire)
        else:
            full = torch.empty(tensor.shape, dtype=wire, device=device)
        dist.broadcast(full, src=0)
        if is_sharded(tensor):
            part = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
            local(tensor).copy_(part)
        else:
            tensor.copy_(full)
        del full
        if main:
            _free(source, name)


def _free(model: torch.nn.Module, name: str) -> None:
    """Drop the storage of ``model``'s parameter or buffer ``name`` (the main process's loaded copy)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = getattr(module, attribute)
    if isinstance(value, torch.nn.Parameter):
        value.data = torch.empty(0, dtype=value.dtype, device=value.device)


@torch.no_grad()
def copy_shards(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """target <- source, shard by shard (two models sharded alike: the teacher from the student)."""
    for (name, t), (other, s) in zip(_loaded_tensors(target), _loaded_tensors(source), strict=True):
        if name != other:
            raise ValueError(f"the models differ: {name} vs {other}")
        local(t).copy_(local(s))
