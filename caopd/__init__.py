"""caopd: Calibration-Aware On-Policy Distillation (CaOPD) of LLMs."""

__version__ = "0.1.0"
