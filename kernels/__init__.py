"""caopd_kernels: drop-in kernels for on-policy distillation (torch and triton only)."""
