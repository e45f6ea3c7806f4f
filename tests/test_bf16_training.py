"""bf16 weights that still follow the fp32 rules (issue 13, item 1): the EMA teacher.

In plain bf16, ``lerp_`` with alpha 0.01 rounds most updates away (the teacher stays frozen);
stochastic rounding keeps every step in expectation.
"""
from __future__ import annotations

import pytest
import torch

from caopd.modeling.models import ema_update_, round_stochastic_


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    value = torch.full((200_000,), 1.0 + 2**-9)  # bf16 near 1 has ulp 2^-7: this is a quarter ulp up
    out = torch.empty(200_000, dtype=torch.bfloat16)
    round_stochastic_(out, value, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(out.float().mean()) - (1.0 + 2**-9)) < 2e-5  # nearest rounding would give exactly 1.0
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -3.0])
    round_stochastic_(out[:4], special)
    assert out[:4].float().tolist() == [float("inf"), -float("inf"), 0.0, -3.0]


def test_a_bf16_teacher_follows_the_fp32_ema():
    g = torch.Generator().manual_seed(0)
    student = torch.nn.Linear(64, 64)
    teacher32 = torch.nn.Linear(64, 64)
    with torch.no_grad():
        teacher32.weight.copy_(student.weight + torch.randn(64, 64, generator=g) * 0.002)
        teacher32.bias.copy_(student.bias)
    teacher16 = torch.nn.Linear(64, 64).to(torch.bfloat16)
    teacher16.load_state_dict({k: v.to(torch.bfloat16) for k, v in teacher32.state_dict().items()})
    nearest = torch.nn.Linear(64, 64).to(torch.bfloat16)
    nearest.load_state_dict(teacher16.state_dict())
    start = teacher16.weight.detach().float().clone()
    for _ in range(100):
        ema_update_(teacher32, student, 0.01)
        ema_update_(teacher16, student.to(torch.bfloat16).float(), 0.01, generator=g)
        with torch.no_grad():
            nearest.weight.lerp_(student.weight.to(torch.bfloat16), 0.01)  # what plain bf16 does
    target = student.weight.detach().to(torch.bfloat16).float()  # where the EMA heads
    def gap_closed(weight):
        return float(1 - (weight.detach().float() - target).abs().sum() / (start - target).abs().sum())
    fp32 = gap_closed(teacher32.weight.detach())
    assert abs(fp32 - 0.634) < 0.01  # 1 - 0.99^100 of the way to the student
    assert gap_closed(nearest.weight) < 0.25  # plain bf16: most small steps round away
    assert abs(gap_closed(teacher16.weight) - fp32) < 0.05  # stochastic rounding: the fp32 EMA, in expectation
    assert (teacher16.weight.detach().float() != start).float().mean() > 0.5


def _train_steps(params, optimizer, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.to(p.dtype)
        optimizer.step()


def test_bf16_adamw_with_stochastic_rounding_follows_the_fp32_rule():
    """lr 2e-5 (the paper's), RMSNorm-like weights near 1 and small matrix entries: plain bf16
    AdamW leaves most weights where they were; the stochastic-rounding one moves them as fp32 does."""
    from caopd.training.optim import StochasticRoundingAdamW

    g = torch.Generator().manual_seed(0)
    start = [torch.ones(4096) + torch.randn(4096, generator=g) * 0.01, torch.randn(64, 64, generator=g) * 0.05]
    grads = [[torch.randn(4096, generator=g), torch.randn(64, 64, generator=g)] for _ in range(20)]
    fp32 = [p.clone().requires_grad_() for p in start]
    plain = [p.to(torch.bfloat16).requires_grad_() for p in start]
    rounded = [p.to(torch.bfloat16).requires_grad_() for p in start]
    bf16_start = [p.detach().float().clone() for p in rounded]
    _train_steps(fp32, torch.optim.AdamW(fp32, lr=2e-5, weight_decay=0.1), grads)
    _train_steps(plain, torch.optim.AdamW(plain, lr=2e-5, weight_decay=0.1), grads)
    _train_steps(rounded, StochasticRoundingAdamW(rounded, lr=2e-5, weight_decay=0.1, generator=g), grads)
    for i in range(2):
        moved32 = (fp32[i].detach() - start[i])  # what fp32 AdamW did to each weight
        moved = rounded[i].detach().float() - bf16_start[i]
        # in expectation the same step: the mean over many weights matches fp32's to a small share
        assert abs(float((moved - moved32).mean())) < 0.05 * float(moved32.abs().mean()), i
        assert float((plain[i].detach().float() - bf16_start[i]).abs().mean()) < 0.5 * float(moved32.abs().mean())
    norm_like = rounded[0].detach().float()
    # weights near 1 (ulp 2^-8..2^-7, 20 steps of ~2e-5): plain bf16 never moves one; with stochastic
    # rounding a share of about (total step / ulp) of them moves by one ulp, the rest stay
    assert (plain[0].detach().float() != bf16_start[0]).float().mean() == 0.0
    assert (norm_like != bf16_start[0]).float().mean() > 0.01


def test_bf16_adamw_refuses_fp32_parameters():
    import pytest

    from caopd.training.optim import StochasticRoundingAdamW

    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="takes bf16 parameters"):
        StochasticRoundingAdamW([p]).step()


def test_dtypes_and_optimizer_by_master_weights():
    from caopd.config import TrainConfig
    from caopd.training.optim import StochasticRoundingAdamW
    from caopd.training.placement import make_optimizer, training_dtypes

    fp32, bf16 = TrainConfig(master_weights="fp32"), TrainConfig(master_weights="bf16", teacher_dtype="bf16")
    assert training_dtypes(fp32, use_bf16=False) == (torch.float32,) * 2
    assert training_dtypes(bf16, use_bf16=False) == (torch.float32, torch.bfloat16)  # the teacher as asked
    assert training_dtypes(fp32, use_bf16=True) == (torch.float32, torch.float32)  # --teacher-dtype fp32 (default)
    assert training_dtypes(bf16, use_bf16=True) == (torch.bfloat16, torch.bfloat16)
    assert type(make_optimizer(fp32, torch.nn.Linear(2, 2))) is torch.optim.AdamW
    assert type(make_optimizer(bf16, torch.nn.Linear(2, 2).to(torch.bfloat16))) is StochasticRoundingAdamW


def test_gpu_check_stops_with_one_line_without_cuda():
    import subprocess
    from pathlib import Path

    import pytest

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run scripts/gpu_check.sh itself")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("gpu_check: no CUDA device here") and proc.stderr.count("\n") == 1


def test_the_gpu_bf16_check_script_runs_dry_on_cpu():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gpu_bf16_check.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == [] and result["rounding_mean_error"] < 1e-5
    assert result["train_fp32"]["student_dtypes"] == ["torch.float32"] and len(result["train_bf16"]["losses"]) == 3


def test_micro_batch_gradients_are_summed_in_fp32_and_clipped_there():
    from caopd.training.optim import StochasticRoundingAdamW

    p = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    optimizer = StochasticRoundingAdamW([p], lr=1e-3)
    for c in (1.0, 2**-9, 2**-9, 2**-9, 2**-9):  # a bf16 running sum keeps 1.0: each 2^-9 is under half an ulp
        (p * c).sum().backward()
    assert p.grad is None
    assert optimizer.gradient(p).tolist() == [1.0 + 4 * 2**-9] * 4
    bf16_sum = torch.tensor(1.0, dtype=torch.bfloat16)
    for _ in range(4):
        bf16_sum += torch.tensor(2**-9, dtype=torch.bfloat16)
    assert float(bf16_sum) == 1.0
    norm = optimizer.clip_grad_norm_(1.0)
    assert float(norm) == pytest.approx(2 * (1.0 + 4 * 2**-9))
    assert float(torch.linalg.vector_norm(optimizer.gradient(p))) == pytest.approx(1.0, rel=1e-5)
    optimizer.step()
    optimizer.zero_grad()
    assert optimizer.gradient(p) is None and float(p.detach().float().mean()) < 1.0


def test_a_bf16_training_step_through_the_trainer(tmp_path, monkeypatch):
    """The bf16-weights path as on a GPU (forced here on CPU): stochastic-rounding AdamW, fp32
    gradient sums, its clipping, a bf16 teacher."""
    import caopd.training.placement as placement
    from caopd.config import TrainConfig
    from caopd.training.trainer import train

    monkeypatch.setattr(placement, "training_dtypes", lambda config, use_bf16: (torch.bfloat16,) * 2)
    config = TrainConfig(model="tiny-qwen3", tokenizer="fast", output_dir=str(tmp_path / "run"), num_generations=2,
                         prompts_per_step=4, micro_batch_prompts=2, max_prompt_length=256, max_completion_length=12,
                         max_steps=2, learning_rate=1e-3, save_every=10, loss_impl="torch", teacher_ema=0.1)
    result = train(config, quiet=True)
    student, teacher = result["student"], result["teacher"]
    assert {p.dtype for p in student.parameters()} == {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert all(0 < r["grad_norm"] < float("inf") for r in result["history"])
    assert not torch.equal(student.state_dict()["model.norm.weight"], teacher.state_dict()["model.norm.weight"])
