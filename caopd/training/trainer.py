"""The CaOPD training loop, top to bottom: rollouts -> verify -> calibration -> loss -> step -> EMA -> log.

With ``empirical_calibration=False`` the calibration stage is skipped: plain OPD/SDFT, the baseline.
Prompts are consumed in a seeded order (a new permutation each epoch); the data position, RNG
states, optimizer, scheduler and EMA teacher are checkpointed, so a resumed run neither repeats
nor skips prompts and ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from caopd.config import TrainConfig
from caopd.engines.async_rollouts import AsyncRollouts, RolloutRequest
from caopd.engines.base import RolloutEngine, SamplingParams
from caopd.errors import InputError
from caopd.evaluation.tables import format_table
from caopd.inputs.data import load_examples
from caopd.inputs.prompts import demonstration, student_messages
from caopd.modeling.model_shapes import is_random
from caopd.modeling.models import TINY_MODEL, apply_liger_kernels, ema_update_, load_model, load_tokenizer
from caopd.scoring.calibration import build_targets, verify_rollouts
from caopd.training.checkpoint import (
    TrainState,
    rotate_checkpoints,
    save_checkpoint,
    save_sharded_checkpoint,
    truncate_metrics,
)
from caopd.training.checkpoint import resume as resume_checkpoint
from caopd.training.distributed import (
    all_gather,
    barrier,
    full_state_dict,
    grad_norm_and_clip,
    join_process_group,
    rank_slice,
    shard,
)
from caopd.training.lora import AdapterTeacher, add_lora, save_adapters
from caopd.training.loss import chat_ids, distillation_loss, make_batch
from caopd.training.run_folder import check_run_folder, clear_earlier_run
from caopd.training.shared_prefix import choose_layout, make_shared_batch, shared_distillation_loss


def prompt_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def prompts_at(position: int, count: int, n_examples: int, seed: int) -> list[int]:
    """Example indices at stream positions [position, position + count), epoch after epoch."""
    orders: dict[int, list[int]] = {}
    indices = []
    for p in range(position, position + count):
        epoch = p // n_examples
        if epoch not in orders:
            orders[epoch] = prompt_order(n_examples, seed, epoch)
        indices.append(orders[epoch][p % n_examples])
    return indices


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _text_of(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def step_stats(groups, targets, indices: list[int], tokens: int, loss: float) -> dict:
    """What the metrics row needs from one process's share of a step (JSON-like, to gather)."""
    return {"p_acc": [g.p_acc for g in groups], "correct": [float(c) for g in groups for c in g.correct],
            "format_adherence": [g.format_adherence for g in groups],
            "reasons": [r for g in groups for r in g.reasons if r],
            "confidences": [c for g in groups for c in g.confidences],
            "fallbacks": sum(t[0].used_fallback for t in targets if t), "tokens": tokens, "loss": loss,
            "prompts": list(indices)}


def merge_step_stats(per_process: list[dict]) -> dict:
    """The processes' step_stats in rank order (= the step's prompt order) as one process's."""
    merged = {key: [] for key in ("p_acc", "correct", "format_adherence", "reasons", "confidences", "prompts")}
    for stats in per_process:
        for key in merged:
            merged[key] += stats[key]
    merged.update({key: sum(stats[key] for stats in per_process) for key in ("fallbacks", "tokens", "loss")})
    return merged


def check_engine_options(config: TrainConfig, on_gpu: bool) -> None:
    """Engine settings that cannot work together, as one line before any work."""
    if on_gpu and config.rollout_engine == "vllm" and config.vllm_placement == "colocate" and config.async_rollouts:
        raise InputError("--async-rollouts with a colocated vLLM engine on a GPU: the engine drops its weights "
                         "while the step trains, so it cannot sample the next step meanwhile; use "
                         "--vllm-placement separate --vllm-device N, or synchronous rollouts")


def training_dtypes(config: TrainConfig, use_bf16: bool) -> tuple[torch.dtype, torch.dtype]:
    """(student, teacher) weight dtypes. Without bf16 (CPU) both fp32. With bf16: the student is
    fp32 master weights under bf16 autocast, or bf16 itself (master_weights bf16, stepped with
    stochastic rounding); the teacher, forward-only, is bf16 and follows the EMA by stochastic
    rounding."""
    if not use_bf16:
        return torch.float32, torch.float32
    return (torch.float32 if config.master_weights == "fp32" else torch.bfloat16), torch.bfloat16


def make_optimizer(config: TrainConfig, student: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; for bf16 weights the stochastic-rounding AdamW (plain bf16 steps round most updates away)."""
    trained = [p for p in student.parameters() if p.requires_grad]  # LoRA: the adapters only
    if trained[0].dtype == torch.bfloat16:
        from caopd.training.optim import StochasticRoundingAdamW

        return StochasticRoundingAdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)


def build_engine(config: TrainConfig, model: torch.nn.Module, tokenizer) -> RolloutEngine:
    """The configured rollout engine, holding the student's current weights."""
    from caopd.engines.hf import TransformersEngine

    if config.rollout_engine == "transformers":  # an asynchronous engine samples while weights change: own copy
        return TransformersEngine(copy.deepcopy(model) if config.async_rollouts else model, tokenizer)
    from caopd.engines.vllm_engine import VLLMEngine

    model_dir, tokenizer_dir = config.model, None
    if config.model == TINY_MODEL or is_random(config.model):  # vLLM loads from a directory: write the model there
        model_dir = str(Path(config.output_dir) / "rollout_model")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    elif config.tokenizer != "auto":
        tokenizer_dir = str(Path(config.output_dir) / "tokenizer")  # the trainer saved it there
    use_bf16 = config.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    dtype = "bfloat16" if use_bf16 else str(next(model.parameters()).dtype).removeprefix("torch.")
    engine = VLLMEngine(model_dir, tokenizer=tokenizer_dir, dtype=dtype,
                        max_model_len=config.max_prompt_length + config.max_completion_length,
                        placement=config.vllm_placement, device=None if config.vllm_device < 0 else config.vllm_device,
                        gpu_memory_utilization=config.vllm_gpu_memory_utilization or None, seed=config.seed)
    engine.update_weights(model)  # a resumed run's weights, not the directory's
    return engine


def train(config: TrainConfig, engine: RolloutEngine | None = None, stop_after_steps: int | None = None,
          quiet: bool = False, progress: str | None = None) -> dict:
    """Run (or resume) training; returns the history, the final state and the models.
    quiet: no output at all; progress: only a progress bar with this label."""
    from accelerate import Accelerator
    from tqdm import tqdm

    ranks = join_process_group()
    quiet = quiet or not ranks.is_main  # one process logs, prints and writes the run's files
    log = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr))
    check_engine_options(config, on_gpu=torch.cuda.is_available())
    # an accelerate config with distributed_type FSDP (and fsdp_offload_params) turns these on too
    fsdp = config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    cpu_offload = config.fsdp_cpu_offload or os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    if config.lora_r and (fsdp or config.rollout_engine == "vllm"):
        raise InputError("--lora-r works with one process and the transformers engine for now (not with --fsdp or "
                         "--rollout-engine vllm)")
    if ranks.world > 1 and not fsdp:
        raise InputError(f"{ranks.world} processes need --fsdp true (each process would otherwise hold and train a "
                         "whole model of its own)")
    my_prompts = rank_slice(config.prompts_per_step, ranks)
    earlier = check_run_folder(config, log)  # one-line errors before any work; nothing deleted yet
    out = Path(config.output_dir)
    use_bf16 = config.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 and not fsdp else "no",
                              cpu=not torch.cuda.is_available())
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    examples = load_examples(config.data_path(), config.dataset, config.split)
    tokenizer_dir = out / "tokenizer"
    run_tokenizer = config.resume and tokenizer_dir.exists()  # a resumed run keeps the tokenizer it trained with
    if run_tokenizer:
        tokenizer = load_tokenizer(config.model, str(tokenizer_dir))
    else:
        corpus = [_text_of(e.prompt) + "\n" + demonstration(e, config.dataset) for e in examples]
        tokenizer = load_tokenizer(config.model, config.tokenizer, corpus=corpus)
    # FSDP2: fp32 shards, bf16 compute by its mixed-precision policy
    student_dtype, teacher_dtype = training_dtypes(config, use_bf16 and not fsdp)
    student = load_model(config.model, tokenizer, dtype=student_dtype,
                         attn_implementation=config.attn_implementation, seed=config.seed)
    student.train()  # from_pretrained returns eval mode, where gradient checkpointing does nothing
    if config.liger_kernels:
        apply_liger_kernels(student)  # before the teacher and rollout copies: they get the same layers
    barrier(ranks)  # every process loaded before the main one deletes anything
    if ranks.is_main:
        clear_earlier_run(out, earlier, log)  # --overwrite only, and only now that everything loaded
        if not run_tokenizer:
            tokenizer.save_pretrained(tokenizer_dir)
    barrier(ranks)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if config.lora_r:  # adapters over the frozen base; the teacher: the EMA of the adapters, same base
        add_lora(student, config.lora_r, config.lora_alpha or 2 * config.lora_r,
                 [m.strip() for m in config.lora_target_modules.split(",") if m.strip()])
        if config.gradient_checkpointing:
            student.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        teacher = AdapterTeacher(student)
    else:
        teacher = copy.deepcopy(student).to(teacher_dtype).requires_grad_(False).eval()
    sharded = None
    if fsdp:  # the rollout engine generates from a whole copy on each process, refreshed every step
        whole = copy.deepcopy(student).requires_grad_(False).to(accelerator.device,
                                                               torch.bfloat16 if use_bf16 else torch.float32)
        sharded = shard(student, teacher, bf16=use_bf16, cpu_offload=cpu_offload)
    optimizer = make_optimizer(config, student)
    raw_optimizer = optimizer  # accelerate wraps it; a bf16 one holds its own fp32 gradients (and clips them)
    total_steps = config.max_steps or math.ceil(len(examples) * config.epochs / config.prompts_per_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(config.warmup_ratio * total_steps), total_steps))
    state = TrainState()
    checkpoints = out / "checkpoints"
    if config.resume:
        last, state = resume_checkpoint(checkpoints, student, teacher, optimizer, scheduler, warn=log,
                                        ranks=ranks if fsdp else None, trainable_only=bool(config.lora_r))
        dropped = truncate_metrics(out / "metrics.jsonl", state.step) if ranks.is_main else 0
        log(f"resuming from {last} (step {state.step})"
            + (f"; dropped {dropped} metrics row(s) the stopped run logged after it" if dropped else ""))
    if fsdp:
        model = student
        whole.load_state_dict(full_state_dict(student))  # a resumed run's weights
    else:
        student, optimizer = accelerator.prepare(student, optimizer)
        if not config.lora_r:
            teacher.to(accelerator.device)
        model = whole = accelerator.unwrap_model(student)
    own_engine = engine is None
    if own_engine:
        engine = build_engine(config, whole, tokenizer)
    prompt_ids = [chat_ids(tokenizer, student_messages(e), config.chat_template_kwargs) for e in examples]

    def step_indices(step: int) -> list[int]:
        """This process's examples of step ``step`` (all of them in one process): a function of the
        step alone, whatever the timing."""
        return prompts_at(step * config.prompts_per_step, config.prompts_per_step, len(examples),
                          config.seed)[my_prompts]

    def request(step: int) -> RolloutRequest:
        indices = step_indices(step)
        sampling = SamplingParams(config.sampling_temperature, config.top_p, config.max_completion_length,
                                  seed=config.seed * 1_000_003 + step, first_prompt=my_prompts.start)
        return RolloutRequest([prompt_ids[i] for i in indices], config.num_generations, sampling)

    layout, why = choose_layout(config.shared_prefix, config.attn_implementation, model.config.model_type,
                                config.gradient_checkpointing, fsdp)
    if why:
        log(why)
    share_prefixes = layout.startswith("shared")
    layout_kwargs = {"path": layout.removeprefix("shared-")} if share_prefixes else {"layout": layout}
    if not quiet and progress is None:
        print(json.dumps({"config": asdict(config), "total_steps": total_steps, "resumed_at_step": state.step,
                          "divergence": config.divergence, "forward_layout": layout,
                          "method": "CaOPD" if config.empirical_calibration else "OPD"}))
    history = []
    bar = tqdm(total=total_steps, initial=state.step, desc=progress or "train", disable=quiet)
    last_step = total_steps if stop_after_steps is None else min(total_steps, state.step + stop_after_steps)
    rollouts = AsyncRollouts(engine, request, state.step, last_step, config.max_staleness) \
        if config.async_rollouts else None
    try:
        while state.step < last_step:
            indices = step_indices(state.step)
            t0 = time.perf_counter()
            if rollouts is not None:
                batch_of_rollouts = rollouts.get(state.step)
                completions, policy_version = batch_of_rollouts.completions, batch_of_rollouts.policy_version
                if state.step - policy_version > config.max_staleness:
                    raise RuntimeError(f"step {state.step} got rollouts of policy {policy_version}: staleness "
                                       f"{state.step - policy_version} > {config.max_staleness}")
            else:
                req = request(state.step)
                completions, policy_version = engine.generate(req.prompts, req.n, req.sampling), state.step
            t1 = time.perf_counter()
            groups = [verify_rollouts(examples[i], c, config.dataset) for i, c in zip(indices, completions)]
            pick = random.Random(config.seed * 7919 + state.step)
            targets = [build_targets(g, config.dataset, config.teacher_context, config.empirical_calibration,
                                     pick)[:config.train_rollouts or None] for g in groups]
            t2 = time.perf_counter()

            sequences = sum(all_gather(sum(len(t) for t in targets), ranks))  # the whole step's
            loss_value, tokens = 0.0, 0
            for start in range(0, len(groups), config.micro_batch_prompts):
                micro = range(start, min(start + config.micro_batch_prompts, len(groups)))
                micro_targets = [t for j in micro for t in targets[j]]
                micro_prompts = [prompt_ids[indices[j]] for j in micro for _ in targets[j]]
                batch = (make_shared_batch if share_prefixes else make_batch)(
                    tokenizer, micro_targets, micro_prompts, config.max_prompt_length, config.max_completion_length,
                    config.chat_template_kwargs)
                loss_fn = shared_distillation_loss if share_prefixes else distillation_loss
                options = dict(divergence=config.divergence, beta=config.beta, temperature=config.temperature,
                               skip_tokens=config.skip_loss_tokens, impl=config.loss_impl, **layout_kwargs)
                share = len(micro_targets) / sequences
                if fsdp:  # FSDP2 averages the processes' gradients: each adds its share of the sum
                    loss, _ = sharded(loss_fn, batch, **options)
                    (loss * share * ranks.world).backward()
                else:
                    with accelerator.autocast():
                        loss = loss_fn(student, teacher, batch, **options).loss
                    accelerator.backward(loss * share)
                loss_value += loss.item() * share
                tokens += batch.completion_tokens
            if fsdp:
                grad_norm = grad_norm_and_clip(list(student.parameters()), config.max_grad_norm or math.inf)
            elif hasattr(raw_optimizer, "clip_grad_norm_"):
                grad_norm = raw_optimizer.clip_grad_norm_(config.max_grad_norm or math.inf)
            else:
                grad_norm = accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # free the gradients before the engine wakes up
            scheduler.step()
            if config.lora_r:
                teacher.ema_update_(config.teacher_ema)
            else:
                ema_update_(teacher, model, config.teacher_ema)  # sharded: shard by shard
            if fsdp:
                whole.load_state_dict(full_state_dict(model))
            if rollouts is not None:
                rollouts.publish({k: v.detach().clone() for k, v in whole.state_dict().items()}, state.step + 1)
            else:
                engine.update_weights(whole)
            t3 = time.perf_counter()

            state.step += 1
            stats = merge_step_stats(all_gather(step_stats(groups, targets, indices, tokens, loss_value), ranks))
            record = {
                "step": state.step, "loss": stats["loss"], "kl": stats["loss"], "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0], "mean_p_acc": statistics.fmean(stats["p_acc"]),
                "rollout_accuracy": statistics.fmean(stats["correct"]),
                "format_adherence": statistics.fmean(stats["format_adherence"]),
                "wrong_reasons": dict(Counter(stats["reasons"])),
                "mean_confidence": statistics.fmean(stats["confidences"]) if stats["confidences"] else None,
                "mean_completion_tokens": stats["tokens"] / sequences,
                "teacher_fallbacks": stats["fallbacks"],
                "tokens_per_s": stats["tokens"] / (t3 - t0), "time_generate": t1 - t0, "time_verify": t2 - t1,
                "time_forward_backward": t3 - t2, "policy_version": policy_version,
                "prompts": stats["prompts"],
            }
            history.append(record)
            if ranks.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", p_acc=f"{record['mean_p_acc']:.2f}")
            if state.step % config.save_every == 0 or state.step == total_steps:
                if fsdp:
                    save_sharded_checkpoint(checkpoints, state, model, teacher, optimizer, scheduler, asdict(config),
                                            ranks)
                else:
                    save_checkpoint(checkpoints, state, model, teacher, optimizer, scheduler, asdict(config),
                                    trainable_only=bool(config.lora_r))
                if ranks.is_main:
                    rotate_checkpoints(checkpoints, config.save_total_limit, state.step)
                barrier(ranks)
    finally:
        if rollouts is not None:
            rollouts.close()
        if own_engine and hasattr(engine, "close"):
            engine.close()
    bar.close()
    if fsdp:  # whole copies for the caller: the student's is current, the teacher's gathered now
        teacher = copy.deepcopy(whole).to(teacher_dtype)
        teacher.load_state_dict(full_state_dict(sharded.teacher))
    if state.step == total_steps and ranks.is_main:
        if config.lora_r:
            save_adapters(whole, out / "final", config.model, merge=config.merge_lora)
        else:
            whole.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
    barrier(ranks)
    if history and not quiet and progress is None:
        keys = ["loss", "mean_p_acc", "rollout_accuracy", "format_adherence", "time_generate", "time_verify",
                "time_forward_backward"]
        print(format_table(["step", *keys], [[r["step"], *(r[k] for k in keys)] for r in history]))
    return {"history": history, "state": state, "student": whole, "teacher": teacher, "tokenizer": tokenizer}
