"""Where the student and the teacher live, chosen once per run: one object the loop talks to.

Two placements, one interface (``Models``), so the training loop never asks "is this FSDP?" or
"is this LoRA?":

- ``SingleProcessModels``: one process holds the student and its EMA teacher whole (accelerate puts
  them on the device, autocasts, clips); with LoRA, adapters over a frozen base, and the teacher the
  EMA of the adapters over the same base (caopd.training.lora), so the base is held once.
- ``ShardedModels`` (caopd.training.fsdp): FSDP2 across the processes of a launch; no process holds
  a whole model (the main process holds one while it loads).

Each loads the models, runs a micro-batch's forward and backward, clips and steps, updates the
teacher, hands the rollout engine its weights (a stream of whole tensors, one at a time), and
saves and resumes checkpoints and the final model.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from caopd.config import TrainConfig
from caopd.engines.base import WeightStream
from caopd.errors import InputError
from caopd.modeling.memory import check_vocabulary, check_weights_fit
from caopd.modeling.models import (
    apply_liger_kernels,
    check_teacher_tokenizer,
    describe_model,
    ema_update_,
    load_model,
)
from caopd.training import checkpoint
from caopd.training.distributed import Ranks
from caopd.training.optim import clip_grad_norm_fp64
from caopd.training.streamed_safetensors import write_model_folder
from caopd.training.weight_stream import full_tensors, tensor_specs, weight_stream


class Models(Protocol):
    student: torch.nn.Module  # the trained model (sharded under FSDP)
    teacher: torch.nn.Module | None  # None: a served teacher (--teacher-server)
    optimizer: torch.optim.Optimizer

    def loss(self, loss_fn: Callable, batch, options: dict, share: float) -> float:
        """Forward and backward of one micro-batch; its gradient weighted by ``share``. Returns the loss."""

    def clip_and_step(self, max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` (inf: none), step, free them; returns the gradient norm."""

    def update_teacher(self, alpha: float) -> None: ...

    def generation_engine(self, tokenizer, own_copy: bool, prompts_per_batch: int | None = None):
        """A transformers engine over the training weights (``own_copy``: a copy, for async rollouts),
        decoding ``prompts_per_batch`` prompts together."""

    def weights(self, dtype: torch.dtype | None = None) -> WeightStream:
        """Whole tensors, one at a time, for an engine with weights of its own (a tied tensor under
        each of its names)."""

    def save_checkpoint(self, directory: Path, state, scheduler, config: dict) -> Path: ...

    def resume(self, directory: Path, scheduler, warn) -> tuple[Path, checkpoint.TrainState]: ...

    def save_final(self, directory: Path, tokenizer) -> None:
        """The trained model as a ``from_pretrained`` folder (adapters, for LoRA)."""


def training_dtypes(config: TrainConfig, use_bf16: bool) -> tuple[torch.dtype, torch.dtype]:
    """(student, teacher) weight dtypes of one process. Without bf16 (CPU) the student is fp32; with
    bf16 it is fp32 master weights under bf16 autocast, or bf16 itself (master_weights bf16, stepped
    with stochastic rounding). The teacher, forward-only, is ``--teacher-dtype`` (a bf16 teacher
    follows the EMA by stochastic rounding)."""
    student = torch.float32 if not use_bf16 or config.master_weights == "fp32" else torch.bfloat16
    return student, torch.bfloat16 if config.teacher_dtype == "bf16" else torch.float32


def make_optimizer(config: TrainConfig, student: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; for bf16 weights the stochastic-rounding AdamW (plain bf16 steps round most updates away)."""
    trained = [p for p in student.parameters() if p.requires_grad]  # LoRA: the adapters only
    if trained[0].dtype == torch.bfloat16:
        from caopd.training.optim import StochasticRoundingAdamW

        return StochasticRoundingAdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)


def place_models(config: TrainConfig, tokenizer, ranks: Ranks, *, fsdp: bool, cpu_offload: bool) -> Models:
    """The run's placement, its models loaded (and sharded) and its optimizer made."""
    use_bf16 = config.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if not config.force:
        student_dtype, teacher_dtype = training_dtypes(config, use_bf16)
        # the EMA teacher: a copy of the student (with LoRA, adapters over the one base); or a model of its own
        # (counted as teacher=), or none here (served)
        ema_teacher = 0 if config.lora_r or config.teacher_model or config.teacher_server else teacher_dtype.itemsize
        check_weights_fit(config.model, student_dtype.itemsize + ema_teacher, ranks.world if fsdp else 1,
                          cuda=torch.cuda.is_available(), flags=(f" --gpus {ranks.world} --fsdp" if fsdp else ""),
                          teacher=config.teacher_model, teacher_bytes=teacher_dtype.itemsize)
    check_vocabulary(config.model, len(tokenizer))
    if config.teacher_model:
        check_vocabulary(config.teacher_model, len(tokenizer), "--teacher-model")
        check_teacher_tokenizer(config.teacher_model, tokenizer)
    if config.lora_r and (fsdp or config.rollout_engine != "transformers"):
        raise InputError("--lora-r works with one process and the transformers engine for now (not with --fsdp or "
                         f"--rollout-engine {config.rollout_engine})")
    if fsdp:
        from caopd.training.fsdp import ShardedModels

        return ShardedModels(config, tokenizer, ranks, use_bf16=use_bf16, cpu_offload=cpu_offload,
                             make_optimizer=lambda student: make_optimizer(config, student))
    return SingleProcessModels(config, tokenizer, use_bf16)


def load_teacher(config: TrainConfig, tokenizer, dtype: torch.dtype) -> torch.nn.Module:
    """``--teacher-model``: frozen, in eval mode, with the student's kernels (Liger's layers too)."""
    teacher = load_model(config.teacher_model, tokenizer, dtype=dtype, attn_implementation=config.attn_implementation,
                         seed=config.seed + 1, flag="--teacher-model")
    if config.liger_kernels:
        apply_liger_kernels(teacher)
    return teacher.requires_grad_(False).eval()


def _load_student(config: TrainConfig, tokenizer, dtype: torch.dtype) -> torch.nn.Module:
    student = load_model(config.model, tokenizer, dtype=dtype, attn_implementation=config.attn_implementation,
                         seed=config.seed)
    student.train()  # from_pretrained returns eval mode, where gradient checkpointing does nothing
    if config.liger_kernels:
        apply_liger_kernels(student)  # before the teacher is copied from it: it gets the same layers
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    return student


class _Accelerated:
    """accelerate's device placement, autocast, backward and clipping for one process."""

    def __init__(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer, use_bf16: bool):
        from accelerate import Accelerator

        self.accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not torch.cuda.is_available())
        self.raw_optimizer = optimizer  # a bf16 one holds its own fp32 gradients (and clips them)
        self.prepared, self.optimizer = self.accelerator.prepare(student, optimizer)
        self.student = self.accelerator.unwrap_model(self.prepared)

    def loss(self, loss_fn: Callable, teacher, batch, options: dict, share: float) -> float:
        with self.accelerator.autocast():
            loss = loss_fn(self.student, teacher, batch, **options).loss
        self.accelerator.backward(loss * share)
        return loss.item()

    def clip_and_step(self, max_norm: float) -> float:
        if hasattr(self.raw_optimizer, "clip_grad_norm_"):
            norm = self.raw_optimizer.clip_grad_norm_(max_norm)
        else:
            norm = clip_grad_norm_fp64(self.student.parameters(), max_norm)  # no fp16 scaler to unscale: bf16
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients before the engine wakes up
        return float(norm)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def _save_folder(directory: Path, model: torch.nn.Module, tokenizer, dtype: torch.dtype | None) -> None:
    """A ``from_pretrained`` folder of ``model``'s weights, written a tensor at a time."""
    device = next(model.parameters()).device
    tensors = (t for _, t in full_tensors(model, device, dtype))
    write_model_folder(directory, tensor_specs(model, dtype), tensors,
                       finish=lambda tmp: describe_model(tmp, model, getattr(model, "generation_config", None),
                                                         tokenizer, dtype or next(model.parameters()).dtype))


class SingleProcessModels:
    """One process, whole models: the student (trained) and its EMA teacher, a copy of the student;
    with LoRA (``--lora-r``), adapters trained over a frozen base and the teacher the EMA of the
    adapters, swapped into the same base for its forwards (no second copy of the base)."""

    def __init__(self, config: TrainConfig, tokenizer, use_bf16: bool):
        student_dtype, teacher_dtype = training_dtypes(config, use_bf16)
        student = _load_student(config, tokenizer, student_dtype)
        self.lora = config.lora_r > 0
        if self.lora:
            from caopd.training.lora import AdapterTeacher, add_lora

            add_lora(student, config.lora_r, config.lora_alpha or 2 * config.lora_r,
                     [m.strip() for m in config.lora_target_modules.split(",") if m.strip()])
            if config.gradient_checkpointing:
                student.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
            teacher = AdapterTeacher(student)
        # a model of its own or a served one, frozen: nothing to average, nothing to checkpoint
        self.frozen_teacher = bool(config.teacher_model or config.teacher_server)
        if config.teacher_model:
            teacher = load_teacher(config, tokenizer, teacher_dtype)
        elif config.teacher_server:
            teacher = None  # the loss gets the teacher's top k from the servers (TeacherServer)
        elif not self.lora:
            teacher = copy.deepcopy(student).to(teacher_dtype).requires_grad_(False).eval()
        self.run = _Accelerated(student, make_optimizer(config, student), use_bf16)
        self.student, self.optimizer = self.run.student, self.run.optimizer
        self.teacher = teacher if teacher is None or self.lora and not self.frozen_teacher \
            else teacher.to(self.run.device)
        self.base_model, self.merge = config.model, config.merge_lora

    def loss(self, loss_fn: Callable, batch, options: dict, share: float) -> float:
        return self.run.loss(loss_fn, self.teacher, batch, options, share)

    def clip_and_step(self, max_norm: float) -> float:
        return self.run.clip_and_step(max_norm)

    def update_teacher(self, alpha: float) -> None:
        if self.frozen_teacher:
            return
        if self.lora:
            self.teacher.ema_update_(alpha)
        else:
            ema_update_(self.teacher, self.student, alpha)

    def generation_engine(self, tokenizer, own_copy: bool, prompts_per_batch: int | None = None):
        from caopd.engines.hf import TransformersEngine

        if own_copy:  # asynchronous rollouts: the engine samples while the weights change
            return TransformersEngine(copy.deepcopy(self.student), tokenizer, prompts_per_batch=prompts_per_batch)
        return TransformersEngine(self.student, tokenizer, live=True, prompts_per_batch=prompts_per_batch)

    def weights(self, dtype: torch.dtype | None = None) -> WeightStream:
        return weight_stream(self.student, self.run.device, dtype)

    def save_checkpoint(self, directory: Path, state, scheduler, config: dict) -> Path:
        return checkpoint.save_checkpoint(directory, state, self.student, self.saved_teacher,
                                          self.run.raw_optimizer, scheduler, config, trainable_only=self.lora)

    def resume(self, directory: Path, scheduler, warn) -> tuple[Path, checkpoint.TrainState]:
        return checkpoint.resume(directory, self.student, self.saved_teacher, self.run.raw_optimizer, scheduler,
                                 warn=warn, trainable_only=self.lora)

    @property
    def saved_teacher(self) -> torch.nn.Module | None:
        """The teacher a checkpoint holds: the EMA; None for a --teacher-model (reloaded from its source)
        or a served one."""
        return None if self.frozen_teacher else self.teacher

    def save_final(self, directory: Path, tokenizer) -> None:
        if not self.lora:
            _save_folder(directory, self.student, tokenizer, None)
            return
        from caopd.training.lora import save_adapters

        save_adapters(self.student, directory, self.base_model, merge=self.merge)
        tokenizer.save_pretrained(directory)
