"""`caopd memory` (issues 16, 23): the analytic estimate's parts, checked by hand and against the models.

Deliberate bugs these catch: a parameter count off by the q/k norms or the untied lm_head (exact
meta-device counts), FSDP not dividing the sharded parts, the shared prefix or checkpointing not
changing the activations, a largest micro-batch that does not fit (or leaves one that does), a
whole model counted on every process at load (only the main process reads it), offloaded shards
counted on the GPU, the teacher's precision ignored. The estimate against measured peaks:
tests/test_fsdp_memory.py.
"""
from __future__ import annotations

import dataclasses
import json

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


def parts(plan: Plan, main: bool = True) -> dict[str, float]:
    return {r.name: r.bytes for r in estimate(plan, main=main).rows}


def test_the_persistent_parts_of_qwen3_8b_by_hand():
    n = Shape.of(shape_values("Qwen3-8B")).parameters
    fp32 = parts(Plan("Qwen3-8B"))
    assert fp32["trained weights (fp32)"] == n * 4 and fp32["Adam moments"] == 2 * n * 4
    assert fp32["EMA teacher (fp32)"] == n * 4 and fp32["gradients"] == n * 4  # --teacher-dtype fp32, the default
    bf16 = parts(Plan("Qwen3-8B", master_weights="bf16", teacher_dtype="bf16"))
    assert bf16["trained weights (bf16)"] == n * 2 and bf16["Adam moments"] == 2 * n * 2  # SR AdamW: bf16 moments
    assert bf16["EMA teacher (bf16)"] == n * 2
    sharded = parts(Plan("Qwen3-8B", fsdp=True, gpus=8))
    assert sharded["trained weights (fp32 shards)"] == n * 4 / 8 and sharded["Adam moments"] == n * 8 / 8
    assert sharded["EMA teacher (fp32 shards)"] == n * 4 / 8
    assert not any("rollout copy" in name for name in sharded)  # no whole model on a process after the load


def test_a_teacher_model_of_its_own_is_counted_by_its_shape():
    """--teacher-model Qwen3-32B --model Qwen3-8B (issue 30): the teacher's own parameters, frozen (no moments or
    gradients of its own), both heads in FSDP's root, its layers in flight and its KV cache, no EMA teacher."""
    student, teacher = (Shape.of(shape_values(name)) for name in ("Qwen3-8B", "Qwen3-32B"))
    plan = Plan("Qwen3-8B", teacher_model="Qwen3-32B", fsdp=True, gpus=8, teacher_dtype="bf16")
    rows = parts(plan)
    alone = parts(Plan("Qwen3-8B", fsdp=True, gpus=8, teacher_dtype="bf16"))
    assert rows["teacher model, frozen (bf16 shards)"] == teacher.parameters * 2 / 8
    assert "EMA teacher (bf16 shards)" not in rows and alone["EMA teacher (bf16 shards)"] == student.parameters * 2 / 8
    assert rows["Adam moments"] == alone["Adam moments"] and rows["gradients"] == alone["gradients"]
    assert rows["FSDP root gathered: both models' embeddings and lm_heads"] == \
        (student.embedding_parameters + teacher.embedding_parameters) * 2
    assert rows["FSDP decoder layers in flight (2, prefetch)"] == 2 * teacher.layer_parameters * 2
    assert rows["teacher forward: prefix cache of the micro-batch"] == \
        8 * 2048 * teacher.layers * 2 * teacher.kv_width * 2
    assert rows["the whole model, read once and broadcast (main process)"] == teacher.parameters * 2  # one at a time


def test_a_served_teacher_leaves_only_its_top_k_in_the_trainer():
    """--teacher-server (issue 30): no teacher weights, root half, no teacher KV cache or hidden rows; the top
    20 of each completion token (int64 id + fp32 log-prob); a local --teacher-top-k keeps the teacher and adds
    the same top-k row."""
    student = Shape.of(shape_values("Qwen3-8B"))
    served = parts(Plan("Qwen3-8B", teacher_server=True, fsdp=True, gpus=8))
    alone = parts(Plan("Qwen3-8B", fsdp=True, gpus=8))
    assert served["teacher: served (vLLM, on GPUs or nodes of its own)"] == 0
    assert not any("EMA teacher" in name or "teacher forward" in name for name in served)
    assert served["FSDP root gathered: the student's embeddings and lm_head"] == student.embedding_parameters * 2
    tokens = 8 * 1024  # K x completion of one prompt
    assert served["teacher top 20: ids + log-probs of a micro-batch's completion tokens"] == tokens * 20 * 12
    assert served["final hidden rows (the student's)"] == tokens * 2 * student.hidden * 4
    assert alone["final hidden rows (both models)"] == tokens * 3 * student.hidden * 4
    assert served["Adam moments"] == alone["Adam moments"] and served["gradients"] == alone["gradients"]
    local = parts(Plan("Qwen3-8B", teacher_top_k=5))
    assert local["teacher top 5: ids + log-probs of a micro-batch's completion tokens"] == tokens * 5 * 12
    assert "EMA teacher (fp32)" in local


def test_fsdp_load_save_and_offload_rows():
    shape = Shape.of(shape_values("Qwen3-32B"))
    n = shape.parameters
    plan = Plan("Qwen3-32B", fsdp=True, gpus=8, optimizer_offload=True, teacher_dtype="bf16",
                gradient_checkpointing=True)
    main, other = estimate(plan), estimate(plan, main=False)
    main_rows = {r.name: r for r in main.rows}
    whole = main_rows["the whole model, read once and broadcast (main process)"]
    assert whole.bytes == n * 2 and whole.host and whole.phases == {"load"}  # bf16, host memory, at load only
    assert not any(r.name.startswith("the whole model") for r in other.rows)  # only the main process reads it
    assert main_rows["one whole tensor in flight (broadcast)"].bytes == 151_936 * 5120 * 2
    offloaded = [r for r in main.rows if "(in host memory)" in r.name]
    assert {r.name.split(" (")[0] for r in offloaded} == {"trained weights", "EMA teacher", "Adam moments", "gradients"}
    assert all(r.host for r in offloaded) and sum(r.bytes for r in offloaded) == n * (4 + 2 + 8 + 4) / 8
    assert main.host_peak == main.phase_peak("load", host=True) > other.host_peak  # the main process, loading
    assert main.phase_peak("save") - other.phase_peak("save") == shape.largest_tensor * 4  # one whole tensor
    assert main.peak < 141 * GIB  # the 32B config fits its GPUs


def test_cpu_processes_count_everything_as_resident_memory():
    plan = Plan("Qwen3-0.6B", device="cpu", gpus=2, fsdp=True, prompt_tokens=200, completion_tokens=8,
                num_generations=2, prompts_per_step=2)
    n = Shape.of(shape_values("Qwen3-0.6B")).parameters
    main, other = estimate(plan), estimate(plan, main=False)
    assert "CUDA context" not in parts(plan)
    assert other.phase_peak("load") == pytest.approx(0.45 * GIB + n * 8 / 2 + 151_936 * 1024 * 4)  # shards + 1 tensor
    assert main.phase_peak("load") >= 0.45 * GIB + n * 4  # the whole fp32 model, read once
    single = parts(dataclasses.replace(plan, gpus=1, fsdp=False))
    assert parts(plan, main=False)["trained weights (fp32 shards)"] == single["trained weights (fp32)"] / 2


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
    # the segments path (checkpointing or FSDP): tokens x layer inputs, the prefix's K/V repeated for each
    # completion (one recomputed layer with checkpointing, every layer without); no [T, T] term
    segments = parts(dataclasses.replace(base, shared_prefix=True, gradient_checkpointing=True))
    assert segments["student activations (saved for backward)"] == \
        1400 * (shape.hidden * shape.layers + shape.saved_per_token_layer()) * 2 + 4 * 1000 * 2 * shape.kv_width * 2
    sharded = parts(dataclasses.replace(base, shared_prefix=True, fsdp=True, gpus=2))
    assert sharded["student activations (saved for backward)"] == \
        1400 * shape.saved_per_token_layer() * 2 * shape.layers + 4 * 1000 * 2 * shape.kv_width * 2 * shape.layers


def test_largest_micro_batch_is_the_edge_of_fitting():
    plan = Plan("Qwen3-4B", gpu_memory_gib=80, prompts_per_step=16, gradient_checkpointing=True, teacher_dtype="bf16")
    most = largest_micro_batch(plan)
    assert 1 <= most < 16
    assert estimate(dataclasses.replace(plan, micro_batch_prompts=most)).peak <= 80 * GIB
    assert estimate(dataclasses.replace(plan, micro_batch_prompts=most + 1)).peak > 80 * GIB


def test_the_command(capsys):
    args = ["memory", "--model", "Qwen3-8B", "--gpus", "1", "--gpu-memory-gib", "141", "--max-prompt-length", "1024",
            "--max-completion-length", "1024", "--num-generations", "8", "--prompts-per-step", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Qwen3-8B: 8.19B parameters, 36 layers" in out and "DOES NOT FIT" in out
    assert "host memory per node (1 process(es))" in out
    assert "levers (peak with each alone):" in out and "--gradient-checkpointing true" in out
    assert main([*args, "--gradient-checkpointing", "--master-weights", "bf16", "--rollout-engine", "vllm",
                 "--teacher-dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert ": fits" in out and "largest micro-batch that fits:" in out
    assert main(["memory", "--model", "random:Qwen3-9B"]) == 2
    assert "Qwen3-9B: not a known size" in capsys.readouterr().err
    assert main(["memory", "--model", "Qwen3-8B", "--fsdp-cpu-offload", "true"]) == 2
    assert "it needs --fsdp true" in capsys.readouterr().err
    assert main(["memory", "--model", "Qwen3-32B", "--gpus", "8", "--fsdp", "--gpu-memory-gib", "141",
                 "--gradient-checkpointing", "--fsdp-cpu-offload", "true", "--teacher-dtype", "bf16",
                 "--host-memory-gib", "256", "--prompts-per-step", "32"]) == 0
    out = capsys.readouterr().out
    assert "the whole model, read once and broadcast (main process)" in out and "host memory per node (8" in out
    assert ": fits" in out and "of 256 GiB: DOES NOT FIT (host memory)" in out  # 8 offloading processes a node


def test_memory_plans_the_run_a_config_describes(capsys):
    """Issue 27 item 2: caopd memory takes --config and train's own flags, so a packaged config is planned as
    it is; every flag has a description; on CPU the budget is this machine's RAM."""
    import psutil

    from caopd.config import load_config

    assert main(["memory", "--config", "science-qwen3-8b-h200", "--gpu-memory-gib", "141"]) == 0
    out = capsys.readouterr().out
    config = load_config("science-qwen3-8b-h200", [])
    assert f"prompt {config.max_prompt_length} + completion {config.max_completion_length} tokens, " \
           f"K = {config.num_generations}, {config.micro_batch_prompts} prompt(s) a micro-batch" in out
    assert main(["memory", "--config", "science-qwen3-8b-h200", "--gpu-memory-gib", "141",
                 "--num-generations", "4"]) == 0
    assert "K = 4," in capsys.readouterr().out  # a flag over the config file, as in train
    assert main(["memory", "--config", "tiny", "--device", "cpu"]) == 0
    ram = psutil.virtual_memory().total / GIB
    assert f"GiB of {ram:g} GiB of RAM: fits" in capsys.readouterr().out
    assert main(["memory", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--config", "--gpus", "--gpu-memory-gib", "--host-memory-gib", "--processes-per-node", "--device",
                 "--fsdp-cpu-offload", "--shared-prefix", "--max-prompt-length", "--lora-r"):
        described = text.split(flag, 1)[1].split(" --", 1)[0]
        assert len(described.split()) > 2, flag  # its metavar and some words of description


@pytest.mark.parametrize("flags, message", [
    (["--gpu-memory-gib", "nan"], "--gpu-memory-gib must be a finite number > 0, got nan"),
    (["--gpu-memory-gib", "0"], "--gpu-memory-gib must be a finite number > 0"),
    (["--gpu-memory-gib", "-5"], "--gpu-memory-gib must be a finite number > 0"),
    (["--lora-r", "-3"], "config field 'lora_r' must be >= 0, got -3"),
    (["--vllm-gpu-memory-utilization", "5"], "config field 'vllm_gpu_memory_utilization' must be in [0.0, 1.0]"),
    (["--vllm-gpu-memory-utilization", "-1"], "config field 'vllm_gpu_memory_utilization' must be in [0.0, 1.0]"),
    (["--num-generations", str(10**12)], "config field 'num_generations' must be <= 1024"),
    (["--host-memory-gib", "inf"], "--host-memory-gib must be a finite number > 0"),
])
def test_memory_arguments_are_one_line(capsys, flags, message):
    """Issue 26 item 9: these printed impossible tables (nan: both DOES NOT FIT and a largest micro-batch)."""
    assert main(["memory", "--model", "Qwen3-8B", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_config_missing_a_field_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64}))
    assert main(["memory", "--model", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "field 'intermediate_size' must be a positive integer, got 'nothing'" in err and "\n" not in err


def test_a_model_larger_than_the_machine_is_refused_before_it_is_built(tmp_path, capsys):
    """Issue 26 item 6: 10^16 parameters tried to allocate, then a traceback (or the OOM killer)."""
    from caopd.errors import InputError
    from caopd.modeling.memory import check_weights_fit

    config = {"model_type": "qwen3", "vocab_size": 151_936, "hidden_size": 1 << 20, "intermediate_size": 1 << 22,
              "num_hidden_layers": 1000, "num_attention_heads": 8192, "num_key_value_heads": 8, "head_dim": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = f"random:{tmp_path / 'config.json'}"
    assert main(["train", "--model", model, "--tokenizer", "fast", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "B parameters, whose weights alone take" in err and "GiB is available" in err and "\n" not in err
    assert f"caopd memory --model {model}" in err and "--force skips this check" in err
    small = "random:Qwen3-0.6B"
    need = Shape.of(shape_values("Qwen3-0.6B")).parameters * 8  # fp32 student and teacher
    check_weights_fit(small, 8, 1, cuda=False, available=need + 1)  # just fits
    with pytest.raises(InputError, match="0.596B parameters, whose weights alone take 4.4 GiB on this machine"):
        check_weights_fit(small, 8, 1, cuda=False, available=need - 1)  # just over: refused
    check_weights_fit(small, 8, 8, cuda=True, available=need // 8 + 1)  # 8 GPUs: a shard each
    check_weights_fit("Qwen/unknown-hub-model", 8, 1, cuda=False, available=0)  # not known before a download
