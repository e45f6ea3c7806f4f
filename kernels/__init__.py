"""caopd_kernels: drop-in kernels for on-policy distillation (torch and triton only).

    from caopd_kernels import fused_linear_kl, FusedLinearKL
"""
from .fused_linear_kl import FusedLinearKL, fused_linear_kl
from .reference import fused_linear_kl_reference

__all__ = ["fused_linear_kl", "FusedLinearKL", "fused_linear_kl_reference"]
