"""Model output is hostile text: every parser is linear in it and no verifier raises on it.

Regression tests of issue 11 (items 6 and 7). The time limits are guards against hangs, not
benchmarks: the patterns these replaced took cubic (confidence lines) or quadratic (unclosed
answer tags) time, minutes to hours on these inputs; the scans here take milliseconds.
"""
from __future__ import annotations

import random
import re

import pytest

from caopd.evaluation.evaluate import Completion, score_completions, summarize
from caopd.inputs.data import Example
from caopd.scoring.calibration import build_targets, verify_rollouts
from caopd.scoring.confidence import parse_confidence, strip_confidence
from caopd.scoring.verifiers import (
    WRONG_REASONS,
    ToolCallError,
    check_science,
    check_tooluse,
    last_answer,
    parse_tool_call,
    same_json,
)
from tests.conftest import deadline

N = 10**5
JUNK_PIECES = ["Confidence", "confidence", ":", "=", " ", " ", "\t", "*", "**", "<confidence>", "</confidence>", "%",
               "<answer>", "</answer>", "Action:", "Action Input:", "[", "{", "\"", "9", ".", "\n", "x", "é", "-"]


def junk(length: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    pieces, size = [], 0
    while size < length:
        piece = rng.choice(JUNK_PIECES)
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


HOSTILE = {
    "spaces": " " * N,
    "confidence then spaces": "Confidence" + " " * N,
    "spaces and stars around the colon": "**Confidence" + " *\t" * N + ":" + " *" * N + "x",
    "spaces inside a tag": "<confidence>0.5" + " " * N + "x",
    "unclosed confidence tags": "<confidence> 1" * N,
    "unclosed answer tags": "<answer>B " * N,
    "repeated action lines": "Action: f Action Input: " * N,
    "a million digits": "Confidence: " + "9" * 10**6,
    "a million characters of mixed junk": junk(10**6),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_every_parser_is_linear_on_hostile_text(name):
    text = HOSTILE[name]
    with deadline(2.0):
        parse_confidence(text)
        strip_confidence(text)
        assert check_science(text, "B").reason in (None, *WRONG_REASONS)
        assert check_tooluse(text, [{"Action": "f", "Action_Input": "{}"}]).reason in (None, *WRONG_REASONS)


def test_hostile_rollouts_go_through_verify_and_targets():
    example = Example(0, "What is 1 + 1?", "B", "<answer>B</answer>", "test")
    group = verify_rollouts(example, list(HOSTILE.values()), "science")
    with deadline(5.0):
        targets = build_targets(group, "science", "demo", calibrate=True, rng=random.Random(0))
    assert len(targets) == len(HOSTILE) and all("Confidence" not in t.confidence_line[1:] for t in targets)


def test_parsed_values_survive_the_rewrite():
    assert parse_confidence("Confidence" + " " * N + ": 0.4").value == 0.4
    assert parse_confidence("<confidence>  55 %  </confidence>").value == 0.55
    assert parse_confidence("Confidence: " + "9" * 10**6).clipped
    assert strip_confidence("a\n" + " " * N + "**Confidence:** 0.9\nb") == "a\nb"
    assert strip_confidence("a <confidence>0.2</confidence> b <confidence>0.3") == "a b <confidence>0.3"


_OLD_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def test_last_answer_equals_the_lazy_regex_it_replaces():
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "<ANSWER>", "A", "B", " ", "\n", "<answer", "answer>"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        found = _OLD_ANSWER.findall(text)
        assert last_answer(text) == (found[-1] if found else None), text


GOLD = [{"Action": "get_page", "Action_Input": '{"page": 1, "size": 3}'}]


@pytest.mark.parametrize("completion, reason", [
    ("Action: get_page\nAction Input: " + "[" * 1000, "over-deep call"),
    ("Action: get_page\nAction Input: " + "[" * 100_000 + "]" * 100_000, "over-deep call"),
    ('Action: get_page\nAction Input: {"page": ' + "7" * 6000 + ', "size": 3}', "over-long call"),
    ('Action: get_page\nAction Input: {"page": 1, "size": 3', "malformed call"),
    ("Action Input: {}", "no call"),
    ('Action: get_page\nAction Input: {"page": true, "size": 3}', "wrong call"),
    ('Action: get_page\nAction Input: {"page": 1, "size": 3, "x": null}', "wrong call"),
])
def test_tool_calls_that_fail_are_wrong_with_a_reason(completion, reason):
    with deadline(2.0):
        verdict = check_tooluse(completion, GOLD)
    assert not verdict.correct and verdict.reason == reason


def test_over_deep_does_not_depend_on_the_recursion_limit():
    """Imported libraries raise sys.getrecursionlimit(); a 1,000-deep call must stay over-deep (it
    was read as merely malformed once vLLM had been imported), and 64 levels stay fine."""
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        assert check_tooluse("Action: get_page\nAction Input: " + "[" * 1000, GOLD).reason == "over-deep call"
        deep_ok = '{"page": ' + "[" * 63 + "1" + "]" * 63 + ', "size": 3}'
        assert check_tooluse("Action: get_page\nAction Input: " + deep_ok, GOLD).reason == "wrong call"
        text_brackets = 'Action: get_page\nAction Input: {"page": 1, "size": 3}\n' + "[" * 1000
        assert check_tooluse(text_brackets, GOLD).correct  # brackets after the call do not count
        in_a_string = 'Action: get_page\nAction Input: {"page": 1, "size": 3, "n": "' + "[" * 1000 + '"}'
        assert check_tooluse(in_a_string, GOLD).reason == "wrong call"  # brackets in a string are text
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("completion, gold_input, correct", [
    ('Action: f\nAction Input: {"page": 3.0}', '{"page": 3}', True),  # one JSON number type: 3.0 == 3
    ('Action: f\nAction Input: {"page": true}', '{"page": 1}', False),  # a boolean is not a number
    ('Action: f\nAction Input: {"page": 1}', '{"page": true}', False),
    ('Action: f\nAction Input: {"on": false}', '{"on": false}', True),
    ('Action: f\nAction Input: [0]', '[false]', False),
    ("Action: f", "{}", True),  # no Action Input: no arguments
    ("Action: f\nAction Input: none\nObservation: ok", "{}", True),
    ("Action: f\nAction Input: None", "", True),
    ("Action: f\nAction Input: null", "{}", True),
    ("Action: f\nAction Input:\n", "{}", True),
    ("Action: f\nAction Input: nonesuch", "{}", False),
    ("Action: f", '{"q": 1}', False),
])
def test_tool_call_argument_equality(completion, gold_input, correct):
    assert check_tooluse(completion, [{"Action": "f", "Action_Input": gold_input}]).correct is correct


def test_same_json_is_strict_about_booleans_only():
    assert same_json({"a": [1, 2.0, {"b": None}]}, {"a": [1.0, 2, {"b": None}]})
    assert not same_json(True, 1) and not same_json(0, False) and not same_json(None, {})
    assert not same_json({"a": 1}, {"a": 1, "b": 1}) and not same_json([1, 2], [2, 1])


def test_parse_tool_call_raises_only_its_own_error():
    with pytest.raises(ToolCallError) as info:
        parse_tool_call("Action: f\nAction Input: " + "{\"a\": " * 5000)
    assert info.value.reason == "over-deep call"


def test_eval_counts_wrong_answers_by_reason():
    examples = [Example(0, "q", GOLD, None, "t")]
    texts = ["Action: get_page\nAction Input: " + "[" * 1000, 'Action: get_page\nAction Input: {"page": ' + "7" * 6000,
             "nothing", 'Action: get_page\nAction Input: {"page": 1.0, "size": 3}\nConfidence: 0.8']
    scored = score_completions(examples, [Completion(0, t, "t") for t in texts], "tooluse")
    report = summarize(scored, "tooluse", "zero")
    assert [s.correct for s in scored] == [False, False, False, True]
    assert report.wrong_reasons == {"no call": 1, "over-deep call": 1, "over-long call": 1}


def test_tool_call_errors_say_why():
    cases = {"Action Input: {}": "no call: no 'Action:' line",
             "Action: f\nAction Input: " + '{"a": ' * 5000: "over-deep call: JSON nested deeper than 64",
             'Action: f\nAction Input: {"a" 1}': "malformed call: Expecting ':' delimiter"}
    for text, message in cases.items():
        with pytest.raises(ToolCallError) as info:
            parse_tool_call(text)
        assert str(info.value) == message
    with pytest.raises(ToolCallError, match=r"^over-long call: Exceeds the limit \(4300 digits\)"):
        parse_tool_call('Action: f\nAction Input: {"n": ' + "1" * 5000 + "}")


def test_the_input_is_read_after_the_action():
    text = 'Action Input: {"stale": 1}\nThought: now\nAction: f\nAction Input: {"q": 2}'
    assert parse_tool_call(text) == ("f", {"q": 2})
    assert parse_tool_call("Action: f\nAction Input: null  (no arguments)") == ("f", {})


def test_empty_containers_of_different_kinds_differ():
    assert not same_json([], {}) and not same_json([], "") and not same_json({}, [])


@pytest.mark.parametrize("gold_input", ["None", "null", " NONE ", ""])
def test_a_gold_call_without_arguments_in_any_spelling(gold_input):
    assert check_tooluse("Action: f", [{"Action": "f", "Action_Input": gold_input}]).correct
