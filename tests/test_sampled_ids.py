"""The loss trains on the token ids that were sampled (issue 24, item 1), not a re-tokenization of the text.

A scripted engine samples ids that spell its text one character at a time, where the tokenizer
would merge characters into longer tokens: the trained sequence keeps those ids for the
completion's body, and only the replaced confidence line is tokenized anew. Every engine returns
its sampled ids with the text.

Deliberate bugs these catch: the body re-tokenized from its text (the merged ids appear), the
sampled ids kept through the old confidence line (its stale value is trained on), the end-of-sequence
id kept inside the sampled ids (EOS twice), an engine that drops the ids (None).
"""
from __future__ import annotations

import random

import torch

from caopd.engines.base import Completion, SamplingParams, ScriptedEngine
from caopd.engines.hf import TransformersEngine
from caopd.inputs.data import load_examples
from caopd.modeling.models import load_model, load_tokenizer
from caopd.scoring.calibration import RolloutGroup, build_targets
from caopd.training.loss import completion_ids
from caopd.training.trainer import train
from tests.test_trainer import config_for, subset


def char_ids(tokenizer, text: str) -> list[int]:
    """``text`` as one id per character (a valid sampling, never the tokenizer's own merges)."""
    return [i for c in text for i in tokenizer(c, add_special_tokens=False).input_ids]


def test_the_body_keeps_its_sampled_ids_and_only_the_confidence_line_is_new(science_rows_path):
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    (example,) = load_examples(science_rows_path, "science")[:1]
    body = "The answer is <answer>B</answer>"
    text = body + "\nConfidence: 0.97"
    sampled = char_ids(tokenizer, text)
    assert sampled != tokenizer(text, add_special_tokens=False).input_ids  # the tokenizer merges characters
    group = RolloutGroup(example, [Completion(text, sampled)], [True])
    (caopd,) = build_targets(group, "science", "demo", True, random.Random(0))
    new_line = tokenizer("\nConfidence: 1.00", add_special_tokens=False).input_ids
    assert completion_ids(tokenizer, caopd, 200) == char_ids(tokenizer, body) + new_line + [tokenizer.eos_token_id]
    (opd,) = build_targets(group, "science", "demo", False, random.Random(0))  # kept as sampled, whole
    assert completion_ids(tokenizer, opd, 200) == sampled + [tokenizer.eos_token_id]
    truncated = completion_ids(tokenizer, caopd, 10)  # the body is cut, the new line kept whole
    assert truncated == char_ids(tokenizer, body)[:10 - len(new_line) - 1] + new_line + [tokenizer.eos_token_id]
    middle = "Confidence: 0.9\n" + body  # a statement removed from the start: the rest tokenized anew
    (edited,) = build_targets(RolloutGroup(example, [Completion(middle, char_ids(tokenizer, middle))], [True]),
                              "science", "demo", True, random.Random(0))
    assert completion_ids(tokenizer, edited, 200)[:-len(new_line) - 1] == \
        tokenizer(body, add_special_tokens=False).input_ids
    plain = build_targets(RolloutGroup(example, [text], [True]), "science", "demo", True, random.Random(0))[0]
    assert completion_ids(tokenizer, plain, 200)[:-len(new_line) - 1] == \
        tokenizer(body, add_special_tokens=False).input_ids  # text without ids: tokenized, as before


def test_the_trainer_trains_on_the_sampled_ids(science_rows_path, tmp_path, monkeypatch):
    data, examples = subset(science_rows_path, "science", tmp_path)
    out = tmp_path / "run"
    import caopd.training.trainer as trainer_module

    trained = []
    build = trainer_module.make_shared_batch

    def recording(tokenizer, targets, *args, **kwargs):
        batch = build(tokenizer, targets, *args, **kwargs)
        trained.extend(c for group in batch.completions for c in group)
        return batch
    monkeypatch.setattr(trainer_module, "make_shared_batch", recording)
    texts = []

    def script(_, ids, n):
        tokenizer = load_tokenizer("tiny-qwen3", str(out / "tokenizer"))
        completions = [f"step {k} <answer>A</answer>\nConfidence: 0.9" for k in range(n)]
        texts.extend(completions)
        return [Completion(c, char_ids(tokenizer, c)) for c in completions]
    train(config_for(data, "science", out, max_steps=1), engine=ScriptedEngine(script), quiet=True)
    tokenizer = load_tokenizer("tiny-qwen3", str(out / "tokenizer"))
    assert len(trained) == len(texts) == 12
    for ids, text in zip(trained, texts):
        body = text.removesuffix("\nConfidence: 0.9")
        assert ids[:len(char_ids(tokenizer, body))] == char_ids(tokenizer, body)


def test_the_transformers_engine_returns_its_sampled_ids():
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    model = load_model("tiny-qwen3", tokenizer, seed=0)
    engine = TransformersEngine(model, tokenizer)
    prompt = tokenizer("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False).input_ids
    (completions,) = engine.generate([prompt], 3, SamplingParams(temperature=1.0, max_tokens=12, seed=4))
    for completion in completions:
        assert completion.token_ids is not None and tokenizer.eos_token_id not in completion.token_ids
        assert len(completion.token_ids) <= 12
        assert tokenizer.decode(list(completion.token_ids), skip_special_tokens=True) == completion
    with torch.random.fork_rng():
        again = engine.generate([prompt], 3, SamplingParams(temperature=1.0, max_tokens=12, seed=4))[0]
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]
