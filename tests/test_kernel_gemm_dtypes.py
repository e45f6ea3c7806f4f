"""The loss's GEMMs on a GPU take 16-bit operands and give fp32 outputs (issue 13, item 4).

Checked without a GPU: meta tensors (shapes and dtypes only) stand in for CUDA ones, and a dispatch
mode records every matrix product's operand and output dtypes. Before, the
weight-gradient GEMM ran in fp32 (about 70 % of the loss's GPU time) and the logits were rounded to
bf16 before the fp32 divergence pass.
"""
from __future__ import annotations

import pytest
import torch
from caopd_kernels import torch_chunked
from caopd_kernels.torch_chunked import HALF, chunked_linear_kl
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

GEMMS = ("aten.mm", "aten.addmm", "aten.addmm_")


class RecordGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.gemms, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name in GEMMS:
            operands = [a.dtype for a in args if isinstance(a, torch.Tensor)][-2:]
            self.gemms.append((name, tuple(operands), out.dtype, tuple(out.shape)))
        if name == "aten._to_copy" and isinstance(args[0], torch.Tensor):
            self.copies.append((args[0].dtype, out.dtype, tuple(out.shape)))
        return out


def test_cuda_half_tensors_take_the_fp32_output_gemms():
    with FakeTensorMode():  # a fake CUDA tensor (this machine may have no GPU)
        assert torch_chunked._fp32_out_gemms(torch.empty(2, 2, dtype=torch.bfloat16, device="cuda"))
        assert not torch_chunked._fp32_out_gemms(torch.empty(2, 2, device="cuda"))
    assert not torch_chunked._fp32_out_gemms(torch.empty(2, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("in_place", [True, False])  # False: the vocabulary-tiled dW where out= is missing
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gemms_take_16_bit_operands_and_give_fp32(dtype, in_place, monkeypatch):
    monkeypatch.setattr(torch_chunked, "_fp32_out_gemms", lambda t: t.device.type == "meta" and t.dtype in HALF)
    monkeypatch.setattr(torch_chunked, "_in_place_fp32_gemm", [in_place])
    monkeypatch.setattr(torch_chunked, "DW_TILE_ROWS", 16)
    n, h, v, chunk = 10, 16, 40, 4
    student_hidden = torch.empty(n, h, dtype=dtype, device="meta")
    weight = torch.empty(v, h, dtype=dtype, device="meta")
    bias = torch.empty(v, dtype=dtype, device="meta")
    token_weight = torch.empty(n, device="meta")
    with RecordGemms() as record:
        result = chunked_linear_kl(student_hidden, weight, bias, student_hidden, weight, None, token_weight,
                                   divergence="reverse", beta=0.5, temperature=0.7, chunk_tokens=chunk,
                                   kl_rows=lambda z, u, *_: (z.sum(1), z))
    assert result.grad_weight.dtype == torch.float32 and result.grad_hidden.dtype == dtype
    for name, operands, out, shape in record.gemms:
        assert operands == (dtype, dtype), (name, operands)
        expected = dtype if shape[1] == h and shape[0] <= chunk else torch.float32  # dH: in the input dtype
        assert out == expected, (name, shape, out)
    logits = [g for g in record.gemms if g[3][1] == v]
    weight_grads = [g for g in record.gemms if g[3] in ((v, h), (16, h), (8, h))]
    assert len(logits) == 2 * 3  # student and teacher logits for each of 3 chunks
    assert len(weight_grads) == 3 * (1 if in_place else 3)  # per chunk: one GEMM, or one per 16-row tile
    assert not [c for c in record.copies if c[2][1] == v and c[1] == torch.float32], record.copies


def test_cpu_keeps_the_fp32_path():
    hidden, weight = torch.randn(6, 8, dtype=torch.bfloat16), torch.randn(20, 8, dtype=torch.bfloat16)
    with RecordGemms() as record:
        chunked_linear_kl(hidden, weight, None, hidden, weight, None, torch.ones(6), divergence="reverse", beta=0.5,
                          temperature=1.0, chunk_tokens=3)
    assert ("aten.addmm_", (torch.float32, torch.float32), torch.float32, (20, 8)) in record.gemms
