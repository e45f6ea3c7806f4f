"""The chunked torch implementation: token chunks, both logits by one GEMM each, gradients in the forward.

Per chunk of C counted tokens (the memory plan of docs/fused-kl.md):
    Z = H_s[c] W_s^T / T,  U = H_t[c] W_t^T / T          [C, V], fp32
    loss[c], dZ = divergence pass over (Z, U)             (in place: dZ reuses a logit buffer)
    dH_s[c] = (w * dZ / T) W_s,   dW_s += (w * dZ / T)^T H_s[c],   db_s += sum_c (w * dZ / T)
where w is each token's weight in the reduction. Live memory: a few [C, V] fp32 buffers plus the
fp32 dW_s accumulator, whatever N is. Work: 8 N H V FLOPs, nothing recomputed.

On CUDA with bf16/fp16 weights the GEMMs take 16-bit operands and write fp32 (``out_dtype``): the
logits are never rounded to 16 bits and dW_s runs at tensor-core speed (in fp32 it was ~70 % of
the loss's GPU time). On CPU the GEMMs run in fp32.

``kl_rows_torch`` is the divergence pass written as in-place torch ops; ``triton_kl.kl_rows_triton``
is a drop-in for it (same contract). Gradient of each divergence w.r.t. the student logits z
(p = softmax z, q = softmax u, m = beta q + (1 - beta) p):
    reverse  L = sum p (log p - log q)                      dL/dz = p (log p - log q - L)
    forward  L = sum q (log q - log p)                      dL/dz = p - q
    jsd      L = beta KL(q||m) + (1 - beta) KL(p||m)        dL/dz = p (g - sum p g), g = (1 - beta)(log p - log m)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# [C, V] fp32 buffers live at once during the divergence pass, per divergence (sizes the chunks).
TORCH_BUFFERS = {"reverse": 2, "forward": 3, "jsd": 5}


def log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax written over x: one fused kernel, no [C, V] temporary (about 9x faster
    on CPU than x -= logsumexp(x), which allocates and makes several passes)."""
    try:
        return torch._log_softmax(x, -1, False, out=x)
    except (AttributeError, RuntimeError, TypeError):  # the private op changed: take the public path
        return x.copy_(torch.log_softmax(x, dim=-1))


def _row_dot(a: torch.Tensor, b: torch.Tensor, block_rows: int = 32) -> torch.Tensor:
    """sum_v a[r, v] b[r, v] by torch.sum (cascade summation: a GEMM-based row dot loses accuracy
    at V ~ 1e5) over blocks of rows, in one reused [block_rows, V] scratch buffer: no [C, V]
    temporary, and no stream of mid-size allocations for the C allocator to hold on to."""
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    scratch = torch.empty(min(block_rows, a.shape[0]), a.shape[1], dtype=a.dtype, device=a.device)
    for i in range(0, a.shape[0], block_rows):
        rows = min(block_rows, a.shape[0] - i)
        torch.sum(torch.mul(a[i:i + rows], b[i:i + rows], out=scratch[:rows]), dim=-1, out=out[i:i + rows])
    return out


def kl_rows_torch(z: torch.Tensor, u: torch.Tensor, divergence: str, beta: float,
                  compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss [C] of student logits z vs teacher logits u ([C, V], fp32, already / T).

    Overwrites z and u. Returns (loss, dL/dz) where dL/dz is one of the two buffers (or None).
    """
    log_softmax_(z)  # z = log p
    log_softmax_(u)  # u = log q
    if divergence == "reverse":
        torch.sub(z, u, out=u)  # u = log p - log q
        p = z.exp_()
        loss = _row_dot(p, u)
        if not compute_grad:
            return loss, None
        return loss, u.sub_(loss.unsqueeze(1)).mul_(p)  # (d - L) p: one rounding, not p d - L p
    if divergence == "forward":
        teacher_minus_student = u - z
        q = u.exp_()
        loss = _row_dot(q, teacher_minus_student)
        del teacher_minus_student
        if not compute_grad:
            return loss, None
        return loss, z.exp_().sub_(q)
    log_m = torch.logaddexp(u + math.log(beta), z + math.log(1 - beta))
    teacher_term = _row_dot(u.exp(), u - log_m)
    g = z - log_m  # log p - log m (the (1 - beta) factor is applied below)
    del log_m
    p = z.exp_()
    student_term = _row_dot(p, g)
    loss = beta * teacher_term + (1 - beta) * student_term
    if not compute_grad:
        return loss, None
    return loss, g.sub_(student_term.unsqueeze(1)).mul_(p).mul_(1 - beta)


KLRows = Callable[[torch.Tensor, torch.Tensor, str, float, bool], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class ChunkResult:
    """loss: [n] per counted token; grad_hidden: [n, H_s]; grad_weight: [V, H_s] fp32; grad_bias: [V] fp32."""

    loss: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


HALF = (torch.bfloat16, torch.float16)
DW_TILE_ROWS = 16384  # vocabulary rows per dW GEMM where the in-place fp32-output GEMM is missing
_in_place_fp32_gemm = [True]  # False once torch.addmm(..., out_dtype=, out=) has raised here
# torch.mm/addmm(..., out_dtype=) came with torch 2.8; older builds keep the fp32 GEMMs.
_HAS_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def _fp32_out_gemms(t: torch.Tensor) -> bool:
    """bf16/fp16 operands with fp32 outputs (torch.mm/addmm ``out_dtype``, CUDA only in torch 2.13):
    tensor-core speed without rounding the product to 16 bits or an fp32 copy of the operands."""
    return _HAS_OUT_DTYPE and t.is_cuda and t.dtype in HALF


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            temperature: float, acc: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """[C, V] logits / T in ``acc``; into ``out`` (a buffer reused across chunks) when given."""
    if out is not None:
        logits = torch.mm(hidden, weight.T, out=out) if bias is None else torch.addmm(bias, hidden, weight.T, out=out)
    elif _fp32_out_gemms(hidden):  # [C, V] fp32 straight from the bf16 GEMM: no bf16 logits, no extra copy
        logits = torch.mm(hidden, weight.T, out_dtype=acc) if bias is None else \
            torch.addmm(bias, hidden, weight.T, out_dtype=acc)
    else:
        logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)  # [C, V]
        logits = logits.to(acc)
    return logits.mul_(1.0 / temperature) if temperature != 1.0 else logits


def _accumulate_grad_weight(grad_weight: torch.Tensor, grad_z_half: torch.Tensor, scaled_h: torch.Tensor) -> None:
    """grad_weight [V, H] fp32 += grad_z^T [V, C] @ scaled_h [C, H], with 16-bit operands."""
    if _in_place_fp32_gemm[0]:
        try:
            torch.addmm(grad_weight, grad_z_half.T, scaled_h, out_dtype=grad_weight.dtype, out=grad_weight)
            return
        except (RuntimeError, NotImplementedError):
            _in_place_fp32_gemm[0] = False  # this build lacks it: tiles of the vocabulary instead
    scratch = torch.empty(min(DW_TILE_ROWS, grad_weight.shape[0]), grad_weight.shape[1], dtype=grad_weight.dtype,
                          device=grad_weight.device)
    for v0 in range(0, grad_weight.shape[0], DW_TILE_ROWS):
        rows = min(DW_TILE_ROWS, grad_weight.shape[0] - v0)
        torch.mm(grad_z_half[:, v0:v0 + rows].T, scaled_h, out_dtype=grad_weight.dtype, out=scratch[:rows])
        grad_weight[v0:v0 + rows].add_(scratch[:rows])


def logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int, acc: torch.dtype
                  ) -> torch.Tensor | None:
    """A [C, V] buffer every chunk's logits GEMM writes into, where that GEMM writes ``acc`` (fp32/fp64
    inputs): a fresh buffer per chunk is fresh pages on CPU, whose faults cost ~10 % of the logits GEMM
    (Xeon, V 151,936). None for 16-bit inputs (cast after the GEMM, or fp32 out on CUDA) or no rows."""
    n = hidden.shape[0]
    if not n or not hidden.dtype == weight.dtype == acc:
        return None
    return torch.empty(min(chunk_tokens, n), weight.shape[0], dtype=acc, device=hidden.device)


def outputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute_grad: bool,
            acc: torch.dtype) -> tuple:
    """A chunk loop's outputs before its first chunk: per-row loss [n], and with gradients dH [n, H] and the
    accumulators dW [V, H], db [V] (zeros, ``acc``)."""
    vocab, width = weight.shape
    loss = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    if not compute_grad:
        return loss, None, None, None
    return (loss, torch.empty_like(hidden), torch.zeros(vocab, width, dtype=acc, device=weight.device),
            None if bias is None else torch.zeros(vocab, dtype=acc, device=weight.device))


@torch.no_grad()
def chunked_linear_kl(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
    token_weight: torch.Tensor | None, *, divergence: str, beta: float, temperature: float,
    chunk_tokens: int, kl_rows: KLRows = kl_rows_torch, acc: torch.dtype = torch.float32,
) -> ChunkResult:
    """Loss of every row and, when ``token_weight`` ([n], acc dtype) is given, the gradients of
    sum_i token_weight[i] * loss[i] w.r.t. student hidden, weight and bias. Rows are counted tokens."""
    n = student_hidden.shape[0]
    compute_grad = token_weight is not None
    loss, grad_hidden, grad_weight, grad_bias = outputs(student_hidden, student_weight, student_bias, compute_grad, acc)
    student_buffer = logits_buffer(student_hidden, student_weight, chunk_tokens, acc)  # each side's, reused
    teacher_buffer = logits_buffer(teacher_hidden, teacher_weight, chunk_tokens, acc)
    for start in range(0, n, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, n))
        count = rows.stop - rows.start
        h = student_hidden[rows]
        z = _logits(h, student_weight, student_bias, temperature, acc,
                    None if student_buffer is None else student_buffer[:count])
        u = _logits(teacher_hidden[rows], teacher_weight, teacher_bias, temperature, acc,
                    None if teacher_buffer is None else teacher_buffer[:count])
        loss[rows], grad_z = kl_rows(z, u, divergence, beta, compute_grad)
        del u
        if not compute_grad:
            del z  # before the next chunk's logits, which would otherwise be a third [C, V] buffer
            continue
        student_grads(grad_z, h, student_weight, (token_weight[rows] / temperature).unsqueeze(1), acc,
                      grad_hidden, rows, grad_weight, grad_bias)
        del z, grad_z
    return ChunkResult(loss, grad_hidden, grad_weight, grad_bias)


def student_grads(grad_z: torch.Tensor, h: torch.Tensor, student_weight: torch.Tensor, scale: torch.Tensor,
                  acc: torch.dtype, grad_hidden: torch.Tensor, rows: slice, grad_weight: torch.Tensor,
                  grad_bias: torch.Tensor | None) -> None:
    """grad_hidden[rows] = scale dL/dz W_s, grad_weight += (scale dL/dz)^T h, grad_bias += sum scale dL/dz.

    scale [C, 1]: each token's reduction weight times the 1/T of d(W h / T), applied on the [C, H] side
    of the GEMMs (and as a GEMV for the bias) instead of a pass over [C, V]."""
    grad_z_low = grad_z.to(student_weight.dtype)  # the GEMMs' operand dtype (grad_z itself in fp32)
    grad_hidden[rows] = (grad_z_low @ student_weight).mul_(scale.to(student_weight.dtype))
    if _fp32_out_gemms(h):
        _accumulate_grad_weight(grad_weight, grad_z_low, (h.to(acc) * scale).to(h.dtype))
    else:
        grad_weight.addmm_(grad_z.T, h.to(acc) * scale)
    if grad_bias is not None:
        grad_bias.addmv_(grad_z.T, scale.squeeze(1))
    # grad_z_low (grad_z itself in fp32) dies here with the call: it outlived its chunk once (issue 29)
