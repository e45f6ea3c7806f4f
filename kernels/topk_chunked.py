"""The chunked torch implementation of the top-k loss: the student's logits against a teacher known
only by its top-k log-probabilities (ids S, log q_S) at each token; gradients in the forward.

Buckets. With tail="bucket" the vocabulary is split into the k singletons of S and one tail bucket
(everything else): P_B = student mass, Q_B = teacher mass (Q_tail = 1 - sum q_S, floored at 1e-7 as
TRL does, since a top-k list cannot say it is 0). With tail="none" both sides are renormalised on S
(P_B = p_j / sum_S p, the same for Q). The divergence is over the buckets:
    forward  L = sum_B Q_B (log Q_B - log P_B)            G_B = dL/dlog P_B = -Q_B
    reverse  L = sum_B P_B (log P_B - log Q_B)            G_B = P_B (log P_B - log Q_B)  (+ P_B, dropped)
    jsd      M = beta Q + (1 - beta) P,  L = beta KL(Q||M) + (1 - beta) KL(P||M)
                                                          G_B = (1 - beta) P_B (log P_B - log M_B)
With p = softmax(z), d log P_B / dz_w = [w in B] p_w / P_B - p_w, so
    dL/dz_j = G_j - p_j sum_B G_B                          (j in S)
    dL/dz_w = exp(z_w - lse_tail) (G_tail - P_tail sum_B G_B)   (w off S; lse_tail = log sum_{v not in S} e^z_v)
which never divides by a small P_tail. A multiple of P_B added to G changes neither (sum_B P_B = 1).
With tail="none" only z_S enters (the renormalisation drops the log-normaliser): G w.r.t. the
renormalised log P is mapped back by G - P sum G, and nothing off S moves.

Which approximates what: the forward KL with the tail bucket is the full forward KL(t||s) when the
teacher's tail is one token, and exactly it at k = V; on a wide tail it compares only the tail's total
mass (the peers' choice: Tinker, verl, TRL's server mode, with k ~ 20). The renormalised divergences
compare the two conditionals on S and ignore how much mass either puts elsewhere: the reverse KL there
is the mode-seeking loss of the dense kernel restricted to the teacher's likely tokens.

Work per chunk of C tokens: tail="bucket" takes one [C, V] logits GEMM, one log-sum-exp pass over the
logits with the support masked (lse_tail; P_tail and each p_j then follow from the k gaps z_j - lse_tail,
which keeps them accurate), dL/dz in the same buffer, then dH and dW by GEMM (6 N H V FLOPs: no teacher
GEMM); tail="none" gathers the k weight rows of each token (4 N k H FLOPs, no [C, V] buffer). Memory
beyond the chunk: O(N k).
"""
from __future__ import annotations

import math

import torch

from .torch_chunked import ChunkResult, _logits, log_softmax_, logits_buffer, outputs, student_grads

TAILS = ("bucket", "none")
TEACHER_TAIL_FLOOR = 1e-7  # Q_tail's floor, as TRL's add_tail_bucket clamps log sum q_S to -1e-7


def teacher_tail(teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """log Q_tail = log(1 - sum_S q) [R], floored: a top-k list that sums to 1 by rounding keeps a tail."""
    captured = torch.logsumexp(teacher_logprobs, dim=-1).clamp(max=-TEACHER_TAIL_FLOOR)
    return torch.log(-torch.expm1(captured))


def bucket_divergence(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float,
                      renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence [R] over buckets ([R, B] log-masses) and G = dL/dlog_p [R, B] (closed form).

    renormalise: log_p and log_q are unnormalised on the support (tail="none"); G is then w.r.t. the
    inputs, so it sums to 0 over each row."""
    out_dtype = log_p.dtype
    log_p, log_q = log_p.double(), log_q.double()  # [R, B] only: fp64 costs nothing here and spares a rounding
    if renormalise:
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward":
        loss = torch.xlogy(q, q).sum(-1) - (q * log_p).sum(-1)
        grad = -q
    elif divergence == "reverse":
        log_ratio = log_p - log_q
        loss = (p * log_ratio).sum(-1)
        grad = p * log_ratio  # dL/dlog P is p (log_ratio + 1); a multiple of P cancels below, and the 1 would round
    else:
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1 - beta))
        loss = beta * (torch.xlogy(q, q) - q * log_m).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
        grad = (1 - beta) * p * (log_p - log_m)
    if renormalise:
        grad = grad - p * grad.sum(-1, keepdim=True)
    return loss.to(out_dtype), grad.to(out_dtype)


def row_logsumexp(x: torch.Tensor, block_rows: int = 32) -> torch.Tensor:
    """log sum_v exp x[r, v] over blocks of rows: no [C, V] temporary."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], block_rows):
        out[i:i + block_rows] = torch.logsumexp(x[i:i + block_rows], dim=-1)
    return out


def tail_grad_torch(z: torch.Tensor, lse_tail: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """z <- exp(z - lse_tail) * coefficient (both [C, 1]), in place."""
    return z.sub_(lse_tail).exp_().mul_(coefficient)


def tail_passes(impl: str):
    """(log-sum-exp, gradient) passes over [C, V]: torch's, or triton_topk's fused ones."""
    if impl == "triton":
        from .triton_topk import tail_grad_triton, tail_logsumexp_triton

        return tail_logsumexp_triton, tail_grad_triton
    return row_logsumexp, tail_grad_torch


def sparse_support(vocab: int, k: int, tail: str) -> bool:
    """tail="none" needs only the k logits of each token: gathered weight rows beat a [C, V] GEMM while
    k is a small part of the vocabulary."""
    return tail == "none" and k <= vocab // 64


@torch.no_grad()
def chunked_linear_kl_topk(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
    teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, token_weight: torch.Tensor | None, *,
    divergence: str, beta: float, tail: str, temperature: float, chunk_tokens: int, acc: torch.dtype,
    impl: str = "torch",
) -> ChunkResult:
    """Loss of every row [n] and, when ``token_weight`` [n] is given, the gradients of
    sum_i token_weight[i] loss[i] w.r.t. student hidden, weight and bias (rows are counted tokens)."""
    n, hidden_size = student_hidden.shape
    vocab, k = student_weight.shape[0], teacher_ids.shape[1]
    compute_grad = token_weight is not None
    loss, grad_hidden, grad_weight, grad_bias = outputs(student_hidden, student_weight, student_bias, compute_grad, acc)
    sparse = sparse_support(vocab, k, tail)
    with_tail = tail == "bucket" and k < vocab  # at k = V the support is the vocabulary: no tail
    tail_logsumexp, tail_grad = tail_passes(impl if acc == torch.float32 else "torch")  # Triton passes: fp32
    buffer = None if sparse else logits_buffer(student_hidden, student_weight, chunk_tokens, acc)
    for start in range(0, n, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, n))
        h, ids = student_hidden[rows], teacher_ids[rows]
        log_q = teacher_logprobs[rows].to(acc)
        scale = None if not compute_grad else (token_weight[rows] / temperature).unsqueeze(1)
        if sparse:
            rows_of_w = student_weight[ids]  # [C, k, H]
            z_s = torch.bmm(rows_of_w, h.unsqueeze(2)).squeeze(2).to(acc)
            if student_bias is not None:
                z_s += student_bias[ids].to(acc)
            loss[rows], grad = bucket_divergence(z_s / temperature, log_q, divergence, beta, renormalise=True)
            if compute_grad:
                grad_s = (grad * scale).to(student_weight.dtype)  # [C, k]
                grad_hidden[rows] = torch.bmm(grad_s.unsqueeze(1), rows_of_w).squeeze(1)
                grad_weight.index_add_(0, ids.reshape(-1),
                                       (grad_s.unsqueeze(2).to(acc) * h.unsqueeze(1).to(acc)).reshape(-1, hidden_size))
                if grad_bias is not None:
                    grad_bias.index_add_(0, ids.reshape(-1), grad_s.reshape(-1).to(acc))
            continue
        z = _logits(h, student_weight, student_bias, temperature, acc,
                    None if buffer is None else buffer[:rows.stop - rows.start])  # [C, V]
        if tail == "none":
            loss[rows], grad = bucket_divergence(z.gather(1, ids), log_q, divergence, beta, renormalise=True)
            grad_s, sum_grad = grad, None
        elif with_tail:  # one pass over V: the tail's log-sum-exp, the support masked; the rest on [C, k]
            z_s = z.gather(1, ids)
            lse_tail = tail_logsumexp(z.scatter_(1, ids, float("-inf"))).unsqueeze(1)
            above_tail = z_s - lse_tail  # log (p_j / P_tail): numbers of the size of the gaps, not of the logits
            log_p_tail = -torch.logsumexp(torch.cat([torch.zeros_like(lse_tail), above_tail], dim=1), dim=1,
                                          keepdim=True)
            log_p = torch.cat([above_tail + log_p_tail, log_p_tail], dim=1)
            log_q = torch.cat([log_q, teacher_tail(log_q).unsqueeze(1)], dim=1)
        else:  # k = V: the support is the vocabulary
            log_p = log_softmax_(z).gather(1, ids)
        if tail == "bucket":
            loss[rows], grad = bucket_divergence(log_p, log_q, divergence, beta, renormalise=False)
            sum_grad = grad.sum(1, keepdim=True)
            grad_s = grad[:, :k] - log_p[:, :k].exp() * sum_grad
        if not compute_grad:
            continue
        if with_tail:  # off the support: exp(z - lse_tail) (G_tail - P_tail sum G); z is -inf on S
            coefficient = grad[:, k:] - log_p[:, k:].exp() * sum_grad
            grad_z = tail_grad(z, lse_tail, coefficient)
        else:
            grad_z = z.zero_()
        grad_z.scatter_(1, ids, grad_s)
        student_grads(grad_z, h, student_weight, scale, acc, grad_hidden, rows, grad_weight, grad_bias)
        del z, grad_z
    return ChunkResult(loss, grad_hidden, grad_weight, grad_bias)
