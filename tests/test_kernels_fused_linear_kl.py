"""fused_linear_kl (torch and triton impls) against the naive full-logit reference.

Rule for low precision: an implementation's error against an fp64 ground truth must be no worse
than the reference's own error in the same dtype, plus a small tolerance.
"""
from __future__ import annotations

import math
import sys
import weakref

import pytest
import torch
from caopd_kernels import FusedLinearKL, fused_linear_kl_reference
from caopd_kernels import fused_linear_kl as _fused_linear_kl
from caopd_kernels.fused_linear_kl import chunk_tokens_for_budget, default_memory_budget, resolve_impl
from caopd_kernels.torch_chunked import kl_rows_torch
from caopd_kernels.triton_kl import kl_rows_triton as _kl_rows_triton
from torch.utils._python_dispatch import TorchDispatchMode

IMPLS = ["torch", "triton"]
# Triton runs compiled on a GPU (scripts/gpu_check.sh) and interpreted on CPU: its inputs go where
# it runs, and its results come back (both moves are differentiable, so gradients reach the leaves).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def fused_linear_kl(*args, **kw):
    if kw.get("impl") != "triton" or TRITON_DEVICE.type == "cpu":
        return _fused_linear_kl(*args, **kw)
    args, kw = [_to(a, TRITON_DEVICE) for a in args], {k: _to(v, TRITON_DEVICE) for k, v in kw.items()}
    out = _fused_linear_kl(*args, **kw)
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


def kl_rows_triton(z, u, *args, **kw):
    loss, grad = _kl_rows_triton(z.to(TRITON_DEVICE), u.to(TRITON_DEVICE), *args, **kw)
    return loss.cpu(), None if grad is None else grad.cpu()
DIVERGENCES = ["reverse", "forward", "jsd"]
TEMPERATURES = [1.0, 0.7, 2.0]
# (N, H, V, chunk_tokens): N = 1, N not a multiple of the chunk, V not a multiple of any block.
SHAPES = [(1, 16, 1000, 4), (37, 24, 1000, 8), (19, 8, 50257, 5)]
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-3, 2e-2)]  # (dtype, atol, rtol)


def make_inputs(n, h, v, dtype, seed=0, bias=False, masked=0.3, tied=False):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, h, generator=g).to(dtype)
    student_weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    teacher_hidden = torch.randn(n, h, generator=g).to(dtype)
    teacher_weight = student_weight if tied else (torch.randn(v, h, generator=g) / h**0.5 * 1.5).to(dtype)
    mask = torch.rand(n, generator=g) >= masked
    mask[0] = True
    student_bias = torch.randn(v, generator=g).to(dtype) if bias else None
    return student_hidden, student_weight, teacher_hidden, teacher_weight, mask, student_bias


def run(impl, inputs, grad_output=1.7, **kw):
    """Loss and gradients of (student hidden, weight[, bias]) for one implementation."""
    hs, ws, ht, wt, mask, bs = (None if t is None else t.detach().clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (hs, ws, bs) if t is not None]
    tied = inputs[3] is inputs[1]
    loss = fused_linear_kl(hs, ws, ht, ws if tied else wt, mask, student_bias=bs, impl=impl, **kw)
    weights = grad_output if loss.dim() == 0 else torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype)
    (loss * weights).sum().backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves]


def worst(a, b) -> str:
    diff = (a - b).abs().flatten()
    i = int(diff.argmax())
    a_i, b_i = float(a.flatten()[i]), float(b.flatten()[i])
    return f"max |diff| {float(diff[i]):.3e} at flat index {i}: {a_i:.6e} vs {b_i:.6e}"


def assert_close(actual, expected, atol, rtol, what):
    for name, a, e in zip(["loss", "d student_hidden", "d student_weight", "d student_bias"], actual, expected):
        assert torch.isfinite(a).all(), f"{what}: {name} is not finite"
        assert torch.allclose(a, e, atol=atol, rtol=rtol), f"{what}: {name}: {worst(a, e)}"


def upcast(inputs):
    return [t.double() if t is not None and t.is_floating_point() else t for t in inputs]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n, h, v, chunk", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_error_no_worse_than_torch_in_the_same_dtype(impl, divergence, temperature, n, h, v, chunk, dtype, atol,
                                                     rtol):
    inputs = make_inputs(n, h, v, dtype, bias=True)
    kw = dict(divergence=divergence, temperature=temperature, beta=0.3)
    truth = run("reference", upcast(inputs), **kw)
    torch_same_dtype = run("reference", inputs, **kw)
    ours = run(impl, inputs, chunk_tokens=chunk, **kw)
    for name, o, r, t in zip(["loss", "d hidden", "d weight", "d bias"], ours, torch_same_dtype, truth):
        assert torch.isfinite(o).all(), f"{impl} {name} is not finite"
        our_err, ref_err = (o - t).abs().max(), (r - t).abs().max()
        assert our_err <= ref_err + atol + rtol * t.abs().max(), \
            f"{impl} {name}: ours {our_err:.3e} vs torch {ref_err:.3e} ({worst(o, t)})"
    if dtype == torch.float32:  # and plainly close to the reference
        assert_close(ours, torch_same_dtype, 1e-4, 1e-3, f"{impl} {divergence} T={temperature}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_all_masked_gives_zero_loss_and_zero_grads(impl, divergence, dtype, atol, rtol):
    hs, ws, ht, wt, mask, bs = make_inputs(9, 8, 1000, dtype)
    hs.requires_grad_(), ws.requires_grad_()
    loss = fused_linear_kl(hs, ws, ht, wt, torch.zeros(9, dtype=torch.bool), divergence=divergence, impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hs.grad) == 0 and torch.count_nonzero(ws.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_tokens_get_no_gradient_and_do_not_change_the_loss(impl):
    inputs = make_inputs(23, 16, 1000, torch.float32)
    hs, mask = inputs[0], inputs[4]
    loss, grad_hidden, _ = run(impl, inputs, chunk_tokens=4)
    assert torch.count_nonzero(grad_hidden[~mask]) == 0 and torch.count_nonzero(grad_hidden[mask]) > 0
    changed = list(inputs)
    changed[0] = hs.clone()
    changed[0][~mask] = 1e4  # masked tokens' values must not matter
    assert torch.equal(run(impl, changed, chunk_tokens=4)[0], loss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_tied_weights(impl, divergence):
    inputs = make_inputs(17, 16, 1000, torch.float32, tied=True)
    assert inputs[3] is inputs[1]
    assert_close(run(impl, inputs, chunk_tokens=5, divergence=divergence),
                 run("reference", inputs, divergence=divergence), 1e-5, 1e-4, f"tied {impl}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(impl, reduction):
    inputs = make_inputs(21, 12, 1000, torch.float32, bias=True)
    kw = dict(reduction=reduction, divergence="jsd", temperature=0.7)
    ours = run(impl, inputs, chunk_tokens=6, **kw)
    assert_close(ours, run("reference", inputs, **kw), 1e-5, 1e-4, f"{impl} {reduction}")
    if reduction == "none":
        assert ours[0].shape == (21,) and torch.all(ours[0][~inputs[4]] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float_mask_weights_tokens(impl, reduction):
    inputs = list(make_inputs(19, 12, 1000, torch.float32, bias=True))
    weights = torch.rand(19, generator=torch.Generator().manual_seed(5))
    weights[[2, 7]] = 0.0
    inputs[4] = weights
    kw = dict(reduction=reduction, temperature=1.3)
    ours = run(impl, inputs, chunk_tokens=4, **kw)
    assert_close(ours, run("reference", inputs, **kw), 1e-5, 1e-4, f"{impl} float mask {reduction}")
    if reduction == "sum":  # sum w L equals the weighted per-token losses
        per_token = run(impl, inputs, chunk_tokens=4, reduction="none", temperature=1.3)[0]
        assert torch.allclose(ours[0], per_token.sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="finite and >= 0"):
        fused_linear_kl(*inputs[:4], -weights)


@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_losses_are_each_tokens_unweighted_divergence(impl, reduction):
    """return_token_losses: the per-token divergence beside the loss (0 where the weight is 0), the
    loss and its gradients unchanged."""
    inputs = list(make_inputs(19, 12, 1000, torch.float32, bias=True))
    weights = torch.rand(19, generator=torch.Generator().manual_seed(5)) * 3
    weights[[2, 7]] = 0.0
    inputs[4] = weights
    hs, ws, ht, wt, _, bs = (t.detach().clone() for t in inputs)
    hs.requires_grad_()
    kw = dict(student_bias=bs, temperature=1.3, impl=impl, reduction=reduction)
    loss, tokens = fused_linear_kl(hs, ws, ht, wt, weights, return_token_losses=True, chunk_tokens=4, **kw)
    assert not tokens.requires_grad and tokens.shape == (19,)
    expected = fused_linear_kl_reference(hs.detach(), ws, ht, wt, (weights > 0), student_bias=bs, temperature=1.3,
                                         reduction="none")
    assert_close([tokens.double()], [expected.double()], 1e-5, 1e-4, f"{impl} token losses")
    assert float(tokens[2]) == 0.0 and float(tokens[7]) == 0.0 and bool((tokens[weights > 0] > 0).all())
    (loss.sum() if loss.dim() else loss).backward()
    alone = run(impl, inputs, grad_output=1.0, chunk_tokens=4, temperature=1.3,
                reduction="sum" if reduction == "none" else reduction)  # d(sum of "none")/dh = d("sum")/dh
    assert_close([hs.grad.double()], [alone[1]], 1e-5, 1e-4, f"{impl} gradient beside the token losses")


def test_chunk_size_from_memory_budget_matches_one_chunk():
    inputs = make_inputs(40, 16, 1000, torch.float32)
    small = run("torch", inputs, memory_budget=1)  # floor: MIN_CHUNK_TOKENS
    assert_close(small, run("torch", inputs, chunk_tokens=3), 1e-5, 1e-4, "budget")


def test_no_grad_and_module_form():
    hs, ws, ht, wt, mask, _ = make_inputs(11, 8, 1000, torch.float32)
    module = FusedLinearKL(divergence="forward", temperature=2.0, impl="torch", chunk_tokens=4)
    assert "divergence=forward" in repr(module)
    with torch.no_grad():
        loss = module(hs, ws, ht, wt, mask)
    expected = fused_linear_kl(hs, ws, ht, wt, mask, divergence="forward", temperature=2.0, impl="reference")
    assert torch.allclose(loss, expected, atol=1e-6)


def test_teacher_gets_no_gradient():
    hs, ws, ht, wt, mask, _ = make_inputs(7, 8, 1000, torch.float32)
    ht.requires_grad_(), wt.requires_grad_(), ws.requires_grad_()
    fused_linear_kl(hs, ws, ht, wt, mask, impl="torch").backward()
    assert ht.grad is None and wt.grad is None
    expected = ws.detach().clone().requires_grad_()
    fused_linear_kl(hs, expected, ht.detach(), wt.detach(), mask, impl="reference").backward()
    assert torch.allclose(ws.grad, expected.grad, atol=1e-6)


def test_float64_gradcheck_of_the_torch_path():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ws = torch.randn(11, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bs = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    ht, wt = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(11, 4, dtype=torch.float64, generator=g)
    mask = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
    for divergence in DIVERGENCES:
        for reduction in ["mean", "none"]:
            def f(h, w, b, divergence=divergence, reduction=reduction):
                return fused_linear_kl(h, w, ht, wt, mask, student_bias=b, divergence=divergence, impl="torch",
                                       temperature=0.7, chunk_tokens=2, reduction=reduction)
            assert torch.autograd.gradcheck(f, (hs, ws, bs)), (divergence, reduction)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_passes_on_extreme_logits_against_fp64(divergence):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3001, generator=g) * 40
    u = torch.randn(6, 3001, generator=g) * 40
    z[0, :] = 0.0  # uniform student row
    u[1, 5] = 1e4  # one-hot teacher row
    expected_loss, expected_grad = kl_rows_torch(z.double(), u.double(), divergence, 0.4, True)
    eg = expected_grad.float()
    for kl_rows in (kl_rows_torch, kl_rows_triton):
        loss, grad = kl_rows(z.clone(), u.clone(), divergence, 0.4, True)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert torch.allclose(loss.double(), expected_loss, rtol=1e-5, atol=1e-3), worst(loss, expected_loss)
        assert ((grad.double() - expected_grad).abs() <= 1e-5).all(), f"{kl_rows.__name__}: {worst(grad, eg)}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(divergence="jsd", beta=1.0), "0 < beta < 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(chunk_tokens=0), "chunk_tokens must be >= 1"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), r"mask must have shape \[N\] = \[5\]"),
    (dict(student_bias=torch.zeros(7)), r"student_bias must be \[V\] = \[11\]"),
    # issue 11, item 11: each of these ran silently before (a -1 weight flipped the loss's sign)
    (dict(mask=torch.tensor([1, 1, -1, 0, 1])), "must hold only 0 and 1"),
    (dict(mask=torch.tensor([1, 2, 1, 0, 1])), "must hold only 0 and 1"),
    (dict(mask=torch.ones(5, dtype=torch.bool, device="meta")), "mask is on meta"),
    (dict(memory_budget=0), "memory_budget must be > 0"),
    (dict(memory_budget=-(1 << 20)), "memory_budget must be > 0"),
    # issue 26, item 12: a float mask that requires grad silently got no gradient
    (dict(mask=torch.ones(5, requires_grad=True)), "mask requires grad"),
])
def test_bad_arguments_are_named(kwargs, message):
    hs, ws, ht, wt = torch.randn(5, 4), torch.randn(11, 4), torch.randn(5, 4), torch.randn(11, 4)
    mask = kwargs.pop("mask", None)
    with pytest.raises(ValueError, match=message):
        fused_linear_kl(hs, ws, ht, wt, mask, **kwargs)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(2, 5, 4), torch.randn(11, 4), torch.randn(10, 4), torch.randn(11, 4)), "flatten"),
    ((torch.randn(5, 4), torch.randn(11, 4), torch.randn(6, 4), torch.randn(11, 4)), "5 tokens but"),
    ((torch.randn(5, 4), torch.randn(12, 4), torch.randn(5, 4), torch.randn(11, 4)), "pass vocab='common'"),
    ((torch.randn(5, 4), torch.randn(11, 3), torch.randn(5, 4), torch.randn(11, 4)), "does not match"),
    ((torch.randn(5, 4).int(), torch.randn(11, 4), torch.randn(5, 4), torch.randn(11, 4)), "has dtype"),
])
def test_bad_shapes_and_dtypes_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        fused_linear_kl(*args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_says_it_is_not_supported(reduction):
    """Issue 26, item 12: a second-order gradient failed with a generic message."""
    hs = torch.randn(5, 4, requires_grad=True)
    loss = fused_linear_kl(hs, torch.randn(11, 4), torch.randn(5, 4), torch.randn(11, 4), reduction=reduction,
                           impl="torch").sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, hs, create_graph=True)
    (grad,) = torch.autograd.grad(loss, hs)  # a first-order gradient still works
    assert grad.shape == hs.shape and bool(grad.abs().sum() > 0)


def test_empty_vocabulary_is_named():
    with pytest.raises(ValueError, match="V = 0"):
        fused_linear_kl(torch.randn(5, 4), torch.randn(0, 4), torch.randn(5, 4), torch.randn(0, 4))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_0_1_mask_equals_the_bool_mask(dtype):
    hs, ws, ht, wt = torch.randn(6, 4), torch.randn(9, 4), torch.randn(6, 4), torch.randn(9, 4)
    counted = torch.tensor([1, 0, 1, 1, 0, 1])
    as_int = fused_linear_kl(hs, ws, ht, wt, counted.to(dtype), impl="torch")
    assert torch.equal(as_int, fused_linear_kl(hs, ws, ht, wt, counted.bool(), impl="torch"))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_equals_liger_fused_linear_jsd_beta_1(temperature):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed (dev extra)")
    hs, ws, ht, wt, mask, _ = make_inputs(24, 16, 1000, torch.float32)
    labels = torch.where(mask, torch.zeros(24, dtype=torch.long), torch.full((24,), -100))
    peer = liger.LigerFusedLinearJSDLoss(beta=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0, compiled=False,
                                         temperature=temperature, chunk_size=8)
    hs_peer = hs.clone().requires_grad_()
    peer_loss = peer(hs_peer, ws, ht, wt, labels)
    peer_loss.backward()
    hs_ours = hs.clone().requires_grad_()
    ours = fused_linear_kl(hs_ours, ws, ht, wt, mask, temperature=temperature, impl="torch", chunk_tokens=7)
    ours.backward()
    assert torch.allclose(ours, peer_loss, rtol=1e-5, atol=1e-6), (float(ours), float(peer_loss))
    assert torch.allclose(hs_ours.grad, hs_peer.grad, atol=1e-6)


def test_the_kernels_folder_imports_on_its_own_and_does_not_pose_as_hugging_face_kernels():
    """From the repo root, ``kernels/`` is importable as a top-level ``kernels``, the name of a Hugging
    Face package that transformers probes by importing it: that must work even where caopd_kernels
    is not installed, and transformers must not take it for its package."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['caopd_kernels'] = None\n"
            "import kernels; assert callable(kernels.fused_linear_kl)\n"
            "from transformers.utils.import_utils import is_kernels_available; assert not is_kernels_available()\n"
            "from transformers.models.qwen3 import modeling_qwen3\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# The multi-block path: under the interpreter one block normally covers the whole vocabulary, so
# the online rescale across blocks (what every GPU run at V = 151,936 executes) would go untested.
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("rows, vocab", [(3, 5000), (2, 50257)])
def test_triton_pass_across_vocabulary_blocks(divergence, compute_grad, rows, vocab):
    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(rows, vocab, generator=g) * 4
    u = torch.randn(rows, vocab, generator=g) * 4
    z[0, vocab - 3] = 30.0  # the student's mode in the last block: earlier blocks' sums must be rescaled
    u[-1, 1500] = 25.0  # the teacher's in a middle block
    expected_loss, expected_grad = kl_rows_torch(z.double(), u.double(), divergence, 0.3, True)
    torch_loss, torch_grad = kl_rows_torch(z.clone(), u.clone(), divergence, 0.3, True)  # fp32: the error bar
    loss, grad = kl_rows_triton(z.clone(), u.clone(), divergence, 0.3, compute_grad, block_v=1024)
    loss_bar = (torch_loss.double() - expected_loss).abs().max()
    assert (loss.double() - expected_loss).abs().max() <= loss_bar + 1e-5 * expected_loss.abs().max(), \
        worst(loss, expected_loss)
    if compute_grad:
        # dz = p (lp - lq - L) cancels where p ~ 1: a few fp32 ulps of L are the floor there.
        grad_bar = (torch_grad.double() - expected_grad).abs().max() + 4 * 2**-23 * expected_loss.abs().max()
        assert (grad.double() - expected_grad).abs().max() <= grad_bar, worst(grad, expected_grad.float())
    else:
        assert grad is None


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_triton_with_small_blocks_equals_the_reference(divergence, monkeypatch):
    import caopd_kernels.triton_kl as triton_kl

    monkeypatch.setattr(triton_kl, "INTERPRETER_BLOCK_V", 512)
    inputs = make_inputs(9, 8, 5000, torch.float32, seed=3, bias=True)
    assert_close(run("triton", inputs, divergence=divergence, temperature=0.7, chunk_tokens=4),
                 run("reference", upcast(inputs), divergence=divergence, temperature=0.7), 1e-5, 1e-4, divergence)


def test_block_v_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        kl_rows_triton(torch.zeros(1, 100), torch.zeros(1, 100), "reverse", 0.5, False, block_v=1000)


# Hand-computed values (issue 12): not only the project's own reference. With H = V = 3 and the
# identity as both heads, the hidden states are the logits: p = softmax(log P) = P exactly.
P_STUDENT, Q_TEACHER = [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]
BY_HAND = {
    "reverse": 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.5),
    "forward": 0.2 * math.log(0.2 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.5 * math.log(0.5 / 0.1),
    # beta 0.3: m = 0.3 q + 0.7 p = [0.55, 0.23, 0.22]; 0.3 KL(q||m) + 0.7 KL(p||m)
    "jsd": 0.3 * (0.2 * math.log(0.2 / 0.55) + 0.3 * math.log(0.3 / 0.23) + 0.5 * math.log(0.5 / 0.22))
    + 0.7 * (0.7 * math.log(0.7 / 0.55) + 0.2 * math.log(0.2 / 0.23) + 0.1 * math.log(0.1 / 0.22)),
}


@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_three_token_vocabulary_by_hand(impl, divergence):
    eye = torch.eye(3, dtype=torch.float64 if impl != "triton" else torch.float32)
    student = torch.tensor([P_STUDENT], dtype=eye.dtype).log()
    teacher = torch.tensor([Q_TEACHER], dtype=eye.dtype).log()
    loss = fused_linear_kl(student, eye, teacher, eye, divergence=divergence, beta=0.3, impl=impl)
    assert float(loss) == pytest.approx(BY_HAND[divergence], rel=1e-6)
    # temperature 2: p ~ sqrt(P); reverse KL of the renormalized square roots, by hand
    if divergence == "reverse":
        sp = [x ** 0.5 / sum(y ** 0.5 for y in P_STUDENT) for x in P_STUDENT]
        sq = [x ** 0.5 / sum(y ** 0.5 for y in Q_TEACHER) for x in Q_TEACHER]
        expected = sum(a * math.log(a / b) for a, b in zip(sp, sq))
        warm = fused_linear_kl(student, eye, teacher, eye, temperature=2.0, impl=impl)
        assert float(warm) == pytest.approx(expected, rel=1e-6)


def test_chunk_tokens_for_budget_values():
    v = 151_936
    assert chunk_tokens_for_budget(v, "torch", "reverse", 768 << 20) == (768 << 20) // (2 * v * 4) == 662
    assert chunk_tokens_for_budget(v, "torch", "forward", 768 << 20) == 441
    assert chunk_tokens_for_budget(v, "torch", "jsd", 768 << 20) == 265
    assert chunk_tokens_for_budget(v, "triton", "jsd", 768 << 20) == 662  # two [C, V] buffers whatever the loss
    assert chunk_tokens_for_budget(v, "torch", "reverse", 1) == 1  # never below one token


def test_default_budget_is_half_the_returned_dw_within_bounds(monkeypatch):
    """Issue 29: the transient budget follows the head (at most half the fp32 dW the call returns), so the
    call's peak stays within 1.5x that floor: Qwen3-0.6B's head gets 297 MiB, C = 256 for reverse KL."""
    v = 151_936
    assert default_memory_budget(v, 1024) == v * 1024 * 4 // 2
    assert chunk_tokens_for_budget(v, "torch", "reverse", default_memory_budget(v, 1024)) == 256
    assert default_memory_budget(v, 4096) == 768 << 20  # ceiling
    assert default_memory_budget(1000, 16) == 64 << 20  # floor: small heads run in one chunk
    module = sys.modules["caopd_kernels.fused_linear_kl"]
    seen, real = [], module.chunked_linear_kl
    monkeypatch.setattr(module, "chunked_linear_kl", lambda *a, **k: seen.append(k["chunk_tokens"]) or real(*a, **k))
    monkeypatch.setattr(module, "MIN_DEFAULT_BUDGET", 1)  # tiny shapes then show the rule itself
    hs, ws, ht, wt, mask, _ = make_inputs(40, 16, 1000, torch.float32)
    fused_linear_kl(hs, ws, ht, wt, mask, impl="torch")
    fused_linear_kl(hs, ws, ht, wt, mask, impl="torch", memory_budget=1 << 20)  # an explicit budget wins
    assert seen == [1000 * 16 * 4 // 2 // (2 * 1000 * 4), (1 << 20) // (2 * 1000 * 4)] == [4, 131]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_hands_over_its_gradients_without_a_copy(reduction, monkeypatch):
    """Issue 29: the stored gradients were a ctx attribute, still referenced when autograd's AccumulateGrad
    ran, so it copied them: a second [V, H] dW at the call's end (1.19 vs 1.06 GiB at N 4,096, V 151,936,
    budget 384 MiB). As saved tensors they are released first, and .grad is the kernel's own tensor.
    retain_graph still allows a second backward."""
    module = sys.modules["caopd_kernels.fused_linear_kl"]
    made, real = [], module.chunked_linear_kl

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        made.append((result.grad_weight.data_ptr(), result.grad_hidden.data_ptr()))  # addresses: no references
        return result

    monkeypatch.setattr(module, "chunked_linear_kl", spy)
    hs, ws, ht, wt, _, _ = make_inputs(9, 8, 300, torch.float32)
    hs.requires_grad_(), ws.requires_grad_()
    fused_linear_kl(hs, ws, ht, wt, impl="torch", chunk_tokens=4, reduction=reduction).backward()
    assert (ws.grad.data_ptr(), hs.grad.data_ptr()) == made[0]
    once = ws.grad.clone()
    ws.grad = hs.grad = None
    loss = fused_linear_kl(hs, ws, ht, wt, impl="torch", chunk_tokens=4, reduction=reduction)
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.allclose(ws.grad, 2 * once, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_bias(impl):
    hs, ws, ht, wt, mask, bs = make_inputs(13, 8, 1000, torch.float32, bias=True)
    bt = torch.randn(1000, generator=torch.Generator().manual_seed(9))
    ours = fused_linear_kl(hs, ws, ht, wt, mask, student_bias=bs, teacher_bias=bt, impl=impl, chunk_tokens=4)
    expected = fused_linear_kl(hs.double(), ws.double(), ht.double(), wt.double(), mask, student_bias=bs.double(),
                               teacher_bias=bt.double(), impl="reference")
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)
    without = fused_linear_kl(hs, ws, ht, wt, mask, student_bias=bs, impl=impl, chunk_tokens=4)
    assert abs(float(without) - float(expected)) > 1e-3  # the bias matters here, so it was used


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fp16_error_no_worse_than_torch_in_fp16(impl, divergence):
    inputs = make_inputs(21, 16, 1000, torch.float16, bias=True)
    truth = run("reference", upcast(inputs), divergence=divergence)
    torch_fp16 = run("reference", inputs, divergence=divergence)
    ours = run(impl, inputs, chunk_tokens=8, divergence=divergence)
    for name, o, r, t in zip(["loss", "d hidden", "d weight", "d bias"], ours, torch_fp16, truth):
        assert (o - t).abs().max() <= (r - t).abs().max() + 1e-3 + 1e-2 * t.abs().max(), f"{impl} {name}"


def test_impl_auto_is_torch_on_cpu():
    inputs = make_inputs(11, 8, 1000, torch.float32)
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda", 0)) == "triton"
    assert torch.equal(run("auto", inputs, chunk_tokens=4)[0], run("torch", inputs, chunk_tokens=4)[0])


def test_triton_errors_on_cpu_without_the_interpreter_and_on_fp64(monkeypatch):
    import caopd_kernels.triton_kl as triton_kl

    hs, ws, ht, wt, mask, _ = make_inputs(5, 4, 100, torch.float32)
    with pytest.raises(ValueError, match="impl='triton' takes float32, bfloat16 or float16"):
        fused_linear_kl(hs.double(), ws.double(), ht.double(), wt.double(), impl="triton")
    if TRITON_DEVICE.type == "cuda":
        pytest.skip("the error for CPU tensors without the interpreter: checked where there is no GPU")
    monkeypatch.setattr(triton_kl, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors; on CPU set TRITON_INTERPRET=1"):
        fused_linear_kl(hs, ws, ht, wt, impl="triton")


@pytest.mark.parametrize("change, message", [
    (dict(teacher_hidden=torch.randn(5, 6)), "teacher_hidden has H_t = 6 but teacher_weight has 4"),
    (dict(teacher_hidden=torch.randn(5, 4).int()), "teacher_hidden has dtype torch.int32"),
    (dict(student_weight=torch.randn(11, 4, device="meta")), "all tensors must be on one device"),
    (dict(teacher_bias=torch.zeros(11).double()), r"teacher_bias must be \[V\] = \[11\] of dtype torch.float32"),
])
def test_teacher_side_mismatches_are_named(change, message):
    args = dict(student_hidden=torch.randn(5, 4), student_weight=torch.randn(11, 4), teacher_hidden=torch.randn(5, 4),
                teacher_weight=torch.randn(11, 4))
    args.update(change)
    bias = args.pop("teacher_bias", None)
    with pytest.raises(ValueError, match=message):
        fused_linear_kl(**args, teacher_bias=bias)


class _VocabBuffers(TorchDispatchMode):
    """The most [rows x V] buffers (distinct storages) alive at once, other than ``inputs``' own, seen
    after every aten op: what the chunk loop holds, whatever the timing (no allocator needed)."""

    def __init__(self, vocab: int, inputs):
        super().__init__()
        self.vocab, self.refs, self.most = vocab, [], 0
        self.skip = {t.untyped_storage().data_ptr() for t in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == self.vocab:
                self.refs.append(weakref.ref(t))
        self.refs = [r for r in self.refs if r() is not None]
        alive = {r().untyped_storage().data_ptr() for r in self.refs if r() is not None} - self.skip
        self.most = max(self.most, len(alive))
        return out


class _LogitGemms(TorchDispatchMode):
    """The GEMMs that produce [rows x V] outputs, by name (aten.mm.out writes a given buffer)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.names = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "mm" in str(func) and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == self.vocab:
            self.names.append(str(func))
        return out


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_chunks_reuse_two_logit_buffers(bias):
    """Issue 29: a fresh [C, V] buffer per chunk is fresh pages on CPU, whose faults cost ~10 % of the logits
    GEMM; in fp32 every chunk's two logits GEMMs write into buffers allocated once (5 chunks here)."""
    hs, ws, ht, wt, mask, bs = make_inputs(37, 8, 300, torch.float32, bias=bias)
    hs.requires_grad_(), ws.requires_grad_()
    mode = _LogitGemms(300)
    with mode:
        fused_linear_kl(hs, ws, ht, wt, impl="torch", chunk_tokens=8, student_bias=bs)
    gemm = "aten.addmm.out" if bias else "aten.mm.out"
    assert mode.names == [gemm, "aten.mm.out"] * 5, mode.names  # the teacher has no bias here


@pytest.mark.parametrize("divergence", ["reverse", "forward", "jsd"])
@pytest.mark.parametrize("case", ["fp32", "bf16", "bf16 hidden, fp32 weight", "vocab common"])
def test_no_vocab_buffer_outlives_its_chunk(divergence, case):
    """Issue 29: grad_z_low (grad_z itself in fp32) stayed alive while the next chunk computed its logits: one
    [C, V] fp32 buffer more than the budget (+400 MiB at V 151,936). With gradients, the loop holds no more
    [C, V] buffers than without; at most the budget's (TORCH_BUFFERS) plus one op's transient operand."""
    from caopd_kernels.torch_chunked import TORCH_BUFFERS

    n, h, v = 37, 24, 211
    g = torch.Generator().manual_seed(0)
    hidden_dtype = torch.float32 if case in ("fp32", "vocab common") else torch.bfloat16
    weight_dtype = torch.bfloat16 if case == "bf16" else torch.float32
    teacher_vocab = v + 5 if case == "vocab common" else v
    hs = torch.randn(n, h, generator=g).to(hidden_dtype)
    ws = torch.randn(v, h, generator=g).to(weight_dtype)
    ht = torch.randn(n, h, generator=g).to(hidden_dtype)
    wt = torch.randn(teacher_vocab, h, generator=g).to(weight_dtype)
    most = {}
    for grad in (False, True):
        inputs = [x.clone().requires_grad_(grad and i < 2) for i, x in enumerate((hs, ws, ht, wt))]
        mode = _VocabBuffers(v, inputs)
        with mode:
            fused_linear_kl(*inputs, divergence=divergence, impl="torch", chunk_tokens=8,
                            vocab="common" if case == "vocab common" else "equal")
        most[grad] = mode.most
    assert most[True] == most[False] <= TORCH_BUFFERS[divergence] + 1, most
