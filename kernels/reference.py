"""The naive full-logit linear-KL: what every other implementation is tested against.

It materializes both [N, V] logit matrices in fp32 (fp64 for fp64 inputs) and lets autograd do
the rest. Written plainly on purpose; use it only for tests and as the benchmarks' baseline.
"""
from __future__ import annotations

import math

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_tokens(loss: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """The fused losses' reductions of per-token losses [N]: each weighted by the mask (bool or float), then
    "none", "sum", or "mean" (the weighted sum over the total weight; 0 when nothing counts)."""
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    total_weight = loss.numel() if mask is None else float(mask.to(loss.dtype).sum())
    return loss.sum() / total_weight if total_weight > 0 else loss.sum()


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str,
                 beta: float) -> torch.Tensor:
    """Per-row divergence between softmax(student_logits) and softmax(teacher_logits): [N]."""
    student_logp = torch.log_softmax(student_logits, dim=-1)
    teacher_logp = torch.log_softmax(teacher_logits, dim=-1)
    if divergence == "reverse":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if divergence == "forward":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1 - beta))
    return (beta * (teacher_logp.exp() * (teacher_logp - mixture_logp)).sum(-1)
            + (1 - beta) * (student_logp.exp() * (student_logp - mixture_logp)).sum(-1))


def fused_linear_kl_reference(
    student_hidden: torch.Tensor, student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None, *, divergence: str = "reverse", beta: float = 0.5,
    temperature: float = 1.0, student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """Same contract as ``caopd_kernels.fused_linear_kl`` (no input checks, no chunking)."""
    acc = accumulation_dtype(student_hidden.dtype)
    student_logits = student_hidden @ student_weight.T  # [N, V] in the input dtype
    if student_bias is not None:
        student_logits = student_logits + student_bias
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
        if teacher_bias is not None:
            teacher_logits = teacher_logits + teacher_bias
    loss = kl_per_token(student_logits.to(acc) / temperature, teacher_logits.to(acc) / temperature,
                        divergence, beta)
    return reduce_tokens(loss, mask, reduction)


def fused_linear_kl_topk_reference(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor, mask: torch.Tensor | None = None, *, divergence: str = "forward",
    beta: float = 0.5, tail: str = "bucket", temperature: float = 1.0, student_bias: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same contract as ``caopd_kernels.fused_linear_kl_topk``: full logits, buckets by masking, autograd."""
    acc = accumulation_dtype(student_hidden.dtype)
    logits = student_hidden @ student_weight.T
    if student_bias is not None:
        logits = logits + student_bias
    log_p_all = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    log_p = log_p_all.gather(1, teacher_ids)
    log_q = teacher_logprobs.to(acc)
    if tail == "none":
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    elif teacher_ids.shape[1] < student_weight.shape[0]:
        off_support = log_p_all.scatter(1, teacher_ids, float("-inf"))
        captured = torch.logsumexp(log_q, dim=-1).clamp(max=-1e-7)
        log_p = torch.cat([log_p, torch.logsumexp(off_support, dim=-1, keepdim=True)], dim=1)
        log_q = torch.cat([log_q, torch.log(-torch.expm1(captured)).unsqueeze(1)], dim=1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward":
        loss = (torch.xlogy(q, q) - q * log_p).sum(-1)
    elif divergence == "reverse":
        loss = (p * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1 - beta))
        loss = beta * (torch.xlogy(q, q) - q * log_m).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
    return reduce_tokens(loss, mask, reduction)
