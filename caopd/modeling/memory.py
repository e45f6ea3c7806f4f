"""``caopd memory``: what each process of a CaOPD run holds, phase by phase, estimated before launching it.

Analytic, from the model's shape (``model_shapes``) and the run's settings, row by row: every
component the trainer allocates, the phases in which it is alive, and where (the GPU, or the
process's host memory; on ``--device cpu`` both are the process's resident memory). Phases:

- *load*: building the models. One process builds the student and copies it as the teacher. Under
  FSDP every process builds both on the meta device; the main process reads the whole model once
  (in the compute precision) and broadcasts it tensor by tensor into the shards: it holds one whole
  model, the others their shards plus one tensor in flight.
- *generation*: the engine samples (gradients were freed after the last step). The transformers
  engine decodes a micro-batch of prompts together from the training weights (under FSDP the
  sharded model, layer by layer); vLLM holds its memory share and receives whole tensors one at a time after each step.
- *training*: one micro-batch's forward and backward, then the optimizer step (gradients and Adam's
  moments together).
- *save*: a checkpoint or ``final/``, written a tensor at a time (under FSDP the main process
  gathers one whole tensor at a time).

Activations: saved tensors per token per layer of a Qwen3 decoder layer under autograd, counted
from its forward: the two RMSNorm inputs and outputs (4 H), q and k before and after their norm and
RoPE, v, the attention output, the K/V repeated for grouped-query SDPA (5 Hq + 3 Hkv, Hq = query
heads x head_dim, Hkv = KV heads x head_dim), gate, up, SiLU(gate) and their product (4 I). With
gradient checkpointing only each layer's input (H) is kept, plus one layer recomputed. The shared
prefix runs prefix + K completions instead of K x (prefix + completion) tokens; on the cache path
and the segments path the completions attend to the prefix's keys and values repeated K times
(counted); no path holds a [T, T] mask or score matrix.

Checked against measured peaks on CPU, one process and a 2-process FSDP run
(``benchmarks/memory_check.py``, ``tests/test_fsdp_memory.py``); unchecked on GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from caopd_kernels.fused_linear_kl import MIN_CHUNK_TOKENS, default_memory_budget

from caopd.errors import InputError
from caopd.modeling.model_shapes import shape_values

GIB = 2**30
CUDA_CONTEXT = 0.6 * GIB  # the CUDA context and kernels of one process on its GPU (typical)
# A process's own host memory before any model: the interpreter, torch, transformers, the tokenizer.
# Measured on CPU (torch 2.13.0+cpu): 0.40 GiB with a trained tokenizer, 0.51 GiB with Qwen3's; a CUDA
# process maps the CUDA libraries as well (typical, unmeasured here).
FIXED_CPU_PROCESS = 0.45 * GIB
FIXED_CUDA_PROCESS = 2.5 * GIB
PHASES = ("load", "generation", "training", "save")
STEADY = frozenset(PHASES)  # held from the load on
AFTER_LOAD = frozenset(PHASES[1:])


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    q_width: int  # query heads x head_dim
    kv_width: int  # KV heads x head_dim
    vocab: int
    tied: bool
    head_dim: int

    @classmethod
    def of(cls, values: dict) -> Shape:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(values.get(name), int) or isinstance(values.get(name), bool) or values[name] < 1:
                raise InputError(f"the model's config.json: field {name!r} must be a positive integer, got "
                                 f"{values.get(name, 'nothing')!r}")
        head_dim = values.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
        return cls(values["hidden_size"], values["intermediate_size"], values["num_hidden_layers"],
                   values["num_attention_heads"] * head_dim,
                   values.get("num_key_value_heads", values["num_attention_heads"]) * head_dim,
                   values["vocab_size"], bool(values.get("tie_word_embeddings", False)), head_dim)

    @property
    def layer_parameters(self) -> int:
        h = self.hidden
        attention = h * self.q_width * 2 + h * self.kv_width * 2 + 2 * self.head_dim  # q, o; k, v; q/k norms
        return attention + 3 * h * self.intermediate + 2 * h  # gate, up, down; two RMSNorms

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.embedding_parameters + self.hidden

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single tensor: the embedding (and lm_head), or an MLP matrix."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)

    def saved_per_token_layer(self, liger: bool = False) -> int:
        """Elements autograd keeps per token per decoder layer (see the module docstring); with
        Liger's SwiGLU (gate and up only) and in-place RoPE (no rotated copies kept)."""
        if liger:
            return 4 * self.hidden + 3 * self.q_width + 1 * self.kv_width + 2 * self.intermediate
        return 4 * self.hidden + 5 * self.q_width + 3 * self.kv_width + 4 * self.intermediate


@dataclass(frozen=True)
class Plan:
    model: str
    gpus: int = 1  # processes (one a GPU; on --device cpu, CPU processes)
    gpu_memory_gib: float = 80.0  # each process's budget (on --device cpu: the machine's memory)
    prompt_tokens: int = 1024
    completion_tokens: int = 1024
    num_generations: int = 8
    prompts_per_step: int = 32
    micro_batch_prompts: int = 1
    fsdp: bool = False
    lora_r: int = 0
    gradient_checkpointing: bool = False
    shared_prefix: bool = True
    rollout_engine: str = "transformers"  # or vllm (in the trainer's processes), server (elsewhere)
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    optimizer_offload: bool = False  # with fsdp: FSDP2's CPUOffloadPolicy (--fsdp-cpu-offload)
    liger_kernels: bool = False
    master_weights: str = "fp32"  # or bf16 (stochastic-rounding AdamW)
    teacher_dtype: str = "fp32"  # or bf16
    teacher_model: str = ""  # a frozen teacher of its own (--teacher-model): its shape; "": the student's EMA
    teacher_server: bool = False  # the teacher served elsewhere (--teacher-server): none in the trainer
    teacher_top_k: int = 0  # the teacher's top k a token (ids and log-probs; 20 with a server), 0: all logits
    device: str = "cuda"  # "cpu": fp32 everywhere, no CUDA context, no vLLM share
    processes_per_node: int = 8
    host_memory_gib: float = 0.0  # each node's host memory (0: not checked)


@dataclass(frozen=True)
class Row:
    name: str
    bytes: float
    phases: frozenset = field(default=STEADY)
    host: bool = False  # host memory of a GPU process (on --device cpu every row is the process's)


@dataclass
class Estimate:
    rows: list[Row]
    cpu: bool

    def phase_peak(self, phase: str, host: bool = False) -> float:
        return sum(r.bytes for r in self.rows if phase in r.phases and (r.host == host or self.cpu))

    def peaks(self, host: bool = False) -> dict[str, float]:
        return {phase: self.phase_peak(phase, host) for phase in PHASES}

    @property
    def peak(self) -> float:
        """The process's peak: its GPU memory, or on --device cpu its resident memory."""
        return max(self.peaks().values())

    @property
    def host_peak(self) -> float:
        return max(self.peaks(host=True).values())

    @property
    def generation_peak(self) -> float:
        return self.phase_peak("generation")

    @property
    def training_peak(self) -> float:
        return self.phase_peak("training")


def _lora_parameters(shape: Shape, r: int) -> int:
    """Adapters of rank r on the seven projections of every layer."""
    h, i = shape.hidden, shape.intermediate
    per_layer = r * ((h + shape.q_width) * 2 + (h + shape.kv_width) * 2 + (h + i) * 3)
    return shape.layers * per_layer


def _weights(plan: Plan, shape: Shape, main: bool, teacher_shape: Shape | None = None) -> list[Row]:
    """The student, the teacher, Adam's moments and the gradients, with their load-time copies.
    ``teacher_shape``: a --teacher-model's (frozen: no moments, no gradients); None: the student's EMA."""
    cpu, n, lora = plan.device == "cpu", shape.parameters, plan.lora_r > 0
    n_teacher = n if teacher_shape is None else teacher_shape.parameters
    shard = plan.gpus if plan.fsdp else 1
    compute = 4 if cpu else 2
    trainable = _lora_parameters(shape, plan.lora_r) if lora else n
    master = 4 if cpu or plan.master_weights == "fp32" or lora else 2
    teacher = 4 if plan.teacher_dtype == "fp32" else 2
    offloaded = plan.fsdp and plan.optimizer_offload and not cpu  # FSDP2's CPUOffloadPolicy: shards, grads, Adam
    where = " (in host memory)" if offloaded else ""
    rows = []
    if lora:  # the frozen base in the compute dtype, the adapters in fp32; the teacher: adapters
        rows += [Row("base weights (frozen)", n * compute), Row("adapters", trainable * 4)]
        if teacher_shape is None:
            rows.append(Row("EMA teacher (adapters; the base is shared)", trainable * 4))
    else:
        rows.append(Row(f"trained weights ({'fp32' if master == 4 else 'bf16'}{' shards' if plan.fsdp else ''})"
                        + where, n * master / shard, host=offloaded))
    kind = f"{'fp32' if teacher == 4 else 'bf16'}{' shards' if plan.fsdp else ''}"
    if plan.teacher_server:
        n_teacher = 0
        rows.append(Row("teacher: served (vLLM, on GPUs or nodes of its own)", 0.0))
    elif teacher_shape is not None:
        rows.append(Row(f"teacher model, frozen ({kind})" + where, n_teacher * teacher / shard, host=offloaded))
    elif not lora:
        rows.append(Row(f"EMA teacher ({kind})" + where, n * teacher / shard, host=offloaded))
    moments = 2 * trainable * (4 if master == 4 else 2) / shard
    rows.append(Row("Adam moments" + where, moments, AFTER_LOAD, host=offloaded))
    rows.append(Row("gradients" + where, trainable * 4 / shard, frozenset({"training"}), host=offloaded))
    load = frozenset({"load"})
    largest = shape.largest_tensor if teacher_shape is None else max(shape.largest_tensor, teacher_shape.largest_tensor)
    if plan.fsdp:  # the main process reads the whole model once (then the teacher model); the others a tensor at a time
        read = max(n, n_teacher) if teacher_shape is not None else n
        if main and cpu:  # in the same memory as the shards it fills while it frees itself
            beyond = max(0.0, read * compute - (n * master + n_teacher * teacher) / shard)
            rows.append(Row("the whole model read once (main process), beyond its shards", beyond, load))
        elif main:
            rows.append(Row("the whole model, read once and broadcast (main process)", read * compute, load,
                            host=True))
        rows.append(Row("one whole tensor in flight (broadcast)", largest * compute, load))
    elif not cpu:  # one process: built in host memory, then moved to the GPU
        rows.append(Row("student and teacher, built in host memory before moving", n * master + n_teacher * teacher,
                        load, host=True))
    return rows


def _sharded_compute(plan: Plan, shape: Shape, teacher_shape: Shape | None = None) -> list[Row]:
    """What FSDP2 gathers for compute: the root (both models' embeddings, norms, lm_heads, kept
    gathered from the first forward of a step to the end of its backward) and layers in flight."""
    compute = 4 if plan.device == "cpu" else 2
    after = frozenset({"generation", "training"})
    teacher = teacher_shape or shape
    teacher_root = 0 if plan.teacher_server else teacher.embedding_parameters
    return [Row("FSDP root gathered: " + ("the student's embeddings and lm_head" if plan.teacher_server else
                                          "both models' embeddings and lm_heads"),
                (shape.embedding_parameters + teacher_root) * compute, after),
            Row("FSDP decoder layers in flight (2, prefetch)",
                2 * max(shape.layer_parameters, teacher.layer_parameters) * compute, after),
            Row("FSDP one layer's unsharded gradient (fp32)", shape.layer_parameters * 4, frozenset({"training"})),
            Row("FSDP the root's unsharded gradient: student embeddings, lm_head (fp32)",
                shape.embedding_parameters * 4, frozenset({"training"}))]


def _training(plan: Plan, shape: Shape, teacher_shape: Shape | None = None) -> list[Row]:
    """One micro-batch's forward and backward."""
    teacher = teacher_shape or shape
    compute = 4 if plan.device == "cpu" else 2
    p, c, k, mb = plan.prompt_tokens, plan.completion_tokens, plan.num_generations, plan.micro_batch_prompts
    student_tokens = mb * (p + k * c) if plan.shared_prefix else mb * k * (p + c)
    per_layer = shape.saved_per_token_layer(plan.liger_kernels) * compute
    if plan.gradient_checkpointing:
        saved = student_tokens * shape.hidden * compute * shape.layers + student_tokens * per_layer
    else:
        saved = student_tokens * per_layer * shape.layers
    if plan.shared_prefix and not plan.gradient_checkpointing and not plan.fsdp:  # cache path: prefix K/V x K
        saved += mb * k * p * (2 * shape.kv_width + 2 * shape.q_width) * compute * shape.layers
    elif plan.shared_prefix:  # segments: each completion attends to [prefix K/V | its own], kept for backward;
        # with checkpointing for the one layer recomputed at a time (no [T, T] mask or scores on any path)
        saved += mb * k * p * 2 * shape.kv_width * compute * (1 if plan.gradient_checkpointing else shape.layers)
    completion_rows = mb * k * c
    # chunk buffers (caopd_kernels' budget rule: [C, V] fp32, 2 of them for reverse KL; C from the budget,
    # at most the micro-batch's completion tokens) + the lm_head's fp32 dW, stored from forward to backward
    loss_budget = default_memory_budget(shape.vocab, shape.hidden)
    chunk = min(completion_rows, max(MIN_CHUNK_TOKENS, loss_budget // (2 * shape.vocab * 4)))
    training = frozenset({"training"})
    rows = []
    micro_batches = -(-max(1, plan.prompts_per_step // (plan.gpus if plan.fsdp else 1)) // mb)
    if plan.shared_prefix and not plan.gradient_checkpointing and not plan.fsdp and micro_batches > 1:
        # the cache path runs every weight twice (prefix, then completions): autograd holds each weight's
        # first gradient until the second arrives, beside the gradients accumulated by earlier micro-batches
        trainable = _lora_parameters(shape, plan.lora_r) if plan.lora_r else shape.parameters
        rows.append(Row("gradient buffers while accumulating (prefix + completion passes)", trainable * 4, training))
    rows += [Row("student activations (saved for backward)", saved, training),
             Row("final hidden rows (" + ("the student's" if plan.teacher_server else "both models") + ")",
                 completion_rows * (2 * shape.hidden + (0 if plan.teacher_server else teacher.hidden)) * 4, training),
             Row("fused loss: chunk buffers + lm_head dW", 2 * chunk * shape.vocab * 4 + shape.vocab * shape.hidden * 4,
                 training)]
    if plan.teacher_server:
        return rows
    return rows + [Row("teacher forward: prefix cache of the micro-batch",
                       mb * k * (p + c) * teacher.layers * 2 * teacher.kv_width * compute, training)]


def _teacher_top_k(plan: Plan) -> list[Row]:
    """The teacher's top k of a micro-batch's completion tokens: int64 ids and fp32 log-probs (a
    server's arrive in host memory and are copied to the device)."""
    k = plan.teacher_top_k or (20 if plan.teacher_server else 0)
    if not k:
        return []
    rows = plan.micro_batch_prompts * plan.num_generations * plan.completion_tokens
    return [Row(f"teacher top {k}: ids + log-probs of a micro-batch's completion tokens", rows * k * 12,
                frozenset({"training"}))]


def _generation(plan: Plan, shape: Shape) -> list[Row]:
    compute = 4 if plan.device == "cpu" else 2
    generation = frozenset({"generation"})
    p, c, k = plan.prompt_tokens, plan.completion_tokens, plan.num_generations
    whole = Row("weights to the engine: one whole tensor gathered at a time", shape.largest_tensor * 4, generation)
    if plan.rollout_engine == "server":  # generation runs elsewhere; the trainer sends its weights
        return [Row("rollout server: on GPUs or nodes of its own", 0.0, generation)] + ([whole] if plan.fsdp else [])
    if plan.rollout_engine == "vllm" and plan.device != "cpu":
        tp = f", its weights 1/{plan.vllm_tensor_parallel_size} a GPU" if plan.vllm_tensor_parallel_size > 1 else ""
        rows = [Row(f"vLLM (colocated: its memory share{tp}; asleep while training)",
                    plan.vllm_gpu_memory_utilization * plan.gpu_memory_gib * GIB, generation)]
        return rows + ([whole] if plan.fsdp else [])  # one process hands over its own tensors, no copy
    rows = plan.micro_batch_prompts * k  # a micro-batch of prompts decoded together, K rows each
    kv = rows * (p + c) * shape.layers * 2 * shape.kv_width * compute
    return [Row("generation: KV cache + logits and sampling noise of a micro-batch's prompts x K samples",
                kv + rows * shape.vocab * 4 * 3, generation)]


def _saving(plan: Plan, shape: Shape, main: bool) -> list[Row]:
    if not plan.fsdp or not main:
        return []
    return [Row("final save: one whole tensor gathered (main process)", shape.largest_tensor * 4, frozenset({"save"}))]


def estimate(plan: Plan, values: dict | None = None, main: bool = True) -> Estimate:
    """Every row a process holds (``main``: the main process, which loads the whole model under FSDP)."""
    shape = Shape.of(values or shape_values(plan.model))
    cpu = plan.device == "cpu"
    rows = [Row("interpreter, libraries, tokenizer (fixed)", FIXED_CPU_PROCESS if cpu else FIXED_CUDA_PROCESS,
                host=True)]
    if not cpu:
        rows.append(Row("CUDA context", CUDA_CONTEXT))
    teacher = Shape.of(shape_values(plan.teacher_model)) if plan.teacher_model else None
    rows += _weights(plan, shape, main, teacher) + _teacher_top_k(plan)
    if plan.fsdp:
        rows += _sharded_compute(plan, shape, teacher)
    rows += _training(plan, shape, teacher) + _generation(plan, shape) + _saving(plan, shape, main)
    return Estimate(rows, cpu)


def largest_micro_batch(plan: Plan, values: dict | None = None) -> int:
    """The most prompts a micro-batch can hold within the memory budget (0: not even one)."""
    best = 0
    per_process = max(1, plan.prompts_per_step // (plan.gpus if plan.fsdp else 1))
    for mb in range(1, per_process + 1):
        if estimate(replace(plan, micro_batch_prompts=mb), values).peak > plan.gpu_memory_gib * GIB:
            break
        best = mb
    return best


def levers(plan: Plan, values: dict | None = None) -> list[str]:
    """Settings not yet on, each with the peak it gives (GiB), largest saving first."""
    options = []
    if not plan.gradient_checkpointing:
        options.append(("--gradient-checkpointing true", replace(plan, gradient_checkpointing=True)))
    if plan.micro_batch_prompts > 1:
        options.append(("--micro-batch-prompts 1", replace(plan, micro_batch_prompts=1)))
    if plan.fsdp and not plan.optimizer_offload and plan.device != "cpu":
        options.append(("--fsdp-cpu-offload true (shards, gradients, Adam states in host memory)",
                        replace(plan, optimizer_offload=True)))
    if plan.teacher_dtype == "fp32" and plan.lora_r == 0:
        options.append(("--teacher-dtype bf16", replace(plan, teacher_dtype="bf16")))
    if not plan.fsdp or plan.gpus == 1:
        options.append(("--fsdp true on 8 GPUs", replace(plan, fsdp=True, gpus=8)))
    if not plan.liger_kernels and plan.device != "cpu":
        options.append(("--liger-kernels true", replace(plan, liger_kernels=True)))
    if plan.lora_r == 0:
        options.append(("--lora-r 16", replace(plan, lora_r=16)))
    if plan.master_weights == "fp32" and plan.device != "cpu" and plan.lora_r == 0:
        options.append(("--master-weights bf16 (stochastic-rounding AdamW)", replace(plan, master_weights="bf16")))
    if plan.rollout_engine == "vllm" and plan.vllm_gpu_memory_utilization > 0.2:
        options.append(("--vllm-gpu-memory-utilization 0.2", replace(plan, vllm_gpu_memory_utilization=0.2)))
    scored = [(estimate(p, values).peak, name) for name, p in options]
    return [f"{name}: {peak / GIB:.1f} GiB" for peak, name in sorted(scored)]


def plan_of(config, *, gpus: int = 1, device: str = "cuda", gpu_memory_gib: float = 80.0,
            host_memory_gib: float = 0.0, processes_per_node: int = 8, prompt_tokens: int | None = None) -> Plan:
    """The Plan of the run a TrainConfig describes on ``gpus`` processes (``caopd memory``, and
    benchmarks/memory_check.py with the longest prompt a run actually trained on)."""
    from caopd.modeling.model_shapes import RANDOM_PREFIX

    engine = config.rollout_engine if config.rollout_engine != "auto" else \
        ("vllm" if device == "cuda" else "transformers")  # what auto picks there (with vLLM installed)
    return Plan(config.model.removeprefix(RANDOM_PREFIX), gpus=gpus, gpu_memory_gib=gpu_memory_gib,
                prompt_tokens=prompt_tokens or config.max_prompt_length,
                completion_tokens=config.max_completion_length, num_generations=config.num_generations,
                prompts_per_step=config.prompts_per_step, micro_batch_prompts=config.micro_batch_prompts,
                fsdp=config.fsdp, lora_r=config.lora_r, gradient_checkpointing=config.gradient_checkpointing,
                shared_prefix=config.shared_prefix, rollout_engine=engine,
                vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                vllm_tensor_parallel_size=config.vllm_tensor_parallel_size, optimizer_offload=config.fsdp_cpu_offload,
                liger_kernels=config.liger_kernels, master_weights=config.master_weights,
                teacher_dtype=config.teacher_dtype, teacher_model=config.teacher_model.removeprefix(RANDOM_PREFIX),
                teacher_server=bool(config.teacher_server), teacher_top_k=config.teacher_top_k,
                processes_per_node=processes_per_node, device=device,
                host_memory_gib=host_memory_gib)


def _table(estimate: Estimate, host: bool) -> str:
    from caopd.evaluation.tables import format_table

    rows = [r for r in estimate.rows if estimate.cpu or r.host == host]
    when = ["always" if r.phases == STEADY else ", ".join(p for p in PHASES if p in r.phases) for r in rows]
    return format_table(["component", "GiB", "held during"], [[r.name, f"{r.bytes / GIB:.2f}", w]
                                                               for r, w in zip(rows, when)])


def _phases_line(peaks: dict[str, float]) -> str:
    return ", ".join(f"{phase} {value / GIB:.1f}" for phase, value in peaks.items())


def report(plan: Plan) -> str:
    """The tables ``caopd memory`` prints: each process's memory by phase, and where it fits."""
    values = shape_values(plan.model)
    shape = Shape.of(values)
    cpu = plan.device == "cpu"
    result = estimate(plan, values)
    processes = f"{plan.gpus} process(es){' (FSDP2)' if plan.fsdp else ''}"
    where = "CPU process" if cpu else "GPU"
    lines = [f"{plan.model}: {shape.parameters / 1e9:.2f}B parameters, {shape.layers} layers, vocabulary "
             f"{shape.vocab}{_teacher_line(plan)}; {processes}, per {where}; prompt {plan.prompt_tokens} + completion "
             f"{plan.completion_tokens} tokens, K = {plan.num_generations}, {plan.micro_batch_prompts} prompt(s) a "
             "micro-batch", ""]
    budget = plan.gpu_memory_gib * GIB
    other = estimate(plan, values, main=False) if plan.fsdp else result
    if cpu:  # the processes share the machine's memory
        total = result.peak + (plan.gpus - 1) * other.peak
        verdict = (f"{plan.gpus} process(es) together {total / GIB:.1f} GiB of {plan.gpu_memory_gib:g} GiB of RAM: "
                   + ("fits" if total <= budget else "DOES NOT FIT"))
    else:
        verdict = f"{result.peak / GIB:.1f} GiB of {plan.gpu_memory_gib:g} GiB: " + \
            ("fits" if result.peak <= budget else "DOES NOT FIT")
    lines += [("memory of each process (resident)" if cpu else "GPU memory of each process"),
              _table(result, host=False), "",
              f"peak by phase (GiB): {_phases_line(result.peaks())}"
              + (f"; the other processes {_phases_line(other.peaks())}" if plan.fsdp else ""),
              f"peak: {result.peak / GIB:.1f} GiB" + (f" (the others {other.peak / GIB:.1f} GiB)" if plan.fsdp else "")
              + f" -> {verdict}"]
    if not cpu:
        per_node = min(plan.gpus, plan.processes_per_node)
        node = result.host_peak + (per_node - 1) * other.host_peak
        fits_node = "" if not plan.host_memory_gib else f" of {plan.host_memory_gib:g} GiB: " + (
            "fits" if node <= plan.host_memory_gib * GIB else "DOES NOT FIT (host memory)")
        lines += ["", "host memory of each process", _table(result, host=True), "",
                  f"host peak by phase (GiB): {_phases_line(result.peaks(host=True))}"
                  + (f"; the other processes {_phases_line(other.peaks(host=True))}" if plan.fsdp else ""),
                  f"host memory per node ({per_node} process(es)): {node / GIB:.1f} GiB at most{fits_node}"]
        most = largest_micro_batch(plan, values)
        lines.append(f"largest micro-batch that fits: {most} prompt(s)" if most else
                     "largest micro-batch that fits: none")
        if result.peak > budget or most < plan.micro_batch_prompts:
            lines += ["levers (peak with each alone):", *(f"  {x}" for x in levers(plan, values))]
    return "\n".join(lines)


def _teacher_line(plan: Plan) -> str:
    if plan.teacher_server:
        return f"; teacher served (its top {plan.teacher_top_k or 20} a token)"
    if not plan.teacher_model:
        return ""
    teacher = Shape.of(shape_values(plan.teacher_model))
    return f"; teacher {plan.teacher_model}: {teacher.parameters / 1e9:.2f}B parameters, {teacher.layers} layers"


def available_bytes(cuda: bool) -> int:
    """Memory free for a new model now: the GPU's free memory, or the host's available memory."""
    if cuda:
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_weights_fit(model: str, weight_bytes: int, processes: int, *, cuda: bool, available: int | None = None,
                      flags: str = "", teacher: str = "", teacher_bytes: int = 0) -> None:
    """Before building the models: one line when their weights alone (``weight_bytes`` a parameter of
    ``model``, both models unless a ``teacher`` of its own takes ``teacher_bytes`` a parameter; sharded
    over ``processes`` on GPUs; on a CPU the processes share the host) exceed the memory available,
    instead of an allocation's traceback or the OOM killer. Models whose config is not at hand (a hub
    id) are not checked."""
    student = _parameters(model)
    if student is None:
        return
    need = (student * weight_bytes + (_parameters(teacher) or 0) * teacher_bytes) / (processes if cuda else 1)
    available = available_bytes(cuda) if available is None else available
    if need > available:
        where = "a GPU" if cuda else "this machine"
        both = f" and --teacher-model {teacher}" if teacher else ""
        raise InputError(f"--model {model}{both}: {student / 1e9:.3g}B parameters"
                         + (f" and {(_parameters(teacher) or 0) / 1e9:.3g}B" if teacher else "")
                         + f", whose weights alone take {need / 2**30:.1f} GiB on {where}, where "
                         f"{available / 2**30:.1f} GiB is available: plan the run with caopd memory --model {model}"
                         f"{' --teacher-model ' + teacher if teacher else ''}{flags} (--force skips this check)")


def _parameters(model: str) -> int | None:
    """A model's parameter count from its config, or None for a hub id (not known before the download)."""
    from caopd.modeling.model_shapes import RANDOM_PREFIX

    if not model:
        return None
    name = model.removeprefix(RANDOM_PREFIX)
    try:
        return Shape.of(shape_values(name)).parameters
    except InputError:
        if model.startswith(RANDOM_PREFIX) or Path(name).exists():
            raise  # a config we should have read
        return None


def check_vocabulary(model: str, tokens: int, flag: str = "--model") -> None:
    """One line when a tokenizer of ``tokens`` ids does not fit the model's embedding: larger (its ids
    past the table), or far smaller (under an eighth: most of the vocabulary never trained, e.g. a
    1,024-token tokenizer on a 151,936-row Qwen3). Models whose config is not at hand are not checked."""
    from caopd.modeling.model_shapes import RANDOM_PREFIX

    name = model.removeprefix(RANDOM_PREFIX)
    if name == "tiny-qwen3":  # built from the tokenizer
        return
    try:
        rows = int(shape_values(name)["vocab_size"])
    except (InputError, KeyError, TypeError, ValueError):
        return
    if tokens > rows or 8 * tokens < rows:
        raise InputError(f"--tokenizer: {tokens:,} tokens do not fit {flag} {model}'s embedding of {rows:,} rows ("
                         + ("ids past its end" if tokens > rows else "most rows would never be trained")
                         + "): use the model's own tokenizer (--tokenizer auto, or qwen3 for random: Qwen3 models)")
