"""fused_linear_token_logprobs: log softmax(W h / T)[y] for each row and its given token y, with
gradients, without materializing the [N, V] logits (what Liger's fused linear cross-entropy is to
the cross-entropy: here the per-token log-probability itself, for losses built on it, such as TRL's
sampled-token distillation).

Per chunk of C rows: z = H W^T / T (one GEMM into a reused [C, V] buffer), log-softmax in place,
gather at y. Backward recomputes the chunks with the upstream gradients g as token weights:
    d log p_y / dz = onehot(y) - p,   dH = (g / T)(onehot - p) W,   dW += ((g / T)(onehot - p))^T H
(2 N H V FLOPs forward, 6 N H V with the backward's recompute; nothing stored between them but the inputs).
"""
from __future__ import annotations

import torch

from .fused_linear_kl import FLOAT_DTYPES, chunked_backward, chunked_forward, one_buffer_chunk_tokens
from .torch_chunked import ChunkResult, _logits, log_softmax_, logits_buffer, outputs, student_grads


@torch.no_grad()
def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           token_ids: torch.Tensor, token_weight: torch.Tensor | None, *, temperature: float,
                           chunk_tokens: int, acc: torch.dtype) -> ChunkResult:
    """log p of each row's token [n] and, with ``token_weight`` [n], the gradients of sum_i w_i log p_i."""
    n = hidden.shape[0]
    compute_grad = token_weight is not None
    logp, grad_hidden, grad_weight, grad_bias = outputs(hidden, weight, bias, compute_grad, acc)
    buffer = logits_buffer(hidden, weight, chunk_tokens, acc)
    for start in range(0, n, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, n))
        ids = token_ids[rows].unsqueeze(1)
        z = log_softmax_(_logits(hidden[rows], weight, bias, temperature, acc,
                                 None if buffer is None else buffer[:rows.stop - rows.start]))
        logp[rows] = z.gather(1, ids).squeeze(1)
        if compute_grad:
            grad_z = z.exp_().neg_().scatter_add_(1, ids, torch.ones_like(ids, dtype=acc))  # onehot - p
            student_grads(grad_z, hidden[rows], weight, (token_weight[rows] / temperature).unsqueeze(1), acc,
                          grad_hidden, rows, grad_weight, grad_bias)
        del z
    return ChunkResult(logp, grad_hidden, grad_weight, grad_bias)


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def run(temperature: float, chunk_tokens: int):
        def chunks(inputs, rows, token_weight, acc):
            hidden, weight, bias, token_ids = inputs
            return chunked_token_logprobs(hidden[rows], weight, bias, token_ids[rows], token_weight,
                                          temperature=temperature, chunk_tokens=chunk_tokens, acc=acc)
        return chunks

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, temperature: float, chunk_tokens: int):
        ctx.settings = (temperature, chunk_tokens)
        run = FusedLinearTokenLogprobsFunction.run(temperature, chunk_tokens)
        logp, _ = chunked_forward(ctx, run, (hidden, weight, bias, token_ids), None, "none")
        return logp

    @staticmethod
    def backward(ctx, grad_output):
        run = FusedLinearTokenLogprobsFunction.run(*ctx.settings)
        grads = chunked_backward(ctx, grad_output, run, "none", "fused_linear_token_logprobs")
        return (*grads, None, None, None)


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *,
                                bias: torch.Tensor | None = None, temperature: float = 1.0,
                                chunk_tokens: int | None = None, memory_budget: int | None = None) -> torch.Tensor:
    """log softmax(weight @ hidden[i] / T)[token_ids[i]] for each row [N] (fp32; fp64 for fp64 inputs),
    differentiable w.r.t. hidden [N, H], weight [V, H] and bias [V]. chunk_tokens / memory_budget: as in
    fused_linear_kl (one [C, V] fp32 buffer)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a 2-D float tensor")
    if hidden.shape[1] != weight.shape[1] or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden {tuple(hidden.shape)} {hidden.dtype} and weight {tuple(weight.shape)} {weight.dtype} "
                         "must share H and dtype")
    vocab = weight.shape[0]
    n = hidden.shape[0]
    if not isinstance(token_ids, torch.Tensor) or token_ids.shape != (n,) or token_ids.is_floating_point():
        raise ValueError(f"token_ids must be an integer tensor [N] = [{n}]")
    if token_ids.numel() and bool((token_ids < 0).any() or (token_ids >= vocab).any()):
        raise ValueError(f"token_ids must lie in [0, V) = [0, {vocab})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens is None:
        chunk_tokens = one_buffer_chunk_tokens(vocab, weight.shape[1], memory_budget)
    with torch.autocast(hidden.device.type, enabled=False):
        return FusedLinearTokenLogprobsFunction.apply(hidden, weight, bias, token_ids.long(), float(temperature),
                                                      int(chunk_tokens))
