"""The CaOPD training loop, top to bottom: rollouts -> verify -> calibration -> loss -> step -> EMA -> log.

With ``empirical_calibration=False`` the calibration stage is skipped: plain OPD/SDFT, the baseline.
Prompts are consumed in a seeded order (a new permutation each epoch); the data position, RNG
states, optimizer, scheduler and EMA teacher are checkpointed, so a resumed run neither repeats
nor skips prompts and ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
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
from caopd.engines.base import RolloutEngine, SamplingParams, staged
from caopd.engines.server import RolloutServerError
from caopd.engines.teacher_server import TeacherServer
from caopd.errors import InputError, Interrupted, StoppedRun
from caopd.inputs.data import load_examples
from caopd.inputs.prompts import demonstration, student_messages
from caopd.modeling.model_shapes import is_random
from caopd.modeling.models import TINY_MODEL, load_tokenizer
from caopd.scoring.calibration import build_targets, verify_rollouts
from caopd.training.checkpoint import (
    SaveFailed,
    TrainState,
    checkpoint_step,
    complete_checkpoints,
    rotate_checkpoints,
    truncate_metrics,
)
from caopd.training.distributed import (
    Ranks,
    all_gather,
    barrier,
    join_process_group,
    launched_processes,
    rank_slice,
)
from caopd.training.loss import chat_ids, distillation_loss, make_batch
from caopd.training.placement import Models, place_models
from caopd.training.process_memory import merge_phase, peaks, release_freed_memory, reset_peaks
from caopd.training.report_to import close as close_trackers
from caopd.training.report_to import log_step, open_trackers, tracker_names
from caopd.training.run_folder import check_run_folder, clear_earlier_run
from caopd.training.segment_attention import default_kernel, use_segment_attention
from caopd.training.shared_prefix import (
    LayerCost,
    Layout,
    choose_layout,
    make_shared_batch,
    shared_distillation_loss,
    sharing_pays,
)


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


def prior_at(prior: float, step: int, total_steps: int) -> float:
    """CaOPD's confidence prior at ``step`` (from 0): growing linearly from 0 to ``prior`` at the
    last step. Early on the student's stated confidence is far from its accuracy (the prior would
    hold the target back); later it is the better estimate, and the prior averages out the noise
    of K rollouts."""
    return prior * step / max(1, total_steps - 1)


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
            "prompts": list(indices), "memory": peaks()}


def merge_step_stats(per_process: list[dict]) -> dict:
    """The processes' step_stats in rank order (= the step's prompt order) as one process's."""
    merged = {key: [] for key in ("p_acc", "correct", "format_adherence", "reasons", "confidences", "prompts")}
    for stats in per_process:
        for key in merged:
            merged[key] += stats[key]
    merged.update({key: sum(stats[key] for stats in per_process) for key in ("fallbacks", "tokens", "loss")})
    merged["memory"] = [stats.get("memory") for stats in per_process]
    return merged


def metrics_row(step: int, stats: dict, sequences: int, grad_norm: float, lr: float, times: tuple, policy_version: int):
    """One line of metrics.jsonl: the step's merged stats and timings (t0 start, t1 rollouts done,
    t2 verified, t3 stepped)."""
    t0, t1, t2, t3 = times
    return {
        "step": step, "loss": stats["loss"], "kl": stats["loss"], "grad_norm": grad_norm, "lr": lr,
        "mean_p_acc": statistics.fmean(stats["p_acc"]), "rollout_accuracy": statistics.fmean(stats["correct"]),
        "format_adherence": statistics.fmean(stats["format_adherence"]),
        "wrong_reasons": dict(Counter(stats["reasons"])),
        "mean_confidence": statistics.fmean(stats["confidences"]) if stats["confidences"] else None,
        "mean_completion_tokens": stats["tokens"] / sequences, "teacher_fallbacks": stats["fallbacks"],
        "tokens_per_s": stats["tokens"] / (t3 - t0), "time_generate": t1 - t0, "time_verify": t2 - t1,
        "time_forward_backward": t3 - t2, "policy_version": policy_version,
        "peak_host_gib": max(m["host_gib"] for m in stats["memory"]), "prompts": stats["prompts"],
    }


def check_engine_options(config: TrainConfig, on_gpu: bool) -> None:
    """Engine settings that cannot work together, as one line before any work."""
    if on_gpu and config.rollout_engine == "vllm" and config.vllm_placement == "colocate" and config.async_rollouts:
        raise InputError("--async-rollouts with a colocated vLLM engine on a GPU: the engine drops its weights "
                         "while the step trains, so it cannot sample the next step meanwhile; use "
                         "--vllm-placement separate --vllm-device N, or synchronous rollouts")
    if config.fsdp and config.async_rollouts:
        raise InputError("--async-rollouts with --fsdp: an engine sampling while the step trains would need a whole "
                         "copy of the model on every process; use synchronous rollouts")


def check_launcher() -> None:
    """accelerate's simple launcher, asked for several processes without a distributed type (``accelerate
    launch --num_processes 2 --cpu``), starts one process: it sets MASTER_ADDR but no WORLD_SIZE. Say so
    instead of silently training on one."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise InputError("accelerate launch started one process, not the several asked for (its simple launcher: "
                         "no distributed type); pass --multi_cpu with --cpu, or a config file with distributed_type "
                         "FSDP: --config_file caopd/configs/accelerate/fsdp2-cpu-2proc.yaml (CPU) or "
                         "caopd/configs/accelerate/fsdp2-1node-8gpu.yaml")


def launched(config: TrainConfig) -> TrainConfig:
    """The config with the launcher's settings: an accelerate config with distributed_type FSDP (and
    fsdp_offload_params) turns --fsdp (and --fsdp-cpu-offload) on."""
    fsdp = config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    offload = config.fsdp_cpu_offload or os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    return dataclasses.replace(config, fsdp=fsdp, fsdp_cpu_offload=offload and fsdp)


def resolve_launch(config: TrainConfig) -> TrainConfig:
    """The config as it will run, recorded by the run: the launcher's settings (``launched``), and
    --rollout-engine auto become the engine it chose."""
    from caopd.engines.vllm_engine import resolve_engine

    config = launched(config)
    return dataclasses.replace(config, rollout_engine=resolve_engine(config.rollout_engine))


def run_tokenizer(config: TrainConfig, out: Path, examples):
    """The run's tokenizer: the one a resumed run trained with, else ``--tokenizer`` (trained on the
    data for ``fast``)."""
    saved = out / "tokenizer"
    if config.resume and saved.exists():
        return load_tokenizer(config.model, str(saved)), True
    corpus = [_text_of(e.prompt) + "\n" + demonstration(e, config.dataset) for e in examples]
    return load_tokenizer(config.model, config.tokenizer, corpus=corpus), False


def build_engine(config: TrainConfig, models: Models, tokenizer, out: Path, ranks: Ranks) -> RolloutEngine:
    """The configured rollout engine, holding the student's current weights."""
    if config.rollout_engine == "transformers":  # an asynchronous engine samples while weights change: own copy
        return models.generation_engine(tokenizer, own_copy=config.async_rollouts,
                                        prompts_per_batch=config.micro_batch_prompts)
    if config.rollout_engine == "server":
        from caopd.engines.server import ServerEngine, server_urls

        return ServerEngine(server_urls(config.rollout_server), tokenizer, staging=out / "rollout_weights", ranks=ranks,
                            timeout=config.rollout_server_timeout)
    from caopd.engines.vllm_engine import VLLMEngine

    model_dir, tokenizer_dir = config.model, None
    if config.model == TINY_MODEL or is_random(config.model):  # vLLM loads from a directory: write the model there
        model_dir = str(out / "rollout_model")
        models.save_final(Path(model_dir), tokenizer if ranks.is_main else None)
        barrier(ranks)  # the main process wrote it
    elif config.tokenizer != "auto":
        tokenizer_dir = str(out / "tokenizer")  # the trainer saved it there
    use_bf16 = config.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    engine = VLLMEngine(model_dir, tokenizer=tokenizer_dir, dtype="bfloat16" if use_bf16 else "float32",
                        max_model_len=config.max_prompt_length + config.max_completion_length,
                        placement=config.vllm_placement, device=None if config.vllm_device < 0 else config.vllm_device,
                        gpu_memory_utilization=config.vllm_gpu_memory_utilization or None, seed=config.seed,
                        tensor_parallel_size=config.vllm_tensor_parallel_size, ranks=ranks)
    return engine


def teacher_server(config: TrainConfig, tokenizer, ranks: Ranks) -> TeacherServer | None:
    """``--teacher-server``'s client, its servers checked (one line each: unreachable, another
    tokenizer, too few log-probs); None without one."""
    if not config.teacher_server:
        return None
    from caopd.engines.server import server_urls

    return TeacherServer(server_urls(config.teacher_server, "--teacher-server"), tokenizer, top_k=config.teacher_top_k,
                         vocab=len(tokenizer), max_tokens=config.max_prompt_length + config.max_completion_length,
                         ranks=ranks, timeout=config.rollout_server_timeout)


def micro_batch(layout: Layout, tokenizer, targets: list, prompts: list[list[int]], config: TrainConfig,
                cost: LayerCost, kernel: str):
    """(loss function, batch, its forward options) of one micro-batch: its prefixes shared in the run's
    layout where sharing pays for its rows (sharing_pays, by the model's ``cost`` and the attention
    ``kernel``), else one row a completion (padded or packed)."""
    lengths = (config.max_prompt_length, config.max_completion_length, config.chat_template_kwargs)
    spans = config.confidence_divergence not in ("same", config.divergence)
    unshared = {"layout": "packed" if config.attn_implementation == "flash_attention_2" else "padded"}
    if not layout.shared:
        return distillation_loss, make_batch(tokenizer, targets, prompts, *lengths, spans=spans), unshared
    batch = make_shared_batch(tokenizer, targets, prompts, *lengths, spans=spans)
    cache = layout.student == "cache"
    if sharing_pays(batch.student.layout.rows, cost, "sdpa" if cache else kernel, calls_per_row=2 if cache else 0):
        return shared_distillation_loss, batch, {"path": layout.student, "teacher_path": layout.teacher}
    return distillation_loss, batch.unshared(), unshared


def sample_step(step: int, engine: RolloutEngine, rollouts: AsyncRollouts | None, models: Models, request,
                max_staleness: int, push: bool) -> tuple[list, int]:
    """(this step's completions, the policy version they came from). A synchronous engine first gets
    the current weights when ``push`` (streamed, one tensor at a time, if the engine asks for them)."""
    if rollouts is not None:
        batch = rollouts.get(step)
        if step - batch.policy_version > max_staleness:
            raise RuntimeError(f"step {step} got rollouts of policy {batch.policy_version}: staleness "
                               f"{step - batch.policy_version} > {max_staleness}")
        return batch.completions, batch.policy_version
    if push:
        engine.update_weights(models.weights())
    req = request(step)
    return engine.generate(req.prompts, req.n, req.sampling), step


def write_config_yaml(path: Path, config: TrainConfig) -> None:
    """The config as it runs (after the launcher's settings), beside the run's other files."""
    import yaml

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(asdict(config), sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)


def summary_line(config: TrainConfig, total_steps: int, start: int, layout: str, ranks: Ranks) -> str:
    """What a run will do, in one line (the whole config is in config.yaml)."""
    method = "CaOPD" if config.empirical_calibration else "OPD"
    resumed = f", resumed at step {start}" if start else ""
    return (f"{method}: {config.model} on {config.data} ({config.dataset}), {total_steps} steps of "
            f"{config.prompts_per_step} prompts x {config.num_generations} rollouts{resumed}; {config.divergence} "
            f"KL, forward layout {layout}, {ranks.world} process(es) ({ranks.backend}), rollouts by "
            f"{config.rollout_engine}; config in {Path(config.output_dir) / 'config.yaml'}")


def step_line(record: dict, total_steps: int) -> str:
    """One step, for --logging-steps."""
    confidence = "n/a" if record["mean_confidence"] is None else f"{record['mean_confidence']:.3f}"
    seconds = record["time_generate"] + record["time_verify"] + record["time_forward_backward"]
    return (f"step {record['step']}/{total_steps}  loss {record['loss']:.4f}  P_acc {record['mean_p_acc']:.3f}  "
            f"accuracy {record['rollout_accuracy']:.3f}  confidence {confidence}  tokens/s "
            f"{record['tokens_per_s']:.1f}  {seconds:.1f} s/step")


def save_or_stop(save, what: str, state: TrainState, ranks: Ranks) -> None:
    """``save()`` on every process; when a write failed on any (a full disk, a file-size limit), all stop
    with one line. Nothing half-written passes for a checkpoint: its manifest is written last."""
    failure = None
    try:
        save()
    except (OSError, SaveFailed) as e:
        failure = str(e)
    failures = [f for f in all_gather(failure, ranks) if f]
    if failures:
        raise StoppedRun(f"writing {what} failed ({failures[0]}); stopped at step {state.step}: free space, then "
                         "--resume true continues from the newest complete checkpoint")


def stop_if_any_failed(failure: str | None, ranks: Ranks, models: Models, state: TrainState, scheduler,
                       checkpoints: Path, config: TrainConfig) -> None:
    """When any process's rollouts failed (a server gone): every process saves the step's checkpoint
    (the state before its rollouts: consistent) and stops with one line saying how to continue."""
    failures = [f for f in all_gather(failure, ranks) if f]
    if not failures:
        return
    if not (checkpoints / f"step-{state.step:06d}" / "manifest.json").exists():
        models.save_checkpoint(checkpoints, state, scheduler, asdict(config))
    raise StoppedRun(f"{failures[0]}; stopped at step {state.step}, saved as checkpoint {state.step}: continue with "
                     "--resume true once the server is back")


def train(config: TrainConfig, engine: RolloutEngine | None = None, stop_after_steps: int | None = None,
          quiet: bool = False, progress: str | None = None, first_line=None) -> dict:
    """Run (or resume) training; returns the history, the final state and the models (sharded under
    FSDP). quiet: no output at all; progress: only a progress bar with this label; first_line(config):
    stdout's first line, of the config as it runs (the CLI's: where each non-default value came from)."""
    from tqdm import tqdm

    check_launcher()
    asked, config = config, resolve_launch(config)
    asked_engine = asked.rollout_engine
    if launched_processes() > 1 and not config.fsdp:
        raise InputError(f"{launched_processes()} processes need --fsdp true (each process would otherwise hold and "
                         "train a whole model of its own)")
    check_engine_options(config, on_gpu=torch.cuda.is_available())
    ranks = join_process_group(config.distributed_timeout_minutes, config.fsdp_cpu_offload, config.distributed_backend,
                               config.fsdp)
    quiet = quiet or not ranks.is_main  # one process logs, prints and writes the run's files
    log = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr))
    my_prompts = rank_slice(config.prompts_per_step, ranks)
    earlier = check_run_folder(config, log)  # one-line errors before any work; nothing deleted yet
    wanted_trackers = tracker_names(config.report_to) if ranks.is_main else []  # checked before any work
    if first_line and not quiet and progress is None:
        print(first_line(launched(asked)), flush=True)  # stdout's first line; errors and warnings stay on stderr
    out = Path(config.output_dir)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    release_freed_memory()  # from here on a freed tensor leaves the process's resident memory
    reset_peaks()
    examples = load_examples(config.data_path(), config.dataset, config.split)
    tokenizer, resumed_tokenizer = run_tokenizer(config, out, examples)
    served_teacher = teacher_server(config, tokenizer, ranks)  # checked before the models load
    models = place_models(config, tokenizer, ranks, fsdp=config.fsdp, cpu_offload=config.fsdp_cpu_offload)
    model_bytes = sum(p.numel() * p.element_size() for p in models.student.parameters())
    release_freed_memory(model_bytes)  # the main process's loaded copy, once broadcast into the shards
    barrier(ranks)  # every process loaded before the main one deletes anything
    if ranks.is_main:
        clear_earlier_run(out, earlier, log)  # --overwrite only, and only now that everything loaded
        if not resumed_tokenizer:
            tokenizer.save_pretrained(out / "tokenizer")
    barrier(ranks)
    total_steps = config.max_steps or math.ceil(len(examples) * config.epochs / config.prompts_per_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        models.optimizer, warmup_cosine(round(config.warmup_ratio * total_steps), total_steps))
    state = TrainState()
    checkpoints = out / "checkpoints"
    if config.resume:
        last, state = models.resume(checkpoints, scheduler, warn=log)
        dropped = truncate_metrics(out / "metrics.jsonl", state.step) if ranks.is_main else 0
        log(f"resuming from {last} (step {state.step})"
            + (f"; dropped {dropped} metrics row(s) the stopped run logged after it" if dropped else ""))
    own_engine = engine is None
    if own_engine:
        if asked_engine == "auto":
            log(f"rollout engine: {config.rollout_engine} (auto: vLLM needs vllm installed and a GPU)")
        engine = build_engine(config, models, tokenizer, out, ranks)
    memory = {"processes": ranks.world, "process_group": ranks.backend, "load": all_gather(peaks(), ranks)}
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

    layout, why = choose_layout(config.shared_prefix, config.attn_implementation, models.student.config.model_type,
                                config.gradient_checkpointing, config.fsdp)
    if why:
        log(why)
    said_unshared = False  # a micro-batch where sharing saves nothing is said once a run
    device = next(models.student.parameters()).device
    cost, kernel = LayerCost.of(models.student.config, device), default_kernel(device)
    if "segments" in (layout.student, layout.teacher):
        for model in (models.student, models.teacher):
            if hasattr(model, "set_attn_implementation"):  # a LoRA teacher shares the student's model
                use_segment_attention(model)
    options = dict(divergence=config.divergence, beta=config.beta, temperature=config.temperature,
                   skip_tokens=config.skip_loss_tokens, impl=config.loss_impl,
                   confidence_divergence=config.confidence_divergence, top_k=config.teacher_top_k,
                   **({"served_teacher": served_teacher} if served_teacher else {}))
    if ranks.is_main:
        write_config_yaml(out / "config.yaml", config)
    trackers = open_trackers(wanted_trackers, out, asdict(config))  # none on the other processes
    if not quiet and progress is None:
        print(summary_line(config, total_steps, state.step, str(layout), ranks), flush=True)
    history = []
    bar = tqdm(total=total_steps, initial=state.step, desc=progress or "train", disable=quiet)
    last_step = total_steps if stop_after_steps is None else min(total_steps, state.step + stop_after_steps)
    if config.async_rollouts:  # the engine starts from the run's (resumed) weights
        engine.update_weights(staged(engine, models.weights()))
    rollouts = AsyncRollouts(engine, request, state.step, last_step, config.max_staleness) \
        if config.async_rollouts else None
    engine_holds = None  # the step whose weights the (synchronous) engine holds
    try:
        while state.step < last_step:
            indices = step_indices(state.step)
            reset_peaks()
            t0 = time.perf_counter()
            try:
                completions, policy_version = sample_step(state.step, engine, rollouts, models, request,
                                                          config.max_staleness, push=engine_holds != state.step)
                engine_holds, failure = state.step, None
            except RolloutServerError as e:
                failure = str(e)
            stop_if_any_failed(failure, ranks, models, state, scheduler, checkpoints, config)
            t1 = time.perf_counter()
            groups = [verify_rollouts(examples[i], c, config.dataset) for i, c in zip(indices, completions)]
            pick = random.Random(config.seed * 7919 + state.step)
            targets = [build_targets(g, config.dataset, config.teacher_context, config.empirical_calibration,
                                     pick, prior_at(config.confidence_prior, state.step, total_steps))
                       [:config.train_rollouts or None] for g in groups]
            t2 = time.perf_counter()

            sequences = sum(all_gather(sum(len(t) for t in targets), ranks))  # the whole step's
            loss_value, tokens, failure = 0.0, 0, None
            for start in range(0, len(groups), config.micro_batch_prompts):
                micro = range(start, min(start + config.micro_batch_prompts, len(groups)))
                micro_targets = [t for j in micro for t in targets[j]]
                micro_prompts = [prompt_ids[indices[j]] for j in micro for _ in targets[j]]
                loss_fn, batch, forward = micro_batch(layout, tokenizer, micro_targets, micro_prompts, config,
                                                      cost, kernel)
                if layout.shared and loss_fn is distillation_loss and not said_unshared:
                    said_unshared = True
                    log(f"--shared-prefix: sharing saves nothing where a prompt has one completion or is much "
                        f"shorter than its completions (first at step {state.step + 1}): such micro-batches run "
                        f"the {forward['layout']} forwards")
                share = len(micro_targets) / sequences
                loss_value += models.loss(loss_fn, batch, {**options, **forward}, share) * share
                if served_teacher is not None and served_teacher.failure:  # on every process alike
                    failure = served_teacher.failure
                    break
                tokens += batch.completion_tokens
            stop_if_any_failed(failure, ranks, models, state, scheduler, checkpoints, config)
            grad_norm = models.clip_and_step(config.max_grad_norm or math.inf)
            scheduler.step()
            models.update_teacher(config.teacher_ema)
            if rollouts is not None:
                rollouts.publish(staged(engine, models.weights()), state.step + 1)
            t3 = time.perf_counter()

            state.step += 1
            stats = merge_step_stats(all_gather(step_stats(groups, targets, indices, tokens, loss_value), ranks))
            memory["steps"] = [merge_phase(a, b) for a, b in zip(memory.get("steps", [None] * ranks.world),
                                                                  stats["memory"])]
            record = metrics_row(state.step, stats, sequences, float(grad_norm), scheduler.get_last_lr()[0],
                                 (t0, t1, t2, t3), policy_version)
            history.append(record)
            if ranks.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                log_step(trackers, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", p_acc=f"{record['mean_p_acc']:.2f}")
            if not quiet and progress is None and config.logging_steps and state.step % config.logging_steps == 0:
                tqdm.write(step_line(record, total_steps), file=sys.stdout)
            if config.save_every and (state.step % config.save_every == 0 or state.step == total_steps):
                reset_peaks()
                save_or_stop(lambda: models.save_checkpoint(checkpoints, state, scheduler, asdict(config)),
                             f"checkpoint {state.step}", state, ranks)
                memory["checkpoint_save"] = [merge_phase(a, b) for a, b in zip(
                    memory.get("checkpoint_save", [None] * ranks.world), all_gather(peaks(), ranks))]
                if ranks.is_main:
                    rotate_checkpoints(checkpoints, config.save_total_limit, state.step)
                barrier(ranks)
        # before the engine closes: a vLLM engine in a launch tears down the process group it joined
        if state.step == total_steps:
            reset_peaks()
            save_or_stop(lambda: models.save_final(out / "final", tokenizer if ranks.is_main else None),
                         "final/", state, ranks)
            memory["final_save"] = all_gather(peaks(), ranks)
        if ranks.is_main:
            (out / "memory.json").write_text(json.dumps(memory, indent=1) + "\n")
        barrier(ranks)
    except KeyboardInterrupt:  # Ctrl-C: one line and exit code 130, the run resumable from its last checkpoint
        done = [checkpoint_step(p) for p in complete_checkpoints(checkpoints)]
        last = f"the last checkpoint is step {done[-1]}" if done else "no checkpoint was saved yet"
        raise Interrupted(f"stopped at step {state.step}; {last}; continue with --resume true") from None
    finally:
        bar.close()  # ends its line: a stop's one-line message starts a line of its own
        close_trackers(trackers)
        if rollouts is not None:
            rollouts.close()
        if own_engine and hasattr(engine, "close"):
            engine.close()
        if served_teacher is not None:
            served_teacher.close()
    return {"history": history, "state": state, "student": models.student, "teacher": models.teacher,
            "tokenizer": tokenizer, "models": models}
