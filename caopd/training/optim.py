"""AdamW for bf16 weights with stochastic rounding: training that follows the fp32 rule where fp32
master weights do not fit (Qwen3-8B beside vLLM on one GPU).

Each step computes the AdamW update in fp32 from the bf16 weight, gradient and moments, then
rounds weight and moments back to bf16 stochastically (``models.round_stochastic_``), so each one
equals its fp32 value in expectation. With round-to-nearest, updates under half a bf16 ulp vanish:
at lr 2e-5 only ~30 % of a model's weights change in a step and RMSNorm weights near 1 never move.
Moments are kept in bf16 (half the memory of fp32 states). Decoupled weight decay, as AdamW.

Gradients of several micro-batches are summed in fp32: a hook moves each bf16 gradient into an fp32
buffer as soon as backward has produced it (a bf16 running sum drops every addition under half an
ulp of the sum). So the gradients live here, not in ``p.grad``: clip them with this optimizer's
``clip_grad_norm_``.
"""
from __future__ import annotations

import math

import torch

from caopd.modeling.models import round_stochastic_


class StochasticRoundingAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, generator: torch.Generator | None = None,
                 fp32_grad_accumulation: bool = True):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.generator = generator
        self.grads32: dict[torch.Tensor, torch.Tensor] = {}
        if fp32_grad_accumulation:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        p.register_post_accumulate_grad_hook(self._accumulate)

    def _accumulate(self, p: torch.Tensor) -> None:
        total = self.grads32.get(p)
        if total is None:
            self.grads32[p] = p.grad.float()
        else:
            total.add_(p.grad)
        p.grad = None

    def gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        """The fp32 gradient of ``p`` summed over the micro-batches since the last zero_grad."""
        if p in self.grads32:
            return self.grads32[p]
        return None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so their global L2 norm is at most ``max_norm`` (inf: only measure);
        returns the norm before clipping, as torch.nn.utils.clip_grad_norm_ does."""
        grads = [g for group in self.param_groups for p in group["params"] if (g := self.gradient(p)) is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                                                     for g in grads]))  # fp64: see clip_grad_norm_fp64
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.grads32:
                    self.grads32[p].mul_(factor)
                elif p.grad is not None:
                    p.grad.mul_(factor.to(p.grad.dtype))
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.grads32.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = self.gradient(p)
                if grad is None:
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
                weight = p.float().mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                weight.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))
                round_stochastic_(p, weight, self.generator)
                round_stochastic_(state["exp_avg"], exp_avg, self.generator)
                round_stochastic_(state["exp_avg_sq"], exp_avg_sq, self.generator)
        return loss


def clip_grad_norm_fp64(parameters, max_norm: float, all_reduce=None) -> float:
    """Clip the gradients to a global L2 norm of ``max_norm`` (inf: report only); returns the norm.

    The sum of squares is accumulated in fp64: in fp32 the norm of a 151,936 x H embedding gradient
    was off by ~5e-5 relative, and by a different amount when sharded (the same gradients reported
    0.0751588 on one process and 0.0751603 on two; fp64: 0.0751622 on both). ``all_reduce``: sums a
    float64 tensor over the processes, for sharded gradients (each process holds a part)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    squares = sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in local)
    if all_reduce is not None:
        squares = all_reduce(squares)
    total = squares ** 0.5
    if math.isfinite(max_norm) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in local:
            g.mul_(coef)
    return total
