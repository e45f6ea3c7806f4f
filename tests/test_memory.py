"""`caopd memory` (issue 16): the analytic estimate's parts, checked by hand and against the models.

Deliberate bugs these catch: a parameter count off by the q/k norms or the untied lm_head (exact
meta-device counts), FSDP not dividing the sharded parts, the shared prefix or checkpointing not
changing the activations, a largest micro-batch that does not fit (or leaves one that does).
"""
from __future__ import annotations

import dataclasses

import pytest

from caopd.cli import main
from caopd.modeling.memory import GIB, Plan, Shape, estimate, largest_micro_batch
from caopd.modeling.model_shapes import QWEN3_SIZES, random_config, shape_values
from caopd.modeling.models import tiny_qwen3_config
from tests.test_real_shapes import parameter_counts


@pytest.mark.parametrize("size", [*QWEN3_SIZES, "tiny-qwen3"])
def test_parameter_count_is_the_models_own(size):
    config = tiny_qwen3_config(1024) if size == "tiny-qwen3" else random_config(f"random:{size}")
    assert Shape.of(shape_values(size)).parameters == round(parameter_counts(config)[0] * 1e9)


def parts(plan: Plan) -> dict[str, float]:
    return dict(estimate(plan).rows)


def test_the_persistent_parts_of_qwen3_8b_by_hand():
    n = Shape.of(shape_values("Qwen3-8B")).parameters
    fp32 = parts(Plan("Qwen3-8B"))
    assert fp32["trained weights (fp32 master)"] == n * 4 and fp32["Adam moments"] == 2 * n * 4
    assert fp32["EMA teacher"] == n * 2 and fp32["gradients"] == n * 4  # bf16 teacher, fp32 gradients
    bf16 = parts(Plan("Qwen3-8B", master_weights="bf16"))
    assert bf16["trained weights"] == n * 2 and bf16["Adam moments"] == 2 * n * 2  # SR AdamW: bf16 moments
    sharded = parts(Plan("Qwen3-8B", fsdp=True, gpus=8))
    assert sharded["trained weights (fp32 master)"] == n * 4 / 8 and sharded["Adam moments"] == n * 8 / 8
    assert sharded["EMA teacher"] == n * 4 / 8  # fp32 shards under FSDP
    assert sharded["whole rollout copy (per process)"] == n * 2
    offloaded = parts(Plan("Qwen3-8B", fsdp=True, gpus=8, optimizer_offload=True))  # FSDP2 CPUOffloadPolicy
    assert offloaded["Adam moments (in CPU memory)"] == 0 and offloaded["gradients"] == 0
    assert offloaded["trained weights (fp32 master) (in CPU memory)"] == 0
    assert f"host memory per process, not on the GPU: {n * 20 / 8 / GIB:.1f} GiB" in offloaded  # w, teacher, g, 2 m
    assert parts(Plan("Qwen3-8B", optimizer_offload=True))["Adam moments (offloaded to CPU)"] == 0


def test_activations_follow_tokens_and_checkpointing():
    shape = Shape.of(shape_values("Qwen3-0.6B"))
    base = Plan("Qwen3-0.6B", prompt_tokens=1000, completion_tokens=100, num_generations=4, shared_prefix=False)
    padded = parts(base)["student activations (saved for backward)"]
    assert padded == 4 * 1100 * shape.saved_per_token_layer() * 2 * shape.layers
    shared = parts(dataclasses.replace(base, shared_prefix=True))["student activations (saved for backward)"]
    repeated_prefix = 4 * 1000 * (2 * shape.kv_width + 2 * shape.q_width) * 2 * shape.layers
    assert shared == (1000 + 4 * 100) * shape.saved_per_token_layer() * 2 * shape.layers + repeated_prefix
    assert shared < padded
    checkpointed = parts(dataclasses.replace(base, gradient_checkpointing=True))
    assert checkpointed["student activations (saved for backward)"] == \
        4 * 1100 * (shape.hidden * shape.layers + shape.saved_per_token_layer()) * 2
    liger = parts(dataclasses.replace(base, liger_kernels=True))["student activations (saved for backward)"]
    assert liger == 4 * 1100 * shape.saved_per_token_layer(liger=True) * 2 * shape.layers < padded
    two = parts(dataclasses.replace(base, micro_batch_prompts=2))
    assert two["student activations (saved for backward)"] == 2 * padded


def test_largest_micro_batch_is_the_edge_of_fitting():
    plan = Plan("Qwen3-4B", gpu_memory_gib=80, prompts_per_step=16, gradient_checkpointing=True)
    most = largest_micro_batch(plan)
    assert 1 <= most < 16
    assert estimate(dataclasses.replace(plan, micro_batch_prompts=most)).peak <= 80 * GIB
    assert estimate(dataclasses.replace(plan, micro_batch_prompts=most + 1)).peak > 80 * GIB


def test_the_command(capsys):
    args = ["memory", "--model", "Qwen3-8B", "--gpus", "1", "--gpu-memory-gib", "141", "--prompt-tokens", "1024",
            "--completion-tokens", "1024", "--num-generations", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Qwen3-8B: 8.19B parameters, 36 layers" in out and "DOES NOT FIT" in out
    assert "levers (peak with each alone):" in out and "--gradient-checkpointing true" in out
    assert main([*args, "--gradient-checkpointing", "--master-weights", "bf16", "--rollout-engine", "vllm"]) == 0
    out = capsys.readouterr().out
    assert ": fits" in out and "largest micro-batch that fits:" in out
    assert main(["memory", "--model", "random:Qwen3-9B"]) == 2
    assert "Qwen3-9B: not a known size" in capsys.readouterr().err
