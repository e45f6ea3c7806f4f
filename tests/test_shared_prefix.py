"""Shared-prefix and packed forwards (issues 14, 25): the loss and every gradient equal the padded
path's (one row per completion), on tiny-qwen3 in fp32, by every layout (prefix cache, segments
with gradient checkpointing too, the dense 4-D mask, packed); the teacher's hidden states by the
cache, segments (SDPA and flex_attention kernels) and the mask. Under 2-process FSDP the segments
path trains what one process trains (tests/test_distributed.py).

Deliberate bugs these catch: a mask or block mask that lets a completion see another completion
(test_a_leaky_mask_is_caught); segments whose completions miss the prefix or see padded keys;
packed position ids that do not restart per sequence (then the sequences attend to each other:
test_packed_layout_equals_padded); a layout rule that shares where the model cannot, or that
picks the dense mask (test_choose_layout); sharing with one completion a prompt (test_sharing_pays).
"""
from __future__ import annotations

import random

import pytest
import torch

import caopd.training.shared_prefix as shared_prefix
from caopd.inputs.data import load_examples
from caopd.inputs.prompts import student_messages
from caopd.modeling.models import load_model, load_tokenizer
from caopd.scoring.calibration import DistillationTarget, RolloutGroup, build_targets
from caopd.training.loss import (
    chat_ids,
    completion_ids,
    confidence_span,
    distillation_loss,
    fused_loss,
    make_batch,
    span_mask,
)
from caopd.training.segment_attention import RowSegments, use_segment_attention
from caopd.training.shared_prefix import (
    LayerCost,
    choose_layout,
    completion_mask,
    make_shared_batch,
    shared_distillation_loss,
    sharing_pays,
)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    student, teacher = load_model("tiny-qwen3", tokenizer, seed=1), load_model("tiny-qwen3", tokenizer, seed=2)
    for model in (student, teacher):  # the segments path's attention; every other call is the model's SDPA
        use_segment_attention(model)
    return tokenizer, student, teacher


def test_completion_mask():
    # prefix of 2, completions of 2 and 1 tokens
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(completion_mask(2, [2, 1]), expected)


def targets_for(science_rows_path, tokenizer, k_per_prompt, seed=0, fallback_split=False):
    """Targets of several prompts (different lengths), K ragged completions each, and their prompt ids."""
    rng = random.Random(seed)
    examples = load_examples(science_rows_path, "science")[:len(k_per_prompt)]
    targets, prompts = [], []
    words = ["the", "sum", "is", "<answer>", "B", "</answer>", "so", "maybe", "C", "because"]
    for example, k in zip(examples, k_per_prompt):
        completions = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(k)]
        group = RolloutGroup(example, completions, [rng.random() < 0.5 for _ in range(k)])
        built = build_targets(group, "science", "demo", calibrate=True, rng=random.Random(seed))
        if fallback_split and k > 1:  # one completion with a teacher context of its own
            t = built[1]
            built[1] = DistillationTarget(t.example, t.completion, t.confidence_line,
                                          [dict(m) for m in t.teacher_messages], t.p_acc, True)
        prompt = chat_ids(tokenizer, student_messages(example))
        targets += built
        prompts += [prompt] * k
    return targets, prompts


def loss_and_grads(loss_fn, student, teacher, batch, **kw):
    student.zero_grad()
    result = loss_fn(student, teacher, batch, skip_tokens=2, temperature=0.9, impl="torch", **kw)
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("path, teacher_path, checkpointing", [("cache", "cache", False), ("mask", "mask", False),
                                                                 ("segments", "cache", False),
                                                                 ("segments", "segments", True)])
@pytest.mark.parametrize("k_per_prompt, fallback_split", [([1], False), ([4, 4], False), ([8, 3, 1], False),
                                                           ([4, 2], True)])
def test_loss_and_every_gradient_equal_the_padded_path(tiny, science_rows_path, k_per_prompt, fallback_split, path,
                                                       teacher_path, checkpointing):
    tokenizer, student, teacher = tiny
    if checkpointing:
        student.gradient_checkpointing_enable()  # the segments' layout reaches the recomputed layers too
    else:
        student.gradient_checkpointing_disable()
    targets, prompts = targets_for(science_rows_path, tokenizer, k_per_prompt, fallback_split=fallback_split)
    padded = make_batch(tokenizer, targets, prompts, 256, 40)
    shared = make_shared_batch(tokenizer, targets, prompts, 256, 40)
    assert shared.length == padded.length and (len(set(padded.length)) > 1 or len(targets) == 1)  # ragged
    unshared = shared.unshared()  # the fallback where sharing does not pay: make_batch's batch, no new tokenizing
    for name in ("student_ids", "student_attention", "teacher_ids", "teacher_attention"):
        assert torch.equal(getattr(unshared, name), getattr(padded, name)), name
    assert (unshared.student_start, unshared.teacher_start) == (padded.student_start, padded.teacher_start)
    # a completion with a teacher context of its own splits its prompt's run: [0] [1] [2, 3] and [0] [1]
    assert shared.groups == (5 if fallback_split else len(k_per_prompt))
    expected, expected_grads = loss_and_grads(distillation_loss, student, teacher, padded)
    ours, grads = loss_and_grads(shared_distillation_loss, student, teacher, shared, path=path,
                                 teacher_path=teacher_path)
    student.gradient_checkpointing_disable()
    assert ours.counted_tokens == expected.counted_tokens
    assert torch.allclose(ours.loss, expected.loss, rtol=1e-5, atol=1e-7), (float(ours.loss), float(expected.loss))
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), name
    # fewer tokens through the models: each prefix once per group instead of once per completion
    assert shared.student.ids.numel() < padded.student_ids.numel() or len(targets) == 1


def test_teacher_hidden_states_equal_the_padded_path(tiny, science_rows_path):
    tokenizer, _, teacher = tiny
    targets, prompts = targets_for(science_rows_path, tokenizer, [4, 2], seed=3)
    padded = make_batch(tokenizer, targets, prompts, 256, 40)
    shared = make_shared_batch(tokenizer, targets, prompts, 256, 40)
    cpu = torch.device("cpu")
    with torch.no_grad():
        rows = shared_prefix._hidden_rows(teacher, shared.teacher, cpu)
        cached = shared_prefix._hidden_rows_cached(teacher, shared.teacher_groups, cpu)
        segments = shared_prefix._hidden_rows_segments(teacher, shared.teacher, cpu, "sdpa")
        flex = shared_prefix._hidden_rows_segments(teacher, shared.teacher, cpu, "flex")  # compiled: forward only
        hidden = teacher.model(input_ids=padded.teacher_ids, attention_mask=padded.teacher_attention,
                               use_cache=False).last_hidden_state
    expected = torch.cat([hidden[b, s - 1:s - 1 + n] for b, (s, n) in enumerate(zip(padded.teacher_start,
                                                                                    padded.length))])
    for name, ours in (("mask", rows), ("cache", cached), ("segments", segments), ("flex", flex)):
        assert torch.allclose(ours, expected, atol=1e-5), name


def test_a_leaky_mask_is_caught(tiny, science_rows_path, monkeypatch):
    import caopd.training.segment_attention as segment_attention

    tokenizer, student, teacher = tiny
    targets, prompts = targets_for(science_rows_path, tokenizer, [4])
    expected = distillation_loss(student, teacher, make_batch(tokenizer, targets, prompts, 256, 40), impl="torch")
    monkeypatch.setattr(shared_prefix, "dense_mask",  # a completion may see the completions before it
                        lambda segments: torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril_()
                        .expand(segments.shape[0], -1, -1))
    leaky = shared_distillation_loss(student, teacher, make_shared_batch(tokenizer, targets, prompts, 256, 40),
                                     impl="torch", path="mask", teacher_path="mask")
    assert not torch.allclose(leaky.loss, expected.loss, rtol=1e-3)
    monkeypatch.undo()
    # the same leak in flex_attention's block mask: the teacher's rows move away from the padded path's
    shared = make_shared_batch(tokenizer, targets, prompts, 256, 40)
    with torch.no_grad():
        exact = shared_prefix._hidden_rows_segments(teacher, shared.teacher, torch.device("cpu"), "sdpa")
        monkeypatch.setattr(segment_attention, "block_mask_mod", lambda segments: lambda b, h, q, kv: kv <= q)
        shared = make_shared_batch(tokenizer, targets, prompts, 256, 40)  # a new layout: no cached block mask
        leaked = shared_prefix._hidden_rows_segments(teacher, shared.teacher, torch.device("cpu"), "flex")
    assert not torch.allclose(leaked, exact, atol=1e-3)


def test_tiny_training_gives_the_same_losses_with_and_without_shared_prefixes(tmp_path, capsys, monkeypatch):
    import caopd.training.trainer as trainer_module
    from caopd.cli import main

    built = []
    monkeypatch.setattr(trainer_module, "make_shared_batch",
                        lambda *args, **kwargs: built.append(1) or make_shared_batch(*args, **kwargs))
    losses = {}
    for shared in ("true", "false"):
        out = tmp_path / shared
        assert main(["train", "--config", "tiny", "--output-dir", str(out), "--shared-prefix", shared,
                     "--max-steps", "3", "--num-generations", "4", "--max-completion-length", "24"]) == 0
        losses[shared] = [__import__("json").loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4) and len(losses["true"]) == 3
    assert len(built) == 3  # one micro-batch a step took the shared path (tiny: all 4 prompts in one)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", "--output-dir", str(tmp_path / "eager"), "--shared-prefix", "true",
                 "--attn-implementation", "eager", "--gradient-checkpointing", "true", "--max-steps", "1",
                 "--num-generations", "2", "--max-completion-length", "8"]) == 0
    out = capsys.readouterr()
    assert "forward layout shared-segments (teacher: cache)," in out.out  # any attention, checkpointing on
    assert main(["train", "--config", "tiny", "--output-dir", str(tmp_path / "one"), "--shared-prefix", "true",
                 "--max-steps", "2", "--train-rollouts", "1", "--max-completion-length", "8"]) == 0
    assert capsys.readouterr().err.count("sharing saves nothing") == 1  # one trained completion a prompt: said once


def test_sharing_pays():
    from transformers import Qwen3Config

    config = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=128)  # Qwen3-0.6B's widths, as benchmarks/forward_sharing.py
    cost = LayerCost.of(config, torch.device("cpu"))
    assert cost.token == 1024 * (2 * 2048 + 2 * 1024) + 3 * 1024 * 3072 and cost.pair == 2 * 2048 * 3
    assert LayerCost.of(config, torch.device("cuda")).pair == 2 * 2048 * 1.5
    assert not sharing_pays([RowSegments(200, (40,))], cost)  # one completion: nothing to share
    assert sharing_pays([RowSegments(1024, (256,) * 8)], cost)  # tool-use-like: prompts long
    # science-like: 0.83x the tokens, but the sdpa kernel computes each completion's whole block (measured
    # 1.08x the padded models' time on CPU); kernels that skip masked blocks (flex, flash) share
    assert not sharing_pays([RowSegments(256, (1024,) * 8)], cost)
    assert sharing_pays([RowSegments(256, (1024,) * 8)], cost, "flex")
    assert not sharing_pays([RowSegments(8, (1024,) * 8)], cost, "flash")  # prompts much shorter than completions
    assert sharing_pays([RowSegments(8, (1024,) * 8), RowSegments(1024, (256,) * 8)], cost)  # the micro-batch
    # padded rows are as wide as the micro-batch's widest: a short prompt beside a long one shares
    assert sharing_pays([RowSegments(64, (128,) * 4), RowSegments(900, (100,) * 4)], cost)
    # the cache path's two calls a prompt: nothing for Qwen3-0.6B, most of a tiny model's step (the demo's
    # tiny-qwen3, 16 prompts of 61 tokens with 2 completions of 18: measured 0.37 s shared vs 0.18 s padded)
    demo = [RowSegments(61, (18, 18))] * 16
    assert sharing_pays(demo, cost, calls_per_row=2)
    tiny = LayerCost.of(Qwen3Config(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16), torch.device("cpu"))
    assert sharing_pays(demo, tiny) and not sharing_pays(demo, tiny, calls_per_row=2)
    assert sharing_pays([RowSegments(1024, (256,) * 8)] * 16, tiny, calls_per_row=2)  # long shared prompts still do


@pytest.mark.parametrize("k_per_prompt", [[1], [8, 3, 1]])
def test_packed_layout_equals_padded(tiny, science_rows_path, k_per_prompt):
    tokenizer, student, teacher = tiny
    targets, prompts = targets_for(science_rows_path, tokenizer, k_per_prompt)
    batch = make_batch(tokenizer, targets, prompts, 256, 40)
    assert int(batch.student_attention.sum()) < batch.student_attention.numel() or len(targets) == 1  # has pads
    expected, expected_grads = loss_and_grads(distillation_loss, student, teacher, batch)
    ours, grads = loss_and_grads(distillation_loss, student, teacher, batch, layout="packed")
    assert torch.allclose(ours.loss, expected.loss, rtol=1e-5, atol=1e-7), (float(ours.loss), float(expected.loss))
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max())), name
    with pytest.raises(ValueError, match="layout must be padded or packed"):
        distillation_loss(student, teacher, batch, layout="shared")


@pytest.mark.parametrize("shared, attn, model_type, checkpointing, fsdp, layout, says", [
    (False, "sdpa", "qwen3", False, False, "padded", None),
    (False, "flash_attention_2", "qwen3", False, False, "packed", None),  # varlen: no pads
    (True, "sdpa", "qwen3", False, False, "shared-cache", None),
    (True, "eager", "qwen3", False, False, "shared-cache", None),  # a 2-D mask over cached keys: any attention
    (True, "flash_attention_2", "llama", False, False, "shared-cache", None),
    (True, "sdpa", "qwen3", True, False, "shared-segments (teacher: cache)", None),  # checkpointing: no cache
    (True, "eager", "qwen3", True, False, "shared-segments (teacher: cache)", None),  # any base attention
    (True, "flash_attention_2", "qwen3", True, False, "shared-segments (teacher: cache)", None),
    (True, "sdpa", "qwen3", False, True, "shared-segments", None),  # FSDP: one forward a side, both models
    (True, "sdpa", "gpt2", False, False, "padded", "not supported for model type 'gpt2'"),
])
def test_choose_layout(shared, attn, model_type, checkpointing, fsdp, layout, says):
    chosen, why = choose_layout(shared, attn, model_type, checkpointing, fsdp)
    assert str(chosen) == layout and "mask" not in (chosen.student, chosen.teacher)
    assert (why is None) if says is None else (says in why and layout in why)


@pytest.mark.parametrize("device, flash_attn, kernel", [("cpu", True, "sdpa"), ("cuda", True, "flash"),
                                                        ("cuda", False, "flex")])
def test_default_kernel(device, flash_attn, kernel, monkeypatch):
    import importlib.util

    from caopd.training.segment_attention import default_kernel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if flash_attn else None) if name == "flash_attn" else real(name, *a))
    assert default_kernel(torch.device(device)) == kernel


def test_the_confidence_span_is_the_statement_and_the_end_of_sequence(tiny, science_rows_path):
    tokenizer, _, _ = tiny
    example = load_examples(science_rows_path, "science")[0]
    sampled = ["<answer>B</answer>\nConfidence: 0.98", "<answer>B</answer> and no statement"]
    group = RolloutGroup(example, sampled, [True, False])
    line = len(tokenizer("\nConfidence: 0.50", add_special_tokens=False).input_ids)
    for calibrate in (True, False):  # CaOPD's appended line; OPD's statement as sampled (0 without one)
        targets = build_targets(group, "science", "demo", calibrate=calibrate, rng=random.Random(0))
        ids = [make_batch(tokenizer, [t], [[1, 2]], 256, 40).length[0] for t in targets]
        spans = [confidence_span(tokenizer, t, completion_ids(tokenizer, t, 40)) for t in targets]
        assert spans == ([line + 1] * 2 if calibrate else [len(tokenizer("\nConfidence: 0.98",
                                                                         add_special_tokens=False).input_ids) + 1, 0])
        assert all(0 <= s <= n for s, n in zip(spans, ids))
    assert span_mask([3, 2], [1, 0]).tolist() == [False, False, True, False, False]


def test_the_confidence_divergence_applies_to_the_span_tokens_only(tiny, science_rows_path):
    """reverse KL on the body, forward KL on the span, against logits written out; both layouts agree."""
    tokenizer, student, teacher = tiny
    torch.manual_seed(0)
    hidden = student.config.hidden_size
    s_rows, t_rows = torch.randn(7, hidden), torch.randn(7, hidden)
    weights = torch.rand(7)
    span = torch.tensor([False, False, True, True, False, False, True])
    out = fused_loss(student, teacher, s_rows, t_rows, weights, divergence="reverse", beta=0.5, temperature=1.0,
                     impl="torch", span=span, span_divergence="forward")
    with torch.no_grad():
        log_s = (s_rows @ student.get_output_embeddings().weight.T).log_softmax(-1)
        log_t = (t_rows @ teacher.get_output_embeddings().weight.T).log_softmax(-1)
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1)
    expected = (weights * torch.where(span, forward, reverse)).sum()
    assert torch.allclose(out.loss, expected, rtol=1e-5) and out.counted_tokens == 7
    same = fused_loss(student, teacher, s_rows, t_rows, weights, divergence="reverse", beta=0.5, temperature=1.0,
                      impl="torch", span=span, span_divergence="same")
    assert torch.allclose(same.loss, (weights * reverse).sum(), rtol=1e-5)
    targets, prompts = targets_for(science_rows_path, tokenizer, [4, 2])
    padded = make_batch(tokenizer, targets, prompts, 256, 40, spans=True)
    shared = make_shared_batch(tokenizer, targets, prompts, 256, 40, spans=True)
    assert shared.span == padded.span and all(s > 1 for s in padded.span)
    kw = dict(confidence_divergence="forward")
    expected, expected_grads = loss_and_grads(distillation_loss, student, teacher, padded, **kw)
    plain, _ = loss_and_grads(distillation_loss, student, teacher, padded)
    ours, grads = loss_and_grads(shared_distillation_loss, student, teacher, shared, path="cache", **kw)
    assert torch.allclose(ours.loss, expected.loss, rtol=1e-5) and not torch.allclose(plain.loss, expected.loss)
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max())), name
