"""fused_linear_kl with mixed dtypes (autocast) and unequal vocabularies (issue 18, items 1-2).

Mixed: a bf16/fp16 hidden state with an fp32 weight computes as an fp32 GEMM and returns each
gradient in its input's dtype, as Liger's test_amp runs it (hidden states from a Linear under
torch.autocast, the head's weight fp32). Unequal vocabularies: vocab="common" is the reference over
the first min(V_s, V_t) rows; the default refuses with the option's name.

Deliberate bugs these catch: casting to the narrower type (error grows to bf16's), gradients
returned in the wrong dtype, slicing only one head, a silent default for unequal vocabularies.
"""
from __future__ import annotations

import pytest
import torch
from caopd_kernels import fused_linear_kl

IMPLS = ["torch", "triton"]


def inputs(n=9, h=16, v_s=37, v_t=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g), torch.randn(v_s, h, generator=g) / h**0.5,
            torch.randn(n, h, generator=g), torch.randn(v_t, h, generator=g) / h**0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["reverse", "forward", "jsd"])
def test_half_hidden_with_fp32_weights_computes_in_fp32(impl, half, divergence):
    hs, ws, ht, wt = inputs()
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    hs_half = hs.to(half).requires_grad_()
    ws_32 = ws.clone().requires_grad_()
    ours = fused_linear_kl(hs_half, ws_32, ht.to(half), wt, mask, divergence=divergence, impl=impl, chunk_tokens=4)
    ours.backward()
    assert hs_half.grad.dtype == half and ws_32.grad.dtype == torch.float32  # each in its input's dtype
    # the reference: the same rounded hidden states, upcast, everything in fp32
    hs_ref = hs_half.detach().float().requires_grad_()
    ws_ref = ws.clone().requires_grad_()
    expected = fused_linear_kl(hs_ref, ws_ref, ht.to(half).float(), wt, mask, divergence=divergence,
                               impl="reference")
    expected.backward()
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ws_32.grad, ws_ref.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(hs_half.grad.float(), hs_ref.grad, rtol=1e-2, atol=1e-3)  # rounded to the half type


def test_autocast_hidden_states_reach_the_fp32_head():
    """As Liger's test_amp: the hidden states come out of a Linear under autocast (bf16); the
    lm_head weights stay fp32 parameters and get fp32 gradients."""
    torch.manual_seed(0)
    body_s, body_t = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    head_s, head_t = torch.nn.Linear(16, 41, bias=False), torch.nn.Linear(16, 41, bias=False)
    x = torch.randn(7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hs, ht = body_s(x), body_t(x)
        assert hs.dtype == torch.bfloat16
        loss = fused_linear_kl(hs, head_s.weight, ht, head_t.weight, impl="torch")
    loss.backward()
    assert head_s.weight.grad.dtype == torch.float32 and body_s.weight.grad.dtype == torch.float32
    expected = fused_linear_kl(hs.detach().float(), head_s.weight.detach(), ht.detach().float(),
                               head_t.weight.detach(), impl="reference")
    assert torch.allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v_s, v_t", [(37, 29), (29, 37)])
def test_common_vocabulary_is_the_reference_over_the_shared_rows(impl, v_s, v_t):
    hs, ws, ht, wt = inputs(v_s=v_s, v_t=v_t)
    bias_s, bias_t = torch.randn(v_s), torch.randn(v_t)
    with pytest.raises(ValueError, match=f"V_s = {v_s} rows but teacher_weight has V_t = {v_t}: pass "
                                         "vocab='common'"):
        fused_linear_kl(hs, ws, ht, wt, impl=impl)
    v = min(v_s, v_t)
    ws_full = ws.clone().requires_grad_()
    ours = fused_linear_kl(hs, ws_full, ht, wt, impl=impl, vocab="common", student_bias=bias_s, teacher_bias=bias_t,
                           chunk_tokens=4)
    ours.backward()
    ws_cut = ws[:v].clone().requires_grad_()
    expected = fused_linear_kl(hs, ws_cut, ht, wt[:v], impl="reference", student_bias=bias_s[:v],
                               teacher_bias=bias_t[:v])
    expected.backward()
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ws_full.grad[:v], ws_cut.grad, rtol=1e-4, atol=1e-7)
    assert not ws_full.grad[v:].any()  # rows outside the common vocabulary: no gradient
    with pytest.raises(ValueError, match="vocab must be one of"):
        fused_linear_kl(hs, ws, ht, wt, vocab="union")
