"""caopd_kernels: drop-in kernels for on-policy distillation (torch and triton only).

    from caopd_kernels import fused_linear_kl, FusedLinearKL
    from caopd_kernels import FusedLinearJSDLoss  # for code written against Liger's LigerFusedLinearJSDLoss
"""
from .fused_linear_kl import FusedLinearKL, fused_linear_kl
from .liger_jsd import FusedLinearJSDLoss
from .reference import fused_linear_kl_reference

__all__ = ["fused_linear_kl", "FusedLinearKL", "FusedLinearJSDLoss", "fused_linear_kl_reference"]
