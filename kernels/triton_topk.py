"""Triton passes of the top-k loss over [C, V] fp32 student logits (kernels/topk_chunked.py's math).

One program per row, looping over the vocabulary in blocks; the support's entries are -inf already:
    _tail_lse_kernel   lse_tail = log sum_v e^z_v, online (max, sum-exp)       reads the row once
    _tail_grad_kernel  z <- exp(z - lse_tail) * coefficient                    reads and writes it once
torch would take a [32, V] temporary and two passes for the first, three passes for the second. Same
contract as ``topk_chunked.row_logsumexp`` / ``tail_grad_torch``, their reference in the tests. On CPU
they run under TRITON_INTERPRET=1 (small shapes).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .triton_kl import GPU_BLOCK_V, INTERPRETER_BLOCK_V, interpreting


@triton.jit
def _tail_lse_kernel(Z, OUT, stride_z, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    top = float("-inf")
    total = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(z, axis=0))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # a block of -inf only: nothing to add yet
        total = total * tl.exp(top - safe) + tl.sum(tl.exp(z - safe), axis=0)
        top = new_top
    empty = top == float("-inf")
    tl.store(OUT + row, tl.where(empty, float("-inf"), top + tl.log(tl.where(empty, 1.0, total))))


@triton.jit
def _tail_grad_kernel(Z, LSE, COEF, stride_z, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    lse = tl.load(LSE + row)
    coefficient = tl.load(COEF + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        z = tl.load(z_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        tl.store(z_row + offs, tl.exp(z - lse) * coefficient, mask=valid)


def _block(vocab: int, block_v: int | None) -> int:
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    return min(triton.next_power_of_2(vocab), block_v or (INTERPRETER_BLOCK_V if interpreting() else GPU_BLOCK_V))


def _rows_contiguous(z: torch.Tensor) -> None:
    assert z.dim() == 2 and z.dtype == torch.float32 and z.stride(1) == 1, "[C, V] fp32 rows, contiguous"


def tail_logsumexp_triton(z: torch.Tensor, block_v: int | None = None) -> torch.Tensor:
    """[C]: log sum_v exp z[r, v] (-inf for a row of -inf)."""
    _rows_contiguous(z)
    out = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    if z.shape[0]:
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            _tail_lse_kernel[(z.shape[0],)](z, out, z.stride(0), z.shape[1], BLOCK_V=_block(z.shape[1], block_v),
                                            num_warps=1 if interpreting() else 8)
    return out


def tail_grad_triton(z: torch.Tensor, lse_tail: torch.Tensor, coefficient: torch.Tensor,
                     block_v: int | None = None) -> torch.Tensor:
    """z <- exp(z - lse_tail[:, None]) * coefficient[:, None], in place; returns z."""
    _rows_contiguous(z)
    if z.shape[0]:
        lse, coef = (t.reshape(-1).to(torch.float32).contiguous() for t in (lse_tail, coefficient))
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            _tail_grad_kernel[(z.shape[0],)](z, lse, coef, z.stride(0), z.shape[1],
                                             BLOCK_V=_block(z.shape[1], block_v), num_warps=1 if interpreting() else 8)
    return z
