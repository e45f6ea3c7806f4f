"""The published Qwen3 shapes, for ``--model random:Qwen3-8B`` and ``caopd memory --model Qwen3-8B``.

Values are those of each model's ``config.json`` on the Hugging Face hub (Qwen/Qwen3-0.6B ...
Qwen/Qwen3-32B, April 2025 release): every size has head_dim 128, 8 KV heads, vocabulary 151,936,
rope_theta 1,000,000, 40,960 positions, RMSNorm eps 1e-6; the small ones tie the lm_head to the
embeddings. ``random:<name>`` builds that architecture with random weights (seeded) and no
download; ``random:<path to a config.json>`` builds any architecture transformers knows.
"""
from __future__ import annotations

import json
from pathlib import Path

from caopd.errors import InputError

RANDOM_PREFIX = "random:"
QWEN3_COMMON = dict(model_type="qwen3", vocab_size=151_936, head_dim=128, num_key_value_heads=8,
                    rope_theta=1_000_000.0, max_position_embeddings=40_960, rms_norm_eps=1e-6,
                    hidden_act="silu", attention_bias=False)
QWEN3_SIZES = {  # hidden, intermediate, layers, query heads, tied embeddings
    "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=False),
    "Qwen3-14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                      tie_word_embeddings=False),
    "Qwen3-32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      tie_word_embeddings=False),
}


def is_random(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


def shape_values(name: str) -> dict:
    """config.json values of a published size (``Qwen3-8B``, also ``Qwen/Qwen3-8B``) or of a local
    config.json / model folder. One line naming the name when it is neither."""
    size = name.removeprefix("Qwen/")
    if size in QWEN3_SIZES:
        return {**QWEN3_COMMON, **QWEN3_SIZES[size]}
    if name == "tiny-qwen3":  # its default sizes, with the fast tokenizer's vocabulary
        from caopd.modeling.models import tiny_qwen3_config

        return tiny_qwen3_config(1024).to_dict()
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable config.json ({e})") from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise InputError(f"{path}: a model config.json needs a model_type field")
        return values
    raise InputError(f"{name}: not a known size ({', '.join(QWEN3_SIZES)}) nor a config.json or model folder")


def random_config(model: str):
    """The transformers config of ``random:<name or config.json>``."""
    from transformers import AutoConfig

    values = dict(shape_values(model.removeprefix(RANDOM_PREFIX)))
    model_type = values.pop("model_type")
    for key in ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path"):
        values.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as e:
        raise InputError(f"--model {model}: transformers does not know model_type {model_type!r} ({e})") from None
