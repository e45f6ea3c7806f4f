"""fused_linear_kl: the distillation loss between a student's and a teacher's lm_head outputs,
without materializing the [N, V] logits.

Gradients are computed in the forward, chunk by chunk (kernels/torch_chunked.py), and stored;
backward only scales them by grad_output (for reduction="none", whose grad_output is per token,
backward recomputes the chunks with those weights instead). Only counted tokens (mask) enter the
computation at all. The teacher side never receives a gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import accumulation_dtype, fused_linear_kl_reference
from .torch_chunked import TORCH_BUFFERS, chunked_linear_kl, kl_rows_torch

DIVERGENCES = ("reverse", "forward", "jsd")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch", "reference")
VOCAB_RULES = ("equal", "common")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEFAULT_MEMORY_BUDGET = 768 << 20  # the default budget's ceiling (a 4B+ model's head)
MIN_DEFAULT_BUDGET = 64 << 20  # and its floor (small heads: one chunk)
MIN_CHUNK_TOKENS = 1


@dataclass(frozen=True)
class KLOptions:
    divergence: str
    beta: float
    temperature: float
    reduction: str
    impl: str  # "triton" or "torch" once resolved
    chunk_tokens: int


def divergence_for_beta(beta: float, name: str = "beta") -> tuple[str, float]:
    """The generalized-JSD family as Liger and TRL parametrize it, as (divergence, beta) here:
    beta 0 is KL(t||s) ("forward"), 1 is KL(s||t) ("reverse"), between the JSD with mixture
    beta·t + (1-beta)·s. ``name``: the caller's name for beta, in the error."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {beta}")
    if beta in (0.0, 1.0):
        return ("forward" if beta == 0.0 else "reverse"), 0.5
    return "jsd", float(beta)


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda":
        from .triton_kl import interpreting

        if not interpreting():
            raise ValueError("impl='triton' needs CUDA tensors; on CPU set TRITON_INTERPRET=1 before "
                             "importing triton (tests only, slow) or use impl='torch'")
    return impl


def default_memory_budget(vocab: int, hidden: int) -> int:
    """The transient budget when none is given: half the fp32 dW_s the call returns (V x H_s x 4 bytes),
    within [64 MiB, 768 MiB]. The call's peak is then at most 1.5x the gradient any implementation must
    return, and the chunks stay large enough for full-speed GEMMs (on CPU a chunk's GEMMs cost the same
    per token from C ~ 256 up: at Qwen3-0.6B's head, 297 MiB gives C = 256 for reverse KL)."""
    return min(DEFAULT_MEMORY_BUDGET, max(MIN_DEFAULT_BUDGET, vocab * hidden * 4 // 2))


def one_buffer_chunk_tokens(vocab: int, hidden: int, memory_budget: int | None) -> int:
    """Tokens per chunk of the kernels that hold one [C, V] fp32 buffer (top-k, token log-probs, top-k
    log-probs) within ``memory_budget`` bytes (None: ``default_memory_budget``)."""
    budget = default_memory_budget(vocab, hidden) if memory_budget is None else memory_budget
    return max(MIN_CHUNK_TOKENS, budget // (vocab * 4))


def chunk_tokens_for_budget(vocab: int, impl: str, divergence: str, memory_budget: int) -> int:
    """Tokens per chunk so that the chunk's [C, V] fp32 buffers fit in ``memory_budget`` bytes.

    The budget is the transient memory; the gradients returned (dW_s: V x H_s, the fp32
    accumulator when the weight is not fp32) come on top, as they do for any implementation.
    Larger chunks make faster GEMMs: raise the budget where memory allows."""
    buffers = 2 if impl == "triton" else TORCH_BUFFERS[divergence]
    return max(MIN_CHUNK_TOKENS, memory_budget // (buffers * vocab * 4))


def _check_mask(mask: torch.Tensor | None, n: int, device: torch.device) -> None:
    """bool (tokens that count), floating (weights >= 0), or integer 0/1 (an attention mask)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.shape != (n,):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape [N] = [{n}], got {shape}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the hidden states are on {device}")
    if mask.is_floating_point():
        if mask.requires_grad:
            raise ValueError("mask requires grad, but per-token weights get no gradient from fused_linear_kl: "
                             "pass mask.detach()")
        if bool((mask < 0).any() or not torch.isfinite(mask).all()):
            raise ValueError("a float mask holds per-token weights: they must be finite and >= 0")
    elif mask.dtype != torch.bool:
        if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"an integer mask ({mask.dtype}) must hold only 0 and 1; pass a bool mask, or a "
                             "float mask of per-token weights >= 0")


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, student_bias,
                  teacher_bias, divergence, beta, temperature, reduction, chunk_tokens, memory_budget) -> None:
    named = {"student_hidden": student_hidden, "student_weight": student_weight,
             "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__} "
                             "(flatten [B, T, H] to [B*T, H] first)")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; use float32, bfloat16 or float16")
    n, h_s = student_hidden.shape
    v, h_t = teacher_weight.shape
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"student_hidden has {n} tokens but teacher_hidden has {teacher_hidden.shape[0]}")
    if student_weight.shape != (v, h_s):
        raise ValueError(f"student_weight {tuple(student_weight.shape)} does not match [V, H_s] = [{v}, {h_s}] "
                         "(V from teacher_weight, H_s from student_hidden)")
    if teacher_hidden.shape[1] != h_t:
        raise ValueError(f"teacher_hidden has H_t = {teacher_hidden.shape[1]} but teacher_weight has {h_t}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    for name, bias, rows in (("student_bias", student_bias, student_weight), ("teacher_bias", teacher_bias,
                                                                               teacher_weight)):
        if bias is not None and (bias.shape != (v,) or bias.dtype != rows.dtype):
            raise ValueError(f"{name} must be [V] = [{v}] of dtype {rows.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if v == 0:
        raise ValueError("the weights have V = 0 rows: a distribution over an empty vocabulary is undefined")
    _check_mask(mask, n, student_hidden.device)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"divergence='jsd' needs 0 < beta < 1, got {beta}; at beta = 0 or 1 the JSD is 0: "
                         "use divergence='forward' or 'reverse' for the KL endpoints")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if chunk_tokens is None and memory_budget is not None and not memory_budget > 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")


def _kl_rows(impl: str):
    if impl == "triton":
        from .triton_kl import kl_rows_triton

        return kl_rows_triton
    return kl_rows_torch


def _full_grads(result, counted, student_hidden, student_weight, student_bias):
    """Gradients in the inputs' shapes and dtypes: counted tokens' dH scattered back to all N."""
    grad_hidden = result.grad_hidden
    if counted is not None:
        grad_hidden = torch.zeros_like(student_hidden).index_copy_(0, counted, grad_hidden)
    return (grad_hidden, result.grad_weight.to(student_weight.dtype),
            None if result.grad_bias is None else result.grad_bias.to(student_bias.dtype))


def chunked_forward(ctx, run, inputs: tuple, mask, reduction: str):
    """The fused losses' shared forward. inputs: (student_hidden, student_weight, student_bias, *the
    rest); ``run(inputs, rows, token_weight, acc)`` runs the chunks over the counted ``rows`` of the
    per-token inputs. Returns (loss, token losses); the gradients, computed here, are saved tensors
    (the engine releases them before AccumulateGrad, which then keeps each as .grad instead of copying
    it: a second dW at the peak), or for reduction="none" the inputs, to recompute them in backward."""
    student_hidden, student_weight, student_bias = inputs[:3]
    acc = accumulation_dtype(student_hidden.dtype)
    counted = None if mask is None else mask.nonzero().squeeze(1)  # [n] indices of tokens that count
    mask_weight = None if mask is None else mask[counted].to(acc)  # [n]: 1 for a bool mask
    n = student_hidden.shape[0] if counted is None else counted.numel()
    total_weight = float(n) if mask_weight is None else float(mask_weight.sum())
    needs_grad = any(ctx.needs_input_grad[:3])
    token_weight = None
    if needs_grad and reduction != "none":
        token_weight = torch.ones(n, dtype=acc, device=student_hidden.device) if mask_weight is None \
            else mask_weight.clone()
        if reduction == "mean":
            token_weight /= max(total_weight, 1e-30)
    rows = slice(None) if counted is None else counted
    result = run(inputs, rows, token_weight, acc)
    weighted = result.loss if mask_weight is None else result.loss * mask_weight
    token_losses = torch.zeros(student_hidden.shape[0], dtype=acc, device=student_hidden.device)
    token_losses[rows] = result.loss  # unweighted, 0 where masked: a second output, never differentiated
    ctx.mark_non_differentiable(token_losses)
    if reduction == "none":
        per_token = torch.zeros_like(token_losses)
        per_token[rows] = weighted
        ctx.save_for_backward(*inputs, counted, mask_weight)
        return per_token, token_losses
    if needs_grad:
        ctx.save_for_backward(*_full_grads(result, counted, student_hidden, student_weight, student_bias))
    total = weighted.sum()
    return (total / total_weight if reduction == "mean" and total_weight > 0 else total), token_losses


def chunked_backward(ctx, grad_output, run, reduction: str, name: str) -> tuple:
    """The fused losses' shared backward: (dH, dW, db) of the student, each where asked for."""
    if torch.is_grad_enabled():  # backward(create_graph=True): a gradient of the gradient was asked for
        raise RuntimeError(f"{name} does not support double backward (create_graph=True): its gradients are "
                           "computed in closed form, not as a differentiable graph")
    with torch.autocast(grad_output.device.type, enabled=False):  # as the forward: no autocast GEMMs
        if reduction == "none":
            *inputs, counted, mask_weight = ctx.saved_tensors
            rows = slice(None) if counted is None else counted
            acc = accumulation_dtype(inputs[0].dtype)
            token_weight = grad_output[rows].to(acc)
            if mask_weight is not None:
                token_weight = token_weight * mask_weight
            grads = _full_grads(run(tuple(inputs), rows, token_weight, acc), counted, *inputs[:3])
        else:
            grads = ctx.saved_tensors  # kept for a second backward only under retain_graph
            if not torch.equal(grad_output, torch.ones_like(grad_output)):
                grads = tuple(None if g is None else g * grad_output.to(g.dtype) for g in grads)
    return tuple(g if wanted else None for g, wanted in zip(grads, ctx.needs_input_grad[:3]))


class FusedLinearKLFunction(torch.autograd.Function):
    @staticmethod
    def run(options: KLOptions):
        def chunks(inputs, rows, token_weight, acc):
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = inputs
            return chunked_linear_kl(
                student_hidden[rows], student_weight, student_bias, teacher_hidden[rows], teacher_weight,
                teacher_bias, token_weight, divergence=options.divergence, beta=options.beta,
                temperature=options.temperature, chunk_tokens=options.chunk_tokens, kl_rows=_kl_rows(options.impl),
                acc=acc)
        return chunks

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                mask, options: KLOptions):
        ctx.options = options
        inputs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        return chunked_forward(ctx, FusedLinearKLFunction.run(options), inputs, mask, options.reduction)

    @staticmethod
    def backward(ctx, grad_output, _grad_token_losses):
        options = ctx.options
        grads = chunked_backward(ctx, grad_output, FusedLinearKLFunction.run(options), options.reduction,
                                 "fused_linear_kl")
        return (*grads, None, None, None, None, None)


def _common_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                   vocab: str):
    """Unequal vocabularies (vocab="common": the first min(V_s, V_t) rows of both heads) and mixed
    dtypes (a hidden state and its weight of different floating types: both cast to the wider one,
    as a GEMM in that type; the casts are differentiable, so each gradient returns in its input's
    dtype). Anything else passes through for _check_inputs to judge."""
    if vocab not in VOCAB_RULES:
        raise ValueError(f"vocab must be one of {VOCAB_RULES}, got {vocab!r}")
    weights = (student_weight, teacher_weight)
    if all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights) and \
            student_weight.shape[0] != teacher_weight.shape[0]:
        v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
        if vocab != "common":
            raise ValueError(f"student_weight has V_s = {v_s} rows but teacher_weight has V_t = {v_t}: pass "
                             f"vocab='common' to compare the distributions over the first min(V_s, V_t) = "
                             f"{min(v_s, v_t)} rows (the token ids both heads share)")
        v = min(v_s, v_t)
        student_weight, teacher_weight = student_weight[:v], teacher_weight[:v]
        student_bias = None if student_bias is None else student_bias[:v]
        teacher_bias = None if teacher_bias is None else teacher_bias[:v]
    sides = []
    for hidden, weight, bias in ((student_hidden, student_weight, student_bias),
                                 (teacher_hidden, teacher_weight, teacher_bias)):
        if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor) and hidden.dtype != weight.dtype \
                and hidden.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES:
            wide = torch.promote_types(hidden.dtype, weight.dtype)
            hidden, weight = hidden.to(wide), weight.to(wide)
            bias = None if bias is None else bias.to(wide)
        sides.append((hidden, weight, bias))
    (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias) = sides
    return student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias


def fused_linear_kl(
    student_hidden: torch.Tensor, student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None, *, divergence: str = "reverse", beta: float = 0.5,
    temperature: float = 1.0, student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
    reduction: str = "mean", impl: str = "auto", chunk_tokens: int | None = None,
    memory_budget: int | None = None, vocab: str = "equal", return_token_losses: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence between softmax(W_s h_s / T) and softmax(W_t h_t / T), reduced.

    student_hidden [N, H_s] and student_weight [V, H_s] (and student_bias [V]) get gradients;
    teacher_hidden [N, H_t], teacher_weight [V, H_t] never do (teacher_weight may be the same
    tensor as student_weight). mask [N]: bool or integer 0/1, the tokens that count (None = all),
    or float per-token weights w >= 0 (anything else is a ValueError). divergence: "reverse"
    KL(s||t), "forward" KL(t||s), "jsd" (0 < beta < 1). reduction: "mean" = sum w L / sum w (0
    when nothing counts), "sum" = sum w L, or "none" = w L per token [N] (0 where masked). impl:
    "auto" (triton on CUDA, torch elsewhere), "triton", "torch", "reference" (naive full logits, for tests).
    chunk_tokens: tokens per chunk; None picks it from ``memory_budget`` bytes (the chunk's
    transient [C, V] buffers; None: ``default_memory_budget``, half the fp32 dW_s within
    [64 MiB, 768 MiB]). Returns fp32
    (fp64 for fp64 inputs).

    A hidden state and its weight may have different floating dtypes (autocast: bf16 hidden, fp32
    weight): that side's GEMM runs in the wider type and each gradient comes back in its input's
    dtype. vocab: "equal" (default: V_s != V_t is an error naming the option) or "common" (both
    distributions over the first min(V_s, V_t) rows; the student's other rows get zero gradient).
    return_token_losses: also return each token's divergence [N] (unweighted, 0 where masked, no
    gradient), e.g. to log a token mean beside a loss weighted otherwise; it costs no extra pass.
    """
    student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias = _common_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, vocab)
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, student_bias, teacher_bias,
                  divergence, beta, temperature, reduction, chunk_tokens, memory_budget)
    if impl == "reference":
        kwargs = dict(divergence=divergence, beta=beta, temperature=temperature, student_bias=student_bias,
                      teacher_bias=teacher_bias)
        loss = fused_linear_kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                         reduction=reduction, **kwargs)
        if not return_token_losses:
            return loss
        with torch.no_grad():
            counts = None if mask is None else (mask != 0)
            tokens = fused_linear_kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                               counts, reduction="none", **kwargs)
        return loss, tokens
    impl = resolve_impl(impl, student_hidden.device)
    if impl == "triton" and student_hidden.dtype == torch.float64:
        raise ValueError("impl='triton' takes float32, bfloat16 or float16; use impl='torch' for float64")
    if chunk_tokens is None:
        vocab_rows, hidden = student_weight.shape
        budget = default_memory_budget(vocab_rows, hidden) if memory_budget is None else memory_budget
        chunk_tokens = chunk_tokens_for_budget(vocab_rows, impl, divergence, budget)
    options = KLOptions(divergence, float(beta), float(temperature), reduction, impl, int(chunk_tokens))
    with torch.autocast(student_hidden.device.type, enabled=False):  # the GEMMs in the inputs' (widened) dtype
        loss, token_losses = FusedLinearKLFunction.apply(
            student_hidden, student_weight, student_bias, teacher_hidden.detach(), teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(), mask, options)
    return (loss, token_losses) if return_token_losses else loss


class FusedLinearKL(torch.nn.Module):
    """``fused_linear_kl`` as a module: the options are fixed at construction."""

    def __init__(self, divergence: str = "reverse", beta: float = 0.5, temperature: float = 1.0,
                 reduction: str = "mean", impl: str = "auto", chunk_tokens: int | None = None,
                 memory_budget: int | None = None, vocab: str = "equal"):
        super().__init__()
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction,
                            impl=impl, chunk_tokens=chunk_tokens, memory_budget=memory_budget, vocab=vocab)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                student_bias=None, teacher_bias=None) -> torch.Tensor:
        return fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                               student_bias=student_bias, teacher_bias=teacher_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items() if v is not None)
