"""``caopd memory``: peak memory per GPU (or CPU process) of a CaOPD run, estimated before launching it.

Analytic, from the model's shape (``model_shapes``) and the run's settings. Two phases peak apart:
*generation* (the engine samples; gradients were freed after the last step) and *training* (one
micro-batch's forward and backward). Persistent in both: the trained weights, Adam's moments, the
EMA teacher, the rollout copy; training adds the gradients, the saved activations, the fused
loss's buffers and transient per-layer work; generation adds the engine's KV cache (transformers)
or its memory share (vLLM colocated: sleep mode frees it while the step trains).

Activations: saved tensors per token per layer of a Qwen3 decoder layer under autograd, counted
from its forward: the two RMSNorm inputs and outputs (4 H), q and k before and after their norm and
RoPE, v, the attention output, the K/V repeated for grouped-query SDPA (5 Hq + 3 Hkv, Hq = query
heads x head_dim, Hkv = KV heads x head_dim), gate, up, SiLU(gate) and their product (4 I). With
gradient checkpointing only each layer's input (H) is kept, plus one layer recomputed. The shared
prefix runs prefix + K completions instead of K x (prefix + completion) tokens; the completions
then attend to the prefix's keys and values repeated K times (counted). Validated against measured
peaks on CPU (``benchmarks/memory_check.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from caopd_kernels.fused_linear_kl import DEFAULT_MEMORY_BUDGET as LOSS_BUDGET
from caopd_kernels.fused_linear_kl import MIN_CHUNK_TOKENS

from caopd.modeling.model_shapes import shape_values

GIB = 2**30
CUDA_CONTEXT = 0.6 * GIB  # the CUDA context and kernels of one process (typical)


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

    def saved_per_token_layer(self, liger: bool = False) -> int:
        """Elements autograd keeps per token per decoder layer (see the module docstring); with
        Liger's SwiGLU (gate and up only) and in-place RoPE (no rotated copies kept)."""
        if liger:
            return 4 * self.hidden + 3 * self.q_width + 1 * self.kv_width + 2 * self.intermediate
        return 4 * self.hidden + 5 * self.q_width + 3 * self.kv_width + 4 * self.intermediate


@dataclass(frozen=True)
class Plan:
    model: str
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    prompt_tokens: int = 1024
    completion_tokens: int = 1024
    num_generations: int = 8
    prompts_per_step: int = 32
    micro_batch_prompts: int = 1
    fsdp: bool = False
    lora_r: int = 0
    gradient_checkpointing: bool = False
    shared_prefix: bool = True
    rollout_engine: str = "transformers"
    vllm_gpu_memory_utilization: float = 0.3
    optimizer_offload: bool = False
    liger_kernels: bool = False
    master_weights: str = "fp32"  # or bf16 (stochastic-rounding AdamW)
    device: str = "cuda"  # "cpu": fp32 everywhere, no CUDA context, no vLLM share


@dataclass
class Estimate:
    rows: list[tuple[str, float]]  # (component, bytes)
    generation_peak: float
    training_peak: float

    @property
    def peak(self) -> float:
        return max(self.generation_peak, self.training_peak)


def _lora_parameters(shape: Shape, r: int) -> int:
    """Adapters of rank r on the seven projections of every layer."""
    h, i = shape.hidden, shape.intermediate
    per_layer = r * ((h + shape.q_width) * 2 + (h + shape.kv_width) * 2 + (h + i) * 3)
    return shape.layers * per_layer


def estimate(plan: Plan, values: dict | None = None) -> Estimate:
    shape = Shape.of(values or shape_values(plan.model))
    cpu = plan.device == "cpu"
    n = shape.parameters
    shard = plan.gpus if plan.fsdp else 1
    compute = 4 if cpu else 2  # bytes of an activation / compute weight
    lora = plan.lora_r > 0
    trainable = _lora_parameters(shape, plan.lora_r) if lora else n
    master = 4 if cpu or plan.master_weights == "fp32" or lora else 2
    rows: list[tuple[str, float]] = []
    if lora:  # the frozen base in the compute dtype, the adapters in fp32
        rows.append(("base weights (frozen)", n * compute / shard))
        rows.append(("adapters", trainable * 4 / shard))
    else:
        rows.append(("trained weights" + (" (fp32 master)" if master == 4 and not cpu else ""), n * master / shard))
    moments = 2 * trainable * (4 if master == 4 else 2) / shard
    rows.append(("Adam moments" + (" (offloaded to CPU)" if plan.optimizer_offload and not plan.fsdp else ""),
                 0.0 if plan.optimizer_offload and not plan.fsdp else moments))
    if lora:
        rows.append(("EMA teacher (adapters; the base is shared)", trainable * 4 / shard))
    else:
        teacher_bytes = 4 if cpu or plan.fsdp else 2
        rows.append(("EMA teacher", n * teacher_bytes / shard))
    offloaded = plan.fsdp and plan.optimizer_offload and not cpu  # FSDP2's CPUOffloadPolicy: shards, grads, Adam
    if offloaded:
        host = sum(b for _, b in rows) + trainable * 4 / shard  # + the gradients
        rows = [(f"{name} (in CPU memory)", 0.0) for name, _ in rows]
        rows.append((f"host memory per process, not on the GPU: {host / GIB:.1f} GiB", 0.0))
    if plan.fsdp and not cpu:  # both roots (embeddings, lm_heads) gathered in bf16 through the step
        rows.append(("FSDP gathered roots + 2 layers in flight", 2 * (shape.embedding_parameters * 2)
                     + 2 * 2 * shape.layer_parameters * 2))
    if plan.fsdp:
        rows.append(("whole rollout copy (per process)", n * compute))
    if not cpu:
        rows.append(("CUDA context", CUDA_CONTEXT))
    persistent = sum(b for _, b in rows)

    # training phase, one micro-batch
    p, c, k, mb = plan.prompt_tokens, plan.completion_tokens, plan.num_generations, plan.micro_batch_prompts
    student_tokens = mb * (p + k * c) if plan.shared_prefix else mb * k * (p + c)
    grads = 0.0 if offloaded else trainable * 4 / shard
    per_layer = shape.saved_per_token_layer(plan.liger_kernels) * compute
    if plan.gradient_checkpointing:
        saved = student_tokens * shape.hidden * compute * shape.layers + student_tokens * per_layer
    else:
        saved = student_tokens * per_layer * shape.layers
    if plan.shared_prefix and not plan.gradient_checkpointing and not plan.fsdp:  # cache path: prefix K/V x K
        saved += mb * k * p * (2 * shape.kv_width + 2 * shape.q_width) * compute * shape.layers
    completion_rows = mb * k * c
    hidden_rows = 3 * completion_rows * shape.hidden * 4  # student rows, their gradient, teacher rows
    # chunk buffers (caopd_kernels' budget rule: [C, V] fp32, 2 of them for reverse KL; C from the budget,
    # at most the micro-batch's completion tokens) + the lm_head's fp32 dW, stored from forward to backward
    chunk = min(completion_rows, max(MIN_CHUNK_TOKENS, LOSS_BUDGET // (2 * shape.vocab * 4)))
    loss = 2 * chunk * shape.vocab * 4 + shape.vocab * shape.hidden * 4
    teacher_cache = mb * k * (p + c) * shape.layers * 2 * shape.kv_width * compute  # the teacher's prefix cache
    training = [("gradients", grads), ("student activations (saved for backward)", saved),
                ("final hidden rows (both models)", hidden_rows), ("fused loss: chunk buffers + lm_head dW", loss),
                ("teacher forward: prefix cache of the micro-batch", teacher_cache)]

    # generation phase
    if plan.rollout_engine == "vllm" and not cpu:
        generation = [("vLLM (colocated: its memory share; asleep while training)",
                       plan.vllm_gpu_memory_utilization * plan.gpu_memory_gib * GIB)]
    else:
        kv = k * (p + c) * shape.layers * 2 * shape.kv_width * compute  # one prompt's K rows at a time
        generation = [("generation: KV cache + logits of one prompt's K samples", kv + k * shape.vocab * 4 * 2)]
    rows += training + generation
    return Estimate(rows, persistent + sum(b for _, b in generation), persistent + sum(b for _, b in training))


def largest_micro_batch(plan: Plan, values: dict | None = None) -> int:
    """The most prompts a micro-batch can hold within the GPU memory (0: not even one)."""
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
    if plan.fsdp and not plan.optimizer_offload:
        options.append(("--fsdp-cpu-offload true (shards, gradients, Adam states in CPU memory)",
                        replace(plan, optimizer_offload=True)))
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


def report(plan: Plan) -> str:
    """The table ``caopd memory`` prints."""
    from caopd.evaluation.tables import format_table

    values = shape_values(plan.model)
    shape = Shape.of(values)
    result = estimate(plan, values)
    where = "CPU process" if plan.device == "cpu" else f"GPU (of {plan.gpus})"
    lines = [f"{plan.model}: {shape.parameters / 1e9:.2f}B parameters, {shape.layers} layers, vocabulary "
             f"{shape.vocab}; per {where}; prompt {plan.prompt_tokens} + completion {plan.completion_tokens} "
             f"tokens, K = {plan.num_generations}, {plan.micro_batch_prompts} prompt(s) a micro-batch", ""]
    lines.append(format_table(["component", "GiB"], [[name, f"{b / GIB:.2f}"] for name, b in result.rows]))
    budget = plan.gpu_memory_gib * GIB
    lines += ["", f"peak: generation {result.generation_peak / GIB:.1f} GiB, training {result.training_peak / GIB:.1f}"
              f" GiB -> {result.peak / GIB:.1f} GiB of {plan.gpu_memory_gib:g} GiB: "
              + ("fits" if result.peak <= budget else "DOES NOT FIT")]
    if plan.device != "cpu":
        most = largest_micro_batch(plan, values)
        lines.append(f"largest micro-batch that fits: {most} prompt(s)" if most else
                     "largest micro-batch that fits: none")
        if result.peak > budget or most < plan.micro_batch_prompts:
            lines += ["levers (peak with each alone):", *(f"  {x}" for x in levers(plan, values))]
    return "\n".join(lines)

