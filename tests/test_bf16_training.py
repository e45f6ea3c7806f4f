"""bf16 weights that still follow the fp32 rules (issue 13, item 1): the EMA teacher.

In plain bf16, ``lerp_`` with alpha 0.01 rounds most updates away (the teacher stays frozen);
stochastic rounding keeps every step in expectation.
"""
from __future__ import annotations

import torch

from caopd.models import ema_update_, round_stochastic_


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
