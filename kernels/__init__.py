"""caopd_kernels: drop-in kernels for on-policy distillation (torch and triton only).

    from caopd_kernels import fused_linear_kl, FusedLinearKL
    from caopd_kernels import fused_linear_kl_topk  # a teacher known by its top-k log-probabilities
    from caopd_kernels import topk_logprobs  # those of a local model, as a server returns them
    from caopd_kernels import fused_linear_token_logprobs  # log p of given tokens, differentiable
    from caopd_kernels import FusedLinearJSDLoss  # for code written against Liger's LigerFusedLinearJSDLoss
"""
from .fused_linear_kl import FusedLinearKL, fused_linear_kl
from .fused_linear_kl_topk import fused_linear_kl_topk
from .fused_linear_token_logprobs import fused_linear_token_logprobs
from .liger_jsd import FusedLinearJSDLoss
from .reference import fused_linear_kl_reference, fused_linear_kl_topk_reference
from .topk_logprobs import topk_logprobs

__all__ = ["fused_linear_kl", "FusedLinearKL", "FusedLinearJSDLoss", "fused_linear_kl_reference",
           "fused_linear_kl_topk", "fused_linear_kl_topk_reference", "topk_logprobs", "fused_linear_token_logprobs"]
