"""Many processes: which share of a step a process owns, FSDP2 sharding, and the gathers the loop needs.

A run launched by ``torchrun`` or ``accelerate launch`` (WORLD_SIZE > 1) joins the process group
(NCCL on CUDA, gloo on CPU). With ``--fsdp true`` the student and the EMA teacher are sharded by
PyTorch's FSDP2 (``fully_shard``: each decoder layer, then a root holding both models' remaining
parameters — embeddings, final norm, lm_head), so the fused loss, which multiplies the final
hidden states by the lm_head weight outside the model's forward, runs inside the root's forward
(``DistillationModels``), where FSDP2 has gathered that weight and reduce-scatters its gradient.
The teacher's shards line up with the student's, so the EMA is a local lerp of shards, no gather.

Each process owns whole prompts (all K rollouts: P_acc stays local), a contiguous slice of the
step's prompts; rollouts are seeded per prompt index in the step (``SamplingParams.first_prompt``),
so 1 or N processes sample the same completions, and the loss is normalized by the global number
of sequences, so the summed gradient is the one-process gradient.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from caopd.errors import InputError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group() -> Ranks:
    """The process's rank and the world size; joins the process group under a multi-process launch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def rank_slice(count: int, ranks: Ranks) -> slice:
    """This process's contiguous share of a step's ``count`` prompts."""
    if count % ranks.world:
        raise InputError(f"--prompts-per-step {count} does not divide by the {ranks.world} processes: each "
                         f"process owns whole prompts; use a multiple of {ranks.world}")
    share = count // ranks.world
    return slice(ranks.rank * share, (ranks.rank + 1) * share)


def all_gather(value, ranks: Ranks) -> list:
    """[value of rank 0, rank 1, ...] (any JSON-like value); [value] in one process."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


class DistillationModels(torch.nn.Module):
    """Student and teacher under one FSDP2 root: ``forward(loss_fn, batch, **options)`` runs the
    loss (both models' forwards and the fused lm_head loss) with every parameter gathered."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module):
        super().__init__()
        self.student, self.teacher = student, teacher

    def forward(self, loss_fn, batch, **options) -> tuple[torch.Tensor, int]:
        result = loss_fn(self.student, self.teacher, batch, **options)
        return result.loss, result.counted_tokens  # a tuple: FSDP2 hooks the backward of the loss tensor


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = getattr(model, model.base_model_prefix)
    if not hasattr(decoder, "layers"):
        raise InputError(f"--fsdp: {type(model).__name__} has no decoder layers at .{model.base_model_prefix}.layers "
                         f"to shard")
    return list(decoder.layers)


def shard(student: torch.nn.Module, teacher: torch.nn.Module, *, bf16: bool, cpu_offload: bool) -> DistillationModels:
    """FSDP2 over both models: per decoder layer, then the root; bf16 compute over fp32 shards with
    fp32 gradient reduction when ``bf16`` (master weights, Adam moments and the EMA stay fp32)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    options = dict(mp_policy=precision, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for model in (student, teacher):
        for layer in decoder_layers(model):
            fully_shard(layer, **options)
    both = DistillationModels(student, teacher)
    fully_shard(both, **options)
    return both


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole weights on every process (a collective: every process calls it)."""
    return {name: _full(value.detach()) for name, value in model.state_dict().items()}


def grad_norm_and_clip(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global gradient norm (over every shard), and clip to ``max_norm``."""
    total = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return float(_full(total))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly sharded) tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
