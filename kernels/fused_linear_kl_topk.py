"""fused_linear_kl_topk: the distillation loss against a teacher known by its top-k log-probabilities
(a served or larger teacher: vLLM's prompt_logprobs), without materializing the [N, V] logits.

The math (buckets, tail, gradients) is in kernels/topk_chunked.py's header. Gradients are computed
in the forward, chunk by chunk, and stored as saved tensors (autograd keeps them as .grad without a
copy); for reduction="none" backward recomputes the chunks with its per-token weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused_linear_kl import (
    DIVERGENCES,
    FLOAT_DTYPES,
    REDUCTIONS,
    _check_mask,
    chunked_backward,
    chunked_forward,
    default_memory_budget,
    one_buffer_chunk_tokens,
    resolve_impl,
)
from .topk_chunked import TAILS, chunked_linear_kl_topk, sparse_support

TOPK_IMPLS = ("auto", "torch", "triton")
LOGPROB_SLACK = 1e-3  # how far above 0 a teacher log-probability (or log sum q_S) may round


@dataclass(frozen=True)
class TopKOptions:
    divergence: str
    beta: float
    tail: str
    temperature: float
    reduction: str
    chunk_tokens: int
    impl: str = "torch"  # "triton": the passes over [C, V] in triton_topk


def _described(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_topk_inputs(student_hidden, student_weight, teacher_ids, teacher_logprobs, mask, student_bias,
                       divergence, beta, tail, temperature, reduction, impl, chunk_tokens, memory_budget) -> None:
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a 2-D float tensor, got {_described(t)}")
    n, hidden = student_hidden.shape
    vocab = student_weight.shape[0]
    if student_weight.shape[1] != hidden:
        raise ValueError(f"student_weight {tuple(student_weight.shape)} does not match H = {hidden} of student_hidden")
    if not isinstance(teacher_ids, torch.Tensor) or teacher_ids.dim() != 2 or teacher_ids.shape[0] != n \
            or teacher_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_ids must be an integer tensor [N, k] with N = {n}, got {_described(teacher_ids)}")
    k = teacher_ids.shape[1]
    if not isinstance(teacher_logprobs, torch.Tensor) or teacher_logprobs.shape != (n, k) \
            or not teacher_logprobs.is_floating_point():
        raise ValueError(f"teacher_logprobs must be a float tensor [N, k] = [{n}, {k}] like teacher_ids, got "
                         f"{_described(teacher_logprobs)}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k} teacher tokens a position, but the vocabulary has V = {vocab}: need 1 <= k <= V")
    devices = {t.device for t in (student_hidden, student_weight, teacher_ids, teacher_logprobs)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if student_bias is not None and (student_bias.shape != (vocab,) or student_bias.dtype != student_weight.dtype):
        raise ValueError(f"student_bias must be [V] = [{vocab}] of dtype {student_weight.dtype}")
    if n:
        if bool((teacher_ids < 0).any() or (teacher_ids >= vocab).any()):
            raise ValueError(f"teacher_ids must lie in [0, V) = [0, {vocab})")
        if k > 1 and bool((teacher_ids.sort(dim=1).values.diff(dim=1) == 0).any()):
            row = int((teacher_ids.sort(dim=1).values.diff(dim=1) == 0).any(1).nonzero()[0])
            raise ValueError(f"teacher_ids repeat a token at position {row}: a top-k list names k distinct tokens")
        if not bool(torch.isfinite(teacher_logprobs).all()) or bool((teacher_logprobs > LOGPROB_SLACK).any()):
            raise ValueError("teacher_logprobs must be finite log-probabilities (<= 0)")
        if bool((torch.logsumexp(teacher_logprobs.double(), dim=-1) > LOGPROB_SLACK).any()):
            raise ValueError("teacher_logprobs of a position sum to more than 1 in probability: pass log-probabilities "
                             "(log_softmax over the vocabulary), not logits")
    _check_mask(mask, n, student_hidden.device)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"divergence='jsd' needs 0 < beta < 1, got {beta}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in TOPK_IMPLS:
        raise ValueError(f"impl must be one of {TOPK_IMPLS} for the top-k loss, got {impl!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if chunk_tokens is None and memory_budget is not None and not memory_budget > 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")


class FusedLinearKLTopKFunction(torch.autograd.Function):
    @staticmethod
    def run(options: TopKOptions):
        def chunks(inputs, rows, token_weight, acc):
            student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs = inputs
            return chunked_linear_kl_topk(
                student_hidden[rows], student_weight, student_bias, teacher_ids[rows], teacher_logprobs[rows],
                token_weight, divergence=options.divergence, beta=options.beta, tail=options.tail,
                temperature=options.temperature, chunk_tokens=options.chunk_tokens, acc=acc, impl=options.impl)
        return chunks

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, mask,
                options: TopKOptions):
        ctx.options = options
        inputs = (student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs)
        return chunked_forward(ctx, FusedLinearKLTopKFunction.run(options), inputs, mask, options.reduction)

    @staticmethod
    def backward(ctx, grad_output, _grad_token_losses):
        options = ctx.options
        grads = chunked_backward(ctx, grad_output, FusedLinearKLTopKFunction.run(options), options.reduction,
                                 "fused_linear_kl_topk")
        return (*grads, None, None, None, None)


def fused_linear_kl_topk(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor, mask: torch.Tensor | None = None, *, divergence: str = "forward",
    beta: float = 0.5, tail: str = "bucket", temperature: float = 1.0, student_bias: torch.Tensor | None = None,
    reduction: str = "mean", impl: str = "auto", chunk_tokens: int | None = None, memory_budget: int | None = None,
    return_token_losses: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence between softmax(W_s h_s / T) and a teacher given by its top-k log-probabilities.

    student_hidden [N, H] and student_weight [V, H] (and student_bias [V]) get gradients. teacher_ids
    [N, k]: k distinct token ids a position (e.g. the teacher's top k); teacher_logprobs [N, k]: the
    teacher's log-probabilities of those tokens over its whole vocabulary, as served (its temperature
    is its own; ``temperature`` divides the student's logits only). tail: "bucket" (the support plus one
    bucket for the rest: forward KL with it is the peers' top-k KL, and the dense KL at k = V) or "none"
    (both sides renormalised on the support). divergence "forward" KL(t||s), "reverse" KL(s||t), "jsd"
    (0 < beta < 1, mixture beta t + (1 - beta) s), over the buckets. mask, reduction,
    return_token_losses: as in ``fused_linear_kl``. chunk_tokens / memory_budget: tokens per chunk, or
    the bytes of the chunk's one [C, V] fp32 buffer (default: ``default_memory_budget``); with
    tail="none" and k <= V / 64 the budget bounds the gathered [C, k, H] weight rows instead.
    impl: "auto" (triton on CUDA, torch elsewhere), "torch" or "triton" (the two passes over each chunk's
    [C, V] logits fused in Triton; fp32 logits). Returns fp32 (fp64 for fp64 inputs).
    """
    _check_topk_inputs(student_hidden, student_weight, teacher_ids, teacher_logprobs, mask, student_bias,
                       divergence, beta, tail, temperature, reduction, impl, chunk_tokens, memory_budget)
    vocab, hidden = student_weight.shape
    k = teacher_ids.shape[1]
    if chunk_tokens is None:
        budget = default_memory_budget(vocab, hidden) if memory_budget is None else memory_budget
        if sparse_support(vocab, k, tail):  # [C, k, H] gathered rows and their fp32 products
            chunk_tokens = max(1, budget // (2 * k * hidden * 4))
        else:  # one [C, V] buffer: logits, then dL/dz in place
            chunk_tokens = one_buffer_chunk_tokens(vocab, hidden, budget)
    impl = resolve_impl(impl, student_hidden.device)
    options = TopKOptions(divergence, float(beta), tail, float(temperature), reduction, int(chunk_tokens), impl)
    with torch.autocast(student_hidden.device.type, enabled=False):
        loss, token_losses = FusedLinearKLTopKFunction.apply(
            student_hidden, student_weight, student_bias, teacher_ids.long(), teacher_logprobs.detach(), mask, options)
    return (loss, token_losses) if return_token_losses else loss
