"""Stages 5-6, loss and step: the fused loss (``loss``, ``shared_prefix``), the optimizer (``optim``), LoRA
(``lora``), FSDP2 (``distributed``), the loop (``trainer``) and its run folder (``checkpoint``, ``run_folder``)."""
