"""A drop-in for Liger-Kernel's ``LigerFusedLinearJSDLoss`` (its soft loss), backed by fused_linear_kl.

Liger's loss (liger_kernel.chunked_loss.jsd_loss), per token t whose label is not ignore_index,
with P_s = softmax(W_s h_s / T), P_t = softmax(W_t h_t / T) and M = beta P_t + (1 - beta) P_s:

    JSD_beta(t) = beta KL(P_t || M) + (1 - beta) KL(P_s || M)     (beta = 0: KL(P_t || P_s); 1: KL(P_s || P_t))
    loss = weight_soft_loss * sum_t JSD_beta(t) / #tokens that count  +  weight_hard_loss * CE

This module computes the soft part only, so it takes weight_hard_loss = 0 (anything else is a
ValueError: a codebase that also wants the cross-entropy adds it itself). Same constructor
arguments and call signature as Liger's module, so switching is one import; ``compiled`` and
``chunk_size`` are accepted and ignored (the chunking is fused_linear_kl's own, by memory budget).
"""
from __future__ import annotations

import torch

from .fused_linear_kl import divergence_for_beta, fused_linear_kl


class FusedLinearJSDLoss(torch.nn.Module):
    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False, impl: str = "auto"):
        super().__init__()
        if weight_hard_loss != 0:
            raise ValueError(f"weight_hard_loss must be 0, got {weight_hard_loss}: this loss computes the "
                             "distillation (soft) part only; add a cross-entropy yourself if you want one")
        self.divergence, self.beta = divergence_for_beta(float(beta))
        self.weight_soft_loss, self.ignore_index = weight_soft_loss, ignore_index
        self.temperature, self.return_soft_hard_loss, self.impl = temperature, return_soft_hard_loss, impl

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor, true_labels: torch.Tensor, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None):
        soft = fused_linear_kl(student_input, student_weight, teacher_input, teacher_weight,
                               true_labels != self.ignore_index, divergence=self.divergence, beta=self.beta,
                               temperature=self.temperature, student_bias=student_bias, teacher_bias=teacher_bias,
                               reduction="mean", impl=self.impl)
        loss = self.weight_soft_loss * soft
        if self.return_soft_hard_loss:
            return loss, soft, torch.zeros_like(soft)
        return loss
