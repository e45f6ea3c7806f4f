"""Shared-prefix and packed forwards (issue 14): the loss and every gradient equal the padded
path's (one row per completion), on tiny-qwen3 in fp32, by every layout (prefix cache, 4-D mask,
packed).

Deliberate bugs these catch: a mask that lets a completion see another completion
(test_a_leaky_mask_is_caught); packed position ids that do not restart per sequence (then the
sequences attend to each other: test_packed_layout_equals_padded); a layout rule that shares where
the model or the attention implementation cannot (test_choose_layout).
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
from caopd.training.loss import chat_ids, distillation_loss, make_batch
from caopd.training.shared_prefix import choose_layout, completion_mask, make_shared_batch, shared_distillation_loss


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    return tokenizer, load_model("tiny-qwen3", tokenizer, seed=1), load_model("tiny-qwen3", tokenizer, seed=2)


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


@pytest.mark.parametrize("path", ["cache", "mask"])
@pytest.mark.parametrize("k_per_prompt, fallback_split", [([1], False), ([4, 4], False), ([8, 3, 1], False),
                                                           ([4, 2], True)])
def test_loss_and_every_gradient_equal_the_padded_path(tiny, science_rows_path, k_per_prompt, fallback_split, path):
    tokenizer, student, teacher = tiny
    targets, prompts = targets_for(science_rows_path, tokenizer, k_per_prompt, fallback_split=fallback_split)
    padded = make_batch(tokenizer, targets, prompts, 256, 40)
    shared = make_shared_batch(tokenizer, targets, prompts, 256, 40)
    assert shared.length == padded.length and (len(set(padded.length)) > 1 or len(targets) == 1)  # ragged
    # a completion with a teacher context of its own splits its prompt's run: [0] [1] [2, 3] and [0] [1]
    assert shared.groups == (5 if fallback_split else len(k_per_prompt))
    expected, expected_grads = loss_and_grads(distillation_loss, student, teacher, padded)
    ours, grads = loss_and_grads(shared_distillation_loss, student, teacher, shared, path=path)
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
    with torch.no_grad():
        rows = shared_prefix._hidden_rows(teacher, shared.teacher, torch.device("cpu"))
        cached = shared_prefix._hidden_rows_cached(teacher, shared.teacher_groups, torch.device("cpu"))
        hidden = teacher.model(input_ids=padded.teacher_ids, attention_mask=padded.teacher_attention,
                               use_cache=False).last_hidden_state
    expected = torch.cat([hidden[b, s - 1:s - 1 + n] for b, (s, n) in enumerate(zip(padded.teacher_start,
                                                                                    padded.length))])
    assert torch.allclose(rows, expected, atol=1e-5) and torch.allclose(cached, expected, atol=1e-5)


def test_a_leaky_mask_is_caught(tiny, science_rows_path, monkeypatch):
    tokenizer, student, teacher = tiny
    targets, prompts = targets_for(science_rows_path, tokenizer, [4])
    expected = distillation_loss(student, teacher, make_batch(tokenizer, targets, prompts, 256, 40), impl="torch")
    monkeypatch.setattr(shared_prefix, "completion_mask",  # a completion may see the completions before it
                        lambda prefix, lengths: torch.ones(prefix + sum(lengths), prefix + sum(lengths),
                                                           dtype=torch.bool).tril_())
    leaky = shared_distillation_loss(student, teacher, make_shared_batch(tokenizer, targets, prompts, 256, 40),
                                     impl="torch", path="mask")
    assert not torch.allclose(leaky.loss, expected.loss, rtol=1e-3)


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
    assert "needs attn_implementation sdpa (a 4-D attention mask" in out.err
    assert '"forward_layout": "padded"' in out.out


def test_with_gradient_checkpointing_the_student_takes_the_mask_path(science_rows_path, monkeypatch):
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    student, teacher = load_model("tiny-qwen3", tokenizer, seed=1), load_model("tiny-qwen3", tokenizer, seed=2)
    student.gradient_checkpointing_enable()  # transformers turns the KV cache off under it
    targets, prompts = targets_for(science_rows_path, tokenizer, [3, 2])
    padded = distillation_loss(student, teacher, make_batch(tokenizer, targets, prompts, 256, 40), impl="torch")
    used = []
    mask_rows = shared_prefix._hidden_rows
    monkeypatch.setattr(shared_prefix, "_hidden_rows", lambda *a: used.append("mask") or mask_rows(*a))
    ours = shared_distillation_loss(student, teacher, make_shared_batch(tokenizer, targets, prompts, 256, 40),
                                    impl="torch")
    assert used == ["mask"] and torch.allclose(ours.loss, padded.loss, rtol=1e-5)


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


@pytest.mark.parametrize("shared, attn, model_type, checkpointing, layout, says", [
    (False, "sdpa", "qwen3", False, "padded", None),
    (False, "flash_attention_2", "qwen3", False, "packed", None),  # varlen: no pads
    (True, "sdpa", "qwen3", False, "shared-cache", None),
    (True, "eager", "qwen3", False, "shared-cache", None),  # a 2-D mask over cached keys: any attention
    (True, "flash_attention_2", "llama", False, "shared-cache", None),
    (True, "sdpa", "qwen3", True, "shared-mask", None),  # checkpointing turns the cache off
    (True, "eager", "qwen3", True, "padded", "needs attn_implementation sdpa"),  # eager adds a bool mask
    (True, "flash_attention_2", "qwen3", True, "packed", "needs attn_implementation sdpa"),
    (True, "sdpa", "gpt2", False, "padded", "not supported for model type 'gpt2'"),
])
def test_choose_layout(shared, attn, model_type, checkpointing, layout, says):
    chosen, why = choose_layout(shared, attn, model_type, checkpointing)
    assert chosen == layout
    assert (why is None) if says is None else (says in why and layout in why)
