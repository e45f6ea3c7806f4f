"""Many processes: joining the process group, which share of a step a process owns, small collectives.

A run launched by ``torchrun`` or ``accelerate launch`` (WORLD_SIZE > 1) joins the process group with
a timeout (``--distributed-timeout-minutes``): NCCL on GPUs, gloo on CPUs, and both where FSDP2
offloads shards to host memory (``cpu:gloo,cuda:nccl``): collectives on host tensors (a gradient
norm over offloaded shards) then run on gloo instead of failing with "no backend for device cpu".

Each process owns whole prompts (all K rollouts: P_acc stays local), a contiguous slice of the
step's prompts; rollouts are seeded per prompt index in the step (``SamplingParams.first_prompt``),
so 1 or N processes sample the same completions, and the loss is normalized by the global number
of sequences, so the summed gradient is the one-process gradient. Sharding the models is
caopd.training.fsdp's; moving weights between shards and whole tensors, caopd.training.weight_stream's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from caopd.errors import InputError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    backend: str = ""  # the process group's, when there is one

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(cuda: bool, cpu_offload: bool, choice: str = "auto") -> str:
    """The process group's backend: per device type where host tensors meet collectives."""
    if choice == "gloo":
        return "gloo"
    if cuda:
        return "cpu:gloo,cuda:nccl" if cpu_offload else "nccl"
    return "cpu:gloo" if cpu_offload else "gloo"


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(timeout_minutes: float = 30.0, cpu_offload: bool = False, backend: str = "auto",
                       fsdp: bool = False) -> Ranks:
    """The process's rank and the world size; joins the process group under a multi-process launch (and
    under any launch with ``fsdp``: FSDP2 needs one, even of one process). Process i of a node uses
    GPU i (modulo the GPUs there: processes may share one, with gloo)."""
    if fsdp and "RANK" not in os.environ:
        raise InputError("--fsdp true runs under a launcher that starts one process a GPU: torchrun "
                         "--nproc_per_node N -m caopd train ... (or accelerate launch --config_file "
                         "caopd/configs/accelerate/fsdp2-1node-8gpu.yaml -m caopd train ...)")
    if launched_processes() == 1 and not fsdp:
        return Ranks()
    import torch.distributed as dist

    global _JOINED
    backend = backend_for(torch.cuda.is_available(), cpu_offload, backend)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        _JOINED = True
    else:
        backend = str(dist.get_backend())
    return Ranks(dist.get_rank(), dist.get_world_size(), backend)


_JOINED = False  # this module joined the process group (and leaves it)


def leave_process_group() -> None:
    """Leave the process group joined by join_process_group, every process together: a process that
    exits while another still talks to it aborts ("terminate called without an active exception")."""
    global _JOINED
    import torch.distributed as dist

    if _JOINED and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _JOINED = False


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
