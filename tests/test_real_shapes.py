"""Real Qwen3 shapes (issue 16): random:<size> builds the published architecture, random weights,
no download; one CaOPD step of random:Qwen3-0.6B runs on this CPU through the real trainer.

Deliberate bugs these catch: a size with a wrong width, depth or head count (the parameter count
leaves the published total), random: falling through to from_pretrained (an InputError naming a
hub id), a config.json path not honoured.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caopd.errors import InputError
from caopd.modeling.model_shapes import QWEN3_SIZES, random_config
from caopd.modeling.models import load_model, load_tokenizer

# published totals (billions), from the model cards: Qwen3-0.6B 0.6 (0.44 without embeddings), 1.7B 1.7
# (1.4), 4B 4.0 (3.6), 8B 8.2 (6.95), 14B 14.8 (13.2), 32B 32.8 (31.2)
PUBLISHED = {"Qwen3-0.6B": (0.6, 0.44), "Qwen3-1.7B": (1.7, 1.4), "Qwen3-4B": (4.0, 3.6), "Qwen3-8B": (8.2, 6.95),
             "Qwen3-14B": (14.8, 13.2), "Qwen3-32B": (32.8, 31.2)}


def parameter_counts(config) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                     for p in m.parameters())
    if config.tie_word_embeddings:
        embeddings //= 2
    return total / 1e9, (total - embeddings) / 1e9


@pytest.mark.parametrize("size", list(QWEN3_SIZES))
def test_random_sizes_have_the_published_parameter_counts(size):
    config = random_config(f"random:{size}")
    assert (config.model_type, config.vocab_size, config.head_dim, config.num_key_value_heads) == \
        ("qwen3", 151_936, 128, 8)
    total, without_embeddings = parameter_counts(config)
    published_total, published_body = PUBLISHED[size]
    assert total == pytest.approx(published_total, rel=0.04), total
    assert without_embeddings == pytest.approx(published_body, rel=0.04), without_embeddings


def test_random_from_a_config_json_and_bad_names(tmp_path):
    values = {"model_type": "qwen3", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    (tmp_path / "config.json").write_text(json.dumps(values))
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    with pytest.raises(InputError, match="its vocabulary \\(300\\) is smaller than the tokenizer's"):
        load_model(f"random:{tmp_path / 'config.json'}", tokenizer)
    values["vocab_size"] = 2048
    (tmp_path / "config.json").write_text(json.dumps(values))
    first = load_model(f"random:{tmp_path}", tokenizer, seed=3)  # a folder holding a config.json works too
    assert first.config.num_hidden_layers == 3 and first.config.vocab_size == 2048
    again = load_model(f"random:{tmp_path / 'config.json'}", tokenizer, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))  # seeded
    with pytest.raises(InputError, match="Qwen3-9B: not a known size"):
        load_model("random:Qwen3-9B", tokenizer)


@pytest.mark.slow
def test_one_caopd_step_of_qwen3_0_6b_on_this_cpu(science_path, tmp_path):
    """The real architecture (596M parameters, 151,936-row lm_head) and tokenizer, the shared eval
    prompts (their last 64 tokens), K = 2, 8 sampled tokens, through the real trainer, engine and fused
    loss; no checkpoint (--save-every 0: final/ only). About a minute, 10 GB."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "caopd", "train", "--model", "random:Qwen3-0.6B", "--tokenizer",
                           "qwen3", "--dataset", "science", "--data", str(science_path), "--num-generations", "2",
                           "--prompts-per-step", "1", "--micro-batch-prompts", "1", "--max-completion-length", "8",
                           "--max-prompt-length", "64", "--max-steps", "1", "--save-every", "0",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and row["loss"] > 0 and row["grad_norm"] > 0 and row["mean_completion_tokens"] > 3
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    saved = json.loads((out / "final" / "config.json").read_text())
    assert (saved["num_hidden_layers"], saved["hidden_size"], saved["vocab_size"]) == (28, 1024, 151_936)


def test_liger_kernels_patch_the_model_without_their_loss(monkeypatch):
    """--liger-kernels: Liger's RMSNorm, SwiGLU and RoPE on the model itself, never its cross-entropy
    patches (caopd's loss is its own). CUDA only: on this CPU a one-line refusal; the call is checked
    with CUDA faked and Liger's patch function recorded."""
    import liger_kernel.transformers

    from caopd.modeling.models import apply_liger_kernels

    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    model = load_model("tiny-qwen3", tokenizer)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--liger-kernels needs a CUDA GPU"):
            apply_liger_kernels(model)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(liger_kernel.transformers, "apply_liger_kernel_to_qwen3", lambda **kw: calls.append(kw))
    apply_liger_kernels(model)
    assert calls == [dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                          fused_linear_cross_entropy=False, model=model)]
    model.config.model_type = "llama"
    with pytest.raises(InputError, match="--liger-kernels: for Qwen3 models, not llama"):
        apply_liger_kernels(model)
