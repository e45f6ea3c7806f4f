"""Evaluation: metrics (ECE, Brier, SPR, OCG, AUROC), reliability plots, tables, and ``caopd eval``'s
generate-and-score (``benchmark_eval``)."""
