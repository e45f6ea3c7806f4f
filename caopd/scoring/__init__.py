"""Stages 3-4, verify and calibrate: answer checks (``verifiers``), the stated confidence (``confidence``),
P_acc and the revised completion (``calibration``)."""
