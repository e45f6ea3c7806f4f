"""The student and its EMA teacher sharded by PyTorch FSDP2 across the processes of a launch.

What each process holds: its shards of the student (fp32 master weights), of the teacher (fp32 or
bf16, ``--teacher-dtype``), of the gradients and of Adam's moments; during a forward, the layer in
flight and the root (both models' embeddings, final norms and lm_heads) gathered. Never a whole
model, except on the main process while it loads:

- **Load**: every process builds both models on the meta device and shards them (``fully_shard`` per
  decoder layer, then one root over both models' remaining parameters, so the fused loss, which
  multiplies the final hidden states by the lm_head weight outside the model's forward, runs
  inside the root's forward where FSDP2 has gathered that weight and reduce-scatters its
  gradient). The main process reads the weights once and broadcasts them tensor by tensor into
  the shards (caopd.training.weight_stream); the teacher is copied from the student's shards (a
  ``--teacher-model`` is read and broadcast into its own shards the same way; a ``--teacher-server``
  teacher is not built at all).
- **Rollouts**: the transformers engine generates with the sharded student itself, through the
  root (FSDP2 gathers layer by layer), with ``synced_gpus``: a process whose completions end early
  keeps stepping the collectives until every process is done. vLLM receives whole tensors one at a
  time (``weights``).
- **Saving**: checkpoints are each process's own shards (caopd.training.checkpoint); ``final/`` is
  written by the main process from whole tensors gathered one at a time.

The teacher's shards line up with the student's, so the EMA is a local lerp of shards.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from caopd.config import TrainConfig
from caopd.engines.base import WeightStream
from caopd.errors import InputError
from caopd.modeling.models import (
    apply_liger_kernels,
    build_model,
    describe_model,
    ema_update_,
    load_model,
    model_config,
)
from caopd.training import checkpoint
from caopd.training.distributed import Ranks
from caopd.training.optim import clip_grad_norm_fp64
from caopd.training.streamed_safetensors import write_model_folder
from caopd.training.weight_stream import (
    broadcast_into_shards,
    copy_shards,
    full_tensors,
    tensor_specs,
    weight_stream,
)


class DistillationModels(torch.nn.Module):
    """Student and teacher under one FSDP2 root: ``forward(fn, *args)`` runs ``fn(student, teacher,
    *args)`` with the root's parameters gathered (the loss, or a generation)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None):
        super().__init__()
        self.student, self.teacher = student, teacher

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.student, self.teacher, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = getattr(model, model.base_model_prefix)
    if not hasattr(decoder, "layers"):
        raise InputError(f"--fsdp: {type(model).__name__} has no decoder layers at .{model.base_model_prefix}.layers "
                         f"to shard")
    return list(decoder.layers)


def shard(student: torch.nn.Module, teacher: torch.nn.Module | None, *, bf16: bool, cpu_offload: bool,
          on_gpu: bool) -> DistillationModels:
    """FSDP2 over both models: per decoder layer, then the root; bf16 compute over the shards with
    fp32 gradient reduction when ``bf16``. ``cpu_offload``: shards, gradients and optimizer states
    in host memory (pinned on GPUs)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=on_gpu) if cpu_offload else OffloadPolicy()
    options = dict(mp_policy=precision, offload_policy=offload)
    for model in (student, teacher):  # teacher None: a served one
        for layer in decoder_layers(model) if model is not None else ():
            fully_shard(layer, **options)
    both = DistillationModels(student, teacher)
    fully_shard(both, **options)
    return both


def grad_norm_and_clip(parameters: list[torch.nn.Parameter], max_norm: float, device: torch.device) -> float:
    """The global gradient norm (over every shard, in fp64), and clip to ``max_norm``."""
    import torch.distributed as dist

    def all_reduce(local_squares: float) -> float:
        total = torch.tensor(local_squares, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return float(total)

    return clip_grad_norm_fp64(parameters, max_norm, all_reduce)


class ShardedModels:
    """The FSDP2 placement (see the module docstring)."""

    def __init__(self, config: TrainConfig, tokenizer, ranks: Ranks, *, use_bf16: bool, cpu_offload: bool,
                 make_optimizer: Callable):
        on_gpu = torch.cuda.is_available()
        self.ranks = ranks
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.save_dtype = torch.bfloat16 if use_bf16 else torch.float32
        teacher_dtype = torch.bfloat16 if config.teacher_dtype == "bf16" else torch.float32
        self.model_config = model_config(config.model, tokenizer)
        # a --teacher-model (its own shape) or a --teacher-server (none here): frozen, not saved
        self.frozen_teacher = bool(config.teacher_model or config.teacher_server)
        teacher_config = model_config(config.teacher_model, tokenizer, "--teacher-model") if config.teacher_model \
            else self.model_config
        with torch.device("meta"):
            student = build_model(self.model_config, attn_implementation=config.attn_implementation)
            teacher = None if config.teacher_server else \
                build_model(teacher_config, dtype=teacher_dtype, attn_implementation=config.attn_implementation)
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        if config.liger_kernels:
            apply_liger_kernels(student)
            if teacher is not None:
                apply_liger_kernels(teacher)
        if config.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        self.both = shard(student, teacher, bf16=use_bf16, cpu_offload=cpu_offload, on_gpu=on_gpu)
        self.both.to_empty(device=self.device)
        # the main process reads the weights once (in the compute precision) and broadcasts them
        source = load_model(config.model, tokenizer, dtype=self.save_dtype,
                            attn_implementation=config.attn_implementation, seed=config.seed) if ranks.is_main else None
        self.generation_config = source.generation_config if source is not None else None
        broadcast_into_shards(student, source, self.device, self.save_dtype)
        del source
        if config.teacher_model:  # read once by the main process, broadcast into the teacher's shards likewise
            source = load_model(config.teacher_model, tokenizer, dtype=teacher_dtype,
                                attn_implementation=config.attn_implementation, seed=config.seed + 1,
                                flag="--teacher-model") if ranks.is_main else None
            broadcast_into_shards(teacher, source, self.device, teacher_dtype)
            del source
        elif teacher is not None:
            copy_shards(teacher, student)
        self.student, self.teacher = student, teacher
        self.optimizer = make_optimizer(student)

    def loss(self, loss_fn: Callable, batch, options: dict, share: float) -> float:
        """Forward and backward of one micro-batch, its loss weighted by ``share`` of the step's
        sequences. FSDP2 averages the processes' gradients: each adds its share of the sum."""
        loss, _ = self.both(lambda student, teacher: _as_tuple(loss_fn(student, teacher, batch, **options)))
        (loss * share * self.ranks.world).backward()
        return loss.item()

    def clip_and_step(self, max_norm: float) -> float:
        norm = grad_norm_and_clip(list(self.student.parameters()), max_norm, self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def update_teacher(self, alpha: float) -> None:
        if not self.frozen_teacher:
            ema_update_(self.teacher, self.student, alpha)

    def generate(self, fn: Callable[[torch.nn.Module], object]):
        """``fn(student)`` through the root, every process together (a generation)."""
        return self.both(lambda student, teacher: fn(student))

    def generation_engine(self, tokenizer, own_copy: bool, prompts_per_batch: int | None = None):
        from caopd.engines.hf import TransformersEngine

        if own_copy:
            raise InputError("--async-rollouts with --fsdp: the transformers engine generates with the sharded "
                             "model, whose gathers cannot run while the step trains; use synchronous rollouts")
        return TransformersEngine(self.student, tokenizer, live=True, run=self.generate,
                                 synced=self.ranks.world > 1, prompts_per_batch=prompts_per_batch)

    def weights(self, dtype: torch.dtype | None = None) -> WeightStream:
        """Whole tensors, gathered one at a time on every process (a collective)."""
        return weight_stream(self.student, self.device, dtype)

    def save_final(self, directory: Path, tokenizer) -> None:
        """``from_pretrained`` weights (bf16 on GPUs), gathered tensor by tensor; the main process writes."""
        tensors = (t for _, t in full_tensors(self.student, self.device, self.save_dtype))
        write_model_folder(directory, tensor_specs(self.student, self.save_dtype), tensors, write=self.ranks.is_main,
                           finish=lambda tmp: describe_model(tmp, self.student, self.generation_config, tokenizer,
                                                             self.save_dtype))

    def save_checkpoint(self, directory: Path, state, scheduler, config: dict) -> Path:
        return checkpoint.save_sharded_checkpoint(directory, state, self.student, self.saved_teacher, self.optimizer,
                                                  scheduler, config, self.ranks)

    def resume(self, directory: Path, scheduler, warn) -> tuple[Path, checkpoint.TrainState]:
        return checkpoint.resume(directory, self.student, self.saved_teacher, self.optimizer, scheduler, warn=warn,
                                 ranks=self.ranks)

    @property
    def saved_teacher(self) -> torch.nn.Module | None:
        return None if self.frozen_teacher else self.teacher



def _as_tuple(result) -> tuple[torch.Tensor, int]:
    return result.loss, result.counted_tokens  # a tuple: FSDP2 hooks the backward of the loss tensor
