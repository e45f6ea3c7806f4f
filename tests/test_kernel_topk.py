"""fused_linear_kl_topk (a teacher known by its top-k log-probabilities) against the float64
full-logit reference: values, gradients, masks, k = 1 / 20 / V, and what k = V must equal."""
from __future__ import annotations

import pytest
import torch
from caopd_kernels import fused_linear_kl, fused_linear_kl_topk, fused_linear_kl_topk_reference

DIVERGENCES = ["forward", "reverse", "jsd"]
# Triton runs compiled on a GPU (make gpu-check) and interpreted on CPU (the conftest sets TRITON_INTERPRET)
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TAILS = ["bucket", "none"]


def make_inputs(n, h, v, k, dtype=torch.float32, seed=0, masked=0.3, bias=False):
    """Student hidden/weight, and a teacher's top-k ids and log-probabilities from a full teacher."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(dtype)
    teacher_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.5
    teacher_logp = torch.log_softmax(teacher_logits, dim=-1)
    logprobs, ids = teacher_logp.topk(k, dim=-1)
    mask = torch.rand(n, generator=g) >= masked
    mask[0] = True
    student_bias = torch.randn(v, generator=g).to(dtype) if bias else None
    return hidden, weight, ids, logprobs.float(), mask, student_bias, teacher_logp


def grads_of(fn, hidden, weight, bias, *args, **kw):
    """The output and the leaves' gradients (on the CPU) of fn run on ``device``."""
    device = kw.pop("device", torch.device("cpu"))
    leaves = [t.detach().to(device).requires_grad_() for t in (hidden, weight) + (() if bias is None else (bias,))]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*leaves[:2], *args, student_bias=leaves[2] if bias is not None else None, **kw)
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=device).reshape(out.shape)).sum().backward()
    return out.detach().cpu(), [t.grad.cpu() for t in leaves]


# (N, H, V, k, chunk_tokens): k = 1, 20 and V; N not a multiple of the chunk; the sparse (tail="none",
# k <= V / 64) and dense paths
SHAPES = [(13, 8, 1300, 1, 4), (37, 16, 1300, 20, 8), (9, 8, 97, 97, 4), (21, 8, 211, 20, 5)]


@pytest.mark.parametrize("n,h,v,k,chunk", SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_topk_loss_and_gradients_match_the_float64_reference(n, h, v, k, chunk, divergence, tail, reduction):
    check_against_reference(n, h, v, k, chunk, divergence, tail, reduction, "torch")


@pytest.mark.parametrize("n,h,v,k,chunk", SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_the_triton_passes_matches_the_float64_reference(n, h, v, k, chunk, divergence):
    """impl="triton": its passes serve the tail bucket (interpreted here; compiled in make gpu-check)."""
    check_against_reference(n, h, v, k, chunk, divergence, "bucket", "mean", "triton")


def check_against_reference(n, h, v, k, chunk, divergence, tail, reduction, impl):
    hidden, weight, ids, logprobs, mask, bias, _ = make_inputs(n, h, v, k, bias=k == 20)
    kw = dict(divergence=divergence, tail=tail, reduction=reduction, temperature=0.8)
    ours, ours_grads = grads_of(fused_linear_kl_topk, hidden, weight, bias, ids, logprobs, mask, chunk_tokens=chunk,
                                impl=impl, device=TRITON_DEVICE if impl == "triton" else torch.device("cpu"), **kw)
    ref, ref_grads = grads_of(fused_linear_kl_topk_reference, hidden.double(), weight.double(),
                              None if bias is None else bias.double(), ids, logprobs.double(), mask, **kw)
    _, torch_grads = grads_of(fused_linear_kl_topk_reference, hidden, weight, bias, ids, logprobs, mask, **kw)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6), (ours, ref)
    # each gradient within 1e-5 of its scale, or (where sums over the vocabulary cancel: dH, dW) no worse
    # than a few times torch's own error in fp32, the full-logit reference run in fp32
    for got, want, plain in zip(ours_grads, ref_grads, torch_grads):
        error, plain_error = (got.double() - want).abs().max(), (plain.double() - want).abs().max()
        assert error <= max(1e-5 * want.abs().max(), 5 * plain_error), (error, plain_error, want.abs().max(), got.shape)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_to_the_vocabulary_is_the_dense_divergence(divergence):
    """At k = V the support is the vocabulary: no tail, and the loss is the full-vocabulary divergence
    of fused_linear_kl against the teacher whose log-probabilities were served (float64, exact)."""
    n, h, v = 11, 8, 50
    hidden, weight, ids, logprobs, mask, _, teacher_logp = make_inputs(n, h, v, v, dtype=torch.float64)
    logprobs = teacher_logp.gather(1, ids)
    ours, ours_grads = grads_of(fused_linear_kl_topk, hidden, weight, None, ids, logprobs, mask,
                                divergence=divergence, chunk_tokens=4)
    # the dense kernel's teacher: hidden log q through an identity head, so its logits are log q
    dense, dense_grads = grads_of(fused_linear_kl, hidden, weight, None, teacher_logp,
                                  torch.eye(v, dtype=torch.float64), mask, divergence=divergence, impl="torch",
                                  chunk_tokens=4)
    assert torch.allclose(ours, dense, rtol=1e-12, atol=1e-14)
    for got, want in zip(ours_grads, dense_grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


def test_forward_kl_with_the_tail_bucket_by_hand():
    """Three tokens, k = 1: the buckets are {0} and {1, 2}; student p = softmax(0, 0, log 2) = (1/4, 1/4,
    1/2), teacher q_0 = 0.6, so L = 0.6 log(0.6 / 0.25) + 0.4 log(0.4 / 0.75)."""
    import math

    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [0.0], [math.log(2.0)]], requires_grad=True)
    loss = fused_linear_kl_topk(hidden, weight, torch.tensor([[0]]), torch.tensor([[math.log(0.6)]]))
    assert float(loss.detach()) == pytest.approx(0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75), rel=1e-6)
    loss.backward()
    # dL/dz: p_0 - q_0 on the support; off it p_w (1 - Q_tail / P_tail) = p_w (1 - 0.4 / 0.75)
    expected = torch.tensor([[0.25 - 0.6], [0.25 * (1 - 0.4 / 0.75)], [0.5 * (1 - 0.4 / 0.75)]])
    assert torch.allclose(weight.grad, expected, atol=1e-6)


def test_masked_tokens_and_bf16():
    hidden, weight, ids, logprobs, mask, _, _ = make_inputs(23, 16, 1300, 20, dtype=torch.bfloat16)
    ours, (gh, gw) = grads_of(fused_linear_kl_topk, hidden, weight, None, ids, logprobs, mask, chunk_tokens=6)
    ref, (rh, rw) = grads_of(fused_linear_kl_topk_reference, hidden.float(), weight.float(), None, ids, logprobs,
                             mask)
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert torch.allclose(ours, ref, rtol=2e-2, atol=2e-3)
    assert torch.allclose(gw.float(), rw, rtol=5e-2, atol=2e-3)
    assert bool((gh[~mask] == 0).all()) and not bool((gh[mask] == 0).all())


@pytest.mark.parametrize("change,message", [
    (dict(teacher_ids=torch.tensor([[0, 0]] * 4)), "teacher_ids repeat a token at position 0"),
    (dict(teacher_ids=torch.tensor([[0, 1300]] * 4)), r"teacher_ids must lie in \[0, V\) = \[0, 1300\)"),
    (dict(teacher_logprobs=torch.zeros(4, 2)), "sum to more than 1 in probability"),
    (dict(teacher_logprobs=torch.full((4, 2), float("nan"))), "must be finite log-probabilities"),
    (dict(teacher_logprobs=torch.zeros(4, 3)), r"teacher_logprobs must be a float tensor \[N, k\] = \[4, 2\]"),
    (dict(teacher_ids=torch.zeros(4, 2)), "teacher_ids must be an integer tensor"),
    (dict(tail="all"), "tail must be one of"),
    (dict(impl="cuda"), "impl must be one of"),
])
def test_bad_topk_inputs_are_named(change, message):
    hidden, weight, _, _, _, _, _ = make_inputs(4, 8, 1300, 2)
    args = dict(student_hidden=hidden, student_weight=weight, teacher_ids=torch.tensor([[3, 5]] * 4),
                teacher_logprobs=torch.log(torch.tensor([[0.5, 0.2]] * 4)))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fused_linear_kl_topk(**args)


@pytest.mark.parametrize("block_v", [16, None])
def test_triton_tail_passes_equal_torchs_across_vocabulary_blocks(block_v):
    """The two fused passes against their torch references, over several vocabulary blocks (block_v 16:
    the online rescale a GPU takes at V = 151,936), with masked (-inf) entries and a row of -inf only."""
    from caopd_kernels.topk_chunked import row_logsumexp, tail_grad_torch
    from caopd_kernels.triton_topk import tail_grad_triton, tail_logsumexp_triton

    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 83, generator=g) * 4
    z[0, :20] = float("-inf")  # a block of -inf only, first
    z[1, ::3] = float("-inf")
    z[4] = float("-inf")
    lse = tail_logsumexp_triton(z.to(TRITON_DEVICE), block_v=block_v).cpu()
    assert torch.allclose(lse, row_logsumexp(z), rtol=1e-6, atol=1e-6) and lse[4] == float("-inf")
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(1)
    coefficient = torch.randn(5, 1, generator=g)
    ours = tail_grad_triton(z.clone().to(TRITON_DEVICE), safe.to(TRITON_DEVICE), coefficient.to(TRITON_DEVICE),
                            block_v=block_v).cpu()
    assert torch.allclose(ours, tail_grad_torch(z.clone(), safe, coefficient), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_token_logprobs_and_gradients_equal_full_logits(dtype, tol, bias):
    """fused_linear_token_logprobs (TRL's sampled-token mode): log p of each row's token and the gradients of
    any weighting of them, against log_softmax over the full logits (5 chunks of 8 rows, one partial)."""
    from caopd_kernels import fused_linear_token_logprobs

    hidden, weight, _, _, _, student_bias, _ = make_inputs(37, 16, 1300, 1, dtype=dtype, bias=bias)
    ids = torch.randint(0, 1300, (37,), generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(2), dtype=dtype)

    def full(h, w, b):
        logits = h @ w.T + (0 if b is None else b)
        return torch.log_softmax(logits / 0.7, -1).gather(1, ids[:, None]).squeeze(1)

    results = []
    for fn in (lambda h, w, b: fused_linear_token_logprobs(h, w, ids, bias=b, temperature=0.7, chunk_tokens=8), full):
        tensors = (hidden, weight) + ((student_bias,) if bias else ())
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        (out * upstream).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (ours, ours_grads), (ref, ref_grads) = results
    assert torch.allclose(ours.to(dtype), ref, rtol=tol, atol=tol)
    for got, want in zip(ours_grads, ref_grads):
        assert (got - want).abs().max() <= tol * want.abs().max()
