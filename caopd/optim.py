"""AdamW for bf16 weights with stochastic rounding: training that follows the fp32 rule where fp32
master weights do not fit (Qwen3-8B beside vLLM on one GPU).

Each step computes the AdamW update in fp32 from the bf16 weight, gradient and moments, then
rounds weight and moments back to bf16 stochastically (``models.round_stochastic_``), so each one
equals its fp32 value in expectation. With round-to-nearest, updates under half a bf16 ulp vanish:
at lr 2e-5 only ~30 % of a model's weights change in a step and RMSNorm weights near 1 never move.
Moments are kept in bf16 (half the memory of fp32 states). Decoupled weight decay, as AdamW.
"""
from __future__ import annotations

import math

import torch

from caopd.models import round_stochastic_


class StochasticRoundingAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, generator: torch.Generator | None = None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.generator = generator

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"StochasticRoundingAdamW takes bf16 parameters, got {p.dtype}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad.float()
                weight = p.float().mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                weight.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))
                round_stochastic_(p, weight, self.generator)
                round_stochastic_(state["exp_avg"], exp_avg, self.generator)
                round_stochastic_(state["exp_avg_sq"], exp_avg_sq, self.generator)
        return loss
