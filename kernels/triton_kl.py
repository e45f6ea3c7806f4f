"""Triton divergence pass: per-row loss and dL/dz over [C, V] fp32 logits, in place.

One program per row, looping over the vocabulary in blocks (z = student logits / T,
u = teacher logits / T, p = softmax z, q = softmax u):
    pass 1  max and sum-exp of z and u, online
    pass 2  reverse: L = sum p (lp - lq)
            forward: L = sum q (lq - lp), and (with COMPUTE_GRAD) dz = p - q written over z
            jsd:     log m = logaddexp(lq + log beta, lp + log(1 - beta)),
                     L = beta sum q (lq - log m) + (1 - beta) S,  S = sum p (lp - log m)
    pass 3  (COMPUTE_GRAD) reverse: dz = p (lp - lq - L);  jsd: dz = (1 - beta) p (lp - log m - S)
Everything is fp32 in registers; out-of-range lanes are masked before any product (0 * inf).
Same contract as ``torch_chunked.kl_rows_torch``, which is the reference for its tests. On CPU it
runs under TRITON_INTERPRET=1 (slow: use it for tests with small shapes).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

_DIVERGENCE_CODE = {"reverse": 0, "forward": 1, "jsd": 2}
# Largest vocabulary block: a GPU's registers bound it; the interpreter's cost grows with loop
# steps, so there one block covers a test's whole vocabulary unless a test asks for less.
GPU_BLOCK_V = 4096
INTERPRETER_BLOCK_V = 65536


@triton.jit
def _kl_rows_kernel(Z, U, LOSS, stride_z, stride_u, V, beta, log_beta, log_1m_beta,
                    DIVERGENCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    u_row = U + row * stride_u

    max_z = float("-inf")
    max_u = float("-inf")
    sum_z = 0.0
    sum_u = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        z = tl.load(z_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        u = tl.load(u_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        new_max_z = tl.maximum(max_z, tl.max(z, axis=0))
        new_max_u = tl.maximum(max_u, tl.max(u, axis=0))
        sum_z = sum_z * tl.exp(max_z - new_max_z) + tl.sum(tl.exp(z - new_max_z), axis=0)
        sum_u = sum_u * tl.exp(max_u - new_max_u) + tl.sum(tl.exp(u - new_max_u), axis=0)
        max_z = new_max_z
        max_u = new_max_u
    # log p = (z - max) - log(sum), never z - (max + log(sum)): the latter rounds at the scale of
    # the largest logit, and the shift makes sum p != 1 by that error.
    log_sum_z = tl.log(sum_z)
    log_sum_u = tl.log(sum_u)

    loss = 0.0
    student_term = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        log_p = (tl.load(z_row + offs, mask=valid, other=0.0).to(tl.float32) - max_z) - log_sum_z
        log_q = (tl.load(u_row + offs, mask=valid, other=0.0).to(tl.float32) - max_u) - log_sum_u
        p = tl.where(valid, tl.exp(log_p), 0.0)
        q = tl.where(valid, tl.exp(log_q), 0.0)
        if DIVERGENCE == 0:
            loss += tl.sum(p * (log_p - log_q), axis=0)
        elif DIVERGENCE == 1:
            loss += tl.sum(q * (log_q - log_p), axis=0)
            if COMPUTE_GRAD:
                tl.store(z_row + offs, p - q, mask=valid)
        else:
            a = log_q + log_beta
            b = log_p + log_1m_beta
            top = tl.maximum(a, b)
            log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
            loss += beta * tl.sum(q * (log_q - log_m), axis=0)
            student_term += tl.sum(p * (log_p - log_m), axis=0)
    if DIVERGENCE == 2:
        loss += (1.0 - beta) * student_term

    if COMPUTE_GRAD and DIVERGENCE != 1:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            log_p = (tl.load(z_row + offs, mask=valid, other=0.0).to(tl.float32) - max_z) - log_sum_z
            log_q = (tl.load(u_row + offs, mask=valid, other=0.0).to(tl.float32) - max_u) - log_sum_u
            p = tl.exp(log_p)
            if DIVERGENCE == 0:
                grad = p * (log_p - log_q - loss)
            else:
                a = log_q + log_beta
                b = log_p + log_1m_beta
                top = tl.maximum(a, b)
                log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
                grad = (1.0 - beta) * p * (log_p - log_m - student_term)
            tl.store(z_row + offs, grad, mask=valid)
    tl.store(LOSS + row, loss)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kl_rows_triton(z: torch.Tensor, u: torch.Tensor, divergence: str, beta: float,
                   compute_grad: bool, block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss [C] and dL/dz (written over ``z``) of fp32 logits z, u [C, V]. ``block_v``
    (a power of two) forces the vocabulary block: tests use it to run the multi-block path, the
    online max/sum-exp rescale every GPU run takes at V = 151,936, under the interpreter."""
    assert z.shape == u.shape and z.dim() == 2, f"z {tuple(z.shape)} and u {tuple(u.shape)} must be [C, V]"
    assert z.dtype == u.dtype == torch.float32, "the divergence pass takes fp32 logits"
    assert z.stride(1) == 1 and u.stride(1) == 1, "logit rows must be contiguous"
    rows, vocab = z.shape
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows == 0:
        return loss, z if compute_grad else None
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    block = min(triton.next_power_of_2(vocab), block_v or (INTERPRETER_BLOCK_V if interpreting() else GPU_BLOCK_V))
    is_jsd = divergence == "jsd"
    # Triton launches on the current CUDA device, not the tensors': an in-process vLLM engine on
    # another GPU may have changed the current one.
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        _launch(z, u, loss, vocab, beta, is_jsd, divergence, compute_grad, block)
    return loss, z if compute_grad else None


def _launch(z, u, loss, vocab, beta, is_jsd, divergence, compute_grad, block) -> None:
    _kl_rows_kernel[(z.shape[0],)](
        z, u, loss, z.stride(0), u.stride(0), vocab, float(beta),
        math.log(beta) if is_jsd else 0.0, math.log(1 - beta) if is_jsd else 0.0,
        DIVERGENCE=_DIVERGENCE_CODE[divergence], COMPUTE_GRAD=compute_grad, BLOCK_V=block,
        num_warps=1 if interpreting() else 8,
    )
