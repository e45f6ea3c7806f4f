"""caopd_kernels inside other training libraries. Each submodule imports its library lazily, so
``import caopd_kernels`` never needs one:

    caopd_kernels.integrations.trl   TRL's SDFTTrainer and SDPOTrainer (distillation_mode="full_logits")
"""
