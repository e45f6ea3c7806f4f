"""caopd_kernels.FusedLinearJSDLoss against Liger-Kernel's own LigerFusedLinearJSDLoss (issue 18, item 3):
the same constructor and call, the same loss and gradients for weight_hard_loss = 0, on CPU with
Liger's eager (compiled=False) chunked path.

Deliberate bugs these catch: beta's ends swapped (forward/reverse), ignore_index not masking, the
mean over all tokens instead of the counted ones, the temperature or weight_soft_loss dropped.
"""
from __future__ import annotations

import pytest
import torch
from caopd_kernels import FusedLinearJSDLoss

liger = pytest.importorskip("liger_kernel.chunked_loss", reason="the peer test needs liger-kernel (dev extra)")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature, weight_soft", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_equals_ligers_loss_and_gradients(beta, temperature, weight_soft, impl):
    g = torch.Generator().manual_seed(0)
    n, h, v = 13, 16, 37
    hs, ws = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h**0.5
    ht, wt = torch.randn(n, 12, generator=g), torch.randn(v, 12, generator=g) / 12**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 1, 5]] = -100  # prompt tokens
    results = []
    for module in (liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=weight_soft, beta=beta,
                                                  temperature=temperature, compiled=False, chunk_size=4),
                   FusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=weight_soft, beta=beta,
                                      temperature=temperature, compiled=False, chunk_size=4, impl=impl)):
        student_input, student_weight = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = module(student_input, student_weight, ht, wt, labels)
        loss.backward()
        results.append((loss.detach(), student_input.grad, student_weight.grad))
    (theirs, d_h_theirs, d_w_theirs), (ours, d_h_ours, d_w_ours) = results
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7), (float(ours), float(theirs))
    assert torch.allclose(d_h_ours, d_h_theirs, rtol=1e-4, atol=1e-7)
    assert torch.allclose(d_w_ours, d_w_theirs, rtol=1e-4, atol=1e-7)


def test_a_hard_loss_weight_is_refused():
    with pytest.raises(ValueError, match="weight_hard_loss must be 0"):
        FusedLinearJSDLoss(weight_hard_loss=0.5)
