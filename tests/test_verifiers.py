import json
import random

import pytest

from caopd.inputs.data import load_examples
from caopd.scoring.verifiers import TASKS, parse_tool_call, verify_science, verify_tooluse

GOLD = [{"Action": "search", "Action_Input": '{"q": "axolotl", "limit": 3, "opts": {"a": [1, 2]}}'}]


@pytest.mark.parametrize("dataset, rows", [("science", "science_rows_path"), ("tooluse", "tooluse_rows_path"),
                                           ("science", "science_path"), ("tooluse", "tooluse_path")])
def test_gold_renders_score_100_and_shuffled_do_not(dataset, rows, request):
    """Shipped/synthetic rows (core) and, where ../shared is present, every real row."""
    examples = load_examples(request.getfixturevalue(rows), dataset)
    task = TASKS[dataset]
    rendered = [task.render_answer(e.gold) + "\nConfidence: 0.9" for e in examples]
    assert all(task.verify(c, e.gold) for c, e in zip(rendered, examples))
    shuffled = rendered[:]
    random.Random(0).shuffle(shuffled)
    accuracy = sum(task.verify(c, e.gold) for c, e in zip(shuffled, examples)) / len(examples)
    assert accuracy < 0.5


@pytest.mark.parametrize("completion, correct", [
    ("<reasoning>A or B</reasoning>\n<answer>\nB\n</answer>", True),
    ("<answer>b</answer>", True),
    ("<answer>A</answer> wait, <answer>B</answer>", True),
    ("<answer>B</answer> wait, <answer>A</answer>", False),
    ("The answer is B", False),
    ("<answer>B", False),
])
def test_science(completion, correct):
    assert verify_science(completion, "B") is correct


@pytest.mark.parametrize("completion, correct", [
    ('Thought: t\nAction: search\nAction Input: {"q": "axolotl", "limit": 3, "opts": {"a": [1, 2]}}', True),
    ('Action: search\nAction Input: {"opts": {"a": [1, 2]}, "limit": 3, "q": "axolotl"}\nObservation', True),
    ('Action: search\nAction Input: {"q": "axolotl", "limit": 3, "opts": {"a": [2, 1]}}', False),
    ('Action: search\nAction Input: {"q": "axolotl", "limit": "3", "opts": {"a": [1, 2]}}', False),
    ('Action: find\nAction Input: {"q": "axolotl", "limit": 3, "opts": {"a": [1, 2]}}', False),
    ('Action: search\nAction Input: {"q": "axolotl", "limit": 3,', False),
    ("Action: search\nAction Input: {'q': 'axolotl'}", False),
    ("Action: search", False),
    ('Action Input: {"q": "axolotl"}', False),
    ('Action: search\nAction Input: {"q": "axolotl", "limit": 3, "opts": {"a": [1, 2]}}\n'
     'Action: other\nAction Input: {}', True),
])
def test_tooluse(completion, correct):
    assert verify_tooluse(completion, GOLD) is correct


def test_tool_call_json_with_braces_in_strings():
    text = 'Action: f\nAction Input: {"text": "a } b { c"}'
    assert parse_tool_call(text) == ("f", {"text": "a } b { c"})


def test_tooluse_gold_as_object_or_empty_string():
    assert verify_tooluse("Action: f\nAction Input: {}", [{"Action": "f", "Action_Input": ""}])
    assert verify_tooluse('Action: f\nAction Input: {"x": 1}', [{"Action": "f", "Action_Input": {"x": 1}}])
    assert TASKS["tooluse"].render_answer(GOLD) == \
        "Action: search\nAction Input: " + json.dumps(json.loads(GOLD[0]["Action_Input"]))


def test_unknown_dataset_lists_the_known_ones():
    from caopd.errors import InputError
    from caopd.scoring.verifiers import get_task

    with pytest.raises(InputError) as info:
        get_task("math")
    assert str(info.value) == "unknown dataset 'math': choose one of science, tooluse"
