"""The loss's inputs: completion tokens (the confidence line and EOS survive truncation) and the
per-token weights (average per sequence, then over sequences, first tokens skipped).

Deliberate bugs these catch (issue 12): ``completion_ids`` cutting the confidence line and EOS of a
truncated completion; ``token_weights`` averaging over all tokens instead of per sequence.
"""
from __future__ import annotations

import pytest

from caopd.inputs.data import Example
from caopd.modeling.models import load_tokenizer
from caopd.scoring.calibration import DistillationTarget
from caopd.training.loss import DistillationBatch, completion_ids, token_weights

EXAMPLE = Example(0, "What is 2 + 2?", "B", None, "test")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-qwen3", "fast")


def target(completion: str, confidence_line: str | None) -> DistillationTarget:
    return DistillationTarget(EXAMPLE, completion, confidence_line, [], 0.5, False)


def test_a_truncated_completion_keeps_its_confidence_line_and_eos(tokenizer):
    body = tokenizer("The sum of two and two is four. " * 20, add_special_tokens=False).input_ids
    tail = tokenizer("\nConfidence: 0.50", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = completion_ids(tokenizer, target("The sum of two and two is four. " * 20, "Confidence: 0.50"), 20)
    assert len(ids) == 20 and len(body) > 20
    assert ids == body[:20 - len(tail)] + tail
    assert tokenizer.decode(ids).endswith("\nConfidence: 0.50<|im_end|>")


def test_a_short_completion_is_whole(tokenizer):
    ids = completion_ids(tokenizer, target("<answer>B</answer>", "Confidence: 0.25"), 100)
    assert tokenizer.decode(ids) == "<answer>B</answer>\nConfidence: 0.25<|im_end|>"
    plain = completion_ids(tokenizer, target("<answer>B</answer>\nConfidence: 0.9", None), 100)
    assert tokenizer.decode(plain) == "<answer>B</answer>\nConfidence: 0.9<|im_end|>"  # OPD: kept as sampled


def test_the_confidence_line_is_never_cut_even_past_the_limit(tokenizer):
    ids = completion_ids(tokenizer, target("long body " * 10, "Confidence: 0.75"), 3)
    assert tokenizer.decode(ids) == "\nConfidence: 0.75<|im_end|>"


def test_token_weights_average_per_sequence_then_over_sequences():
    batch = DistillationBatch(None, None, None, None, [0, 0, 0], [0, 0, 0], length=[5, 3, 2])
    weights = token_weights(batch, skip_tokens=2).tolist()
    # counted tokens: 3, 1, 0 -> two sequences count; each sequence's weights sum to 1/2
    assert weights == pytest.approx([0, 0, 1 / 6, 1 / 6, 1 / 6, 0, 0, 1 / 2, 0, 0])
