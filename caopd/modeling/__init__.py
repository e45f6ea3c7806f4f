"""Models and tokenizers (``models``), the published Qwen3 sizes (``model_shapes``), memory estimates (``memory``)."""
