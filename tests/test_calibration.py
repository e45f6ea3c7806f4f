"""Stages 2-4 on synthetic and shipped rows: the student prompt, P_acc, the three replacements
(the completion's confidence, the teacher context's confidence, the note), the teacher contexts.

Deliberate bugs these catch (issue 12): P_acc = correct/(K+1); a replacement left out; the
correct_solution context without its fallback. Fast: nothing here trains.
"""
from __future__ import annotations

import random

import pytest

from caopd.inputs.data import Example, load_examples
from caopd.inputs.prompts import (
    CONFIDENCE_INSTRUCTION,
    demonstration,
    inject_confidence_instruction,
    student_messages,
    teacher_messages,
)
from caopd.scoring.calibration import RolloutGroup, build_targets
from caopd.scoring.verifiers import TASKS


def test_student_prompt_injection(tooluse_rows_path, science_rows_path):
    tool = load_examples(tooluse_rows_path, "tooluse")[0]
    content = student_messages(tool)[0]["content"]
    assert content.index(CONFIDENCE_INSTRUCTION) < content.index("\n\nBegin!") and content.count("Begin!") == 1
    science = load_examples(science_rows_path, "science")[0]
    messages = student_messages(science)
    assert messages[0] == science.prompt[0] and messages[1]["content"].endswith(CONFIDENCE_INSTRUCTION)


@pytest.mark.parametrize("mode", ["demo", "correct_solution"])
def test_targets_carry_p_acc_in_three_places(science_rows_path, mode):
    example = load_examples(science_rows_path, "science")[3]
    gold = TASKS["science"].render_answer(example.gold)
    completions = [gold + "\nConfidence: 0.99", "<answer>Z</answer>\nConfidence: 0.9", "no answer", gold]
    group = RolloutGroup(example, completions, [True, False, False, True])
    targets = build_targets(group, "science", mode, calibrate=True, rng=random.Random(0))
    assert group.p_acc == 0.5 and len(targets) == 4
    for t, c in zip(targets, completions):
        assert t.confidence_line == "Confidence: 0.50" and "Confidence" not in t.completion
        assert t.completion == c.split("\nConfidence")[0]
    teacher = targets[0].teacher_messages[-1]["content"]
    assert "Confidence: 0.50" in teacher and "Confidence: 0.99" not in teacher
    note = "The empirical confidence for this question is 0.50. Output this exact value in the 'Confidence:' field."
    closing = "Now answer with a response of your own" if mode == "demo" else "Correctly solve the original question."
    assert teacher.index(note) < teacher.index(closing)
    assert ("This is an example for a response" in teacher) == (mode == "demo")
    plain = build_targets(group, "science", mode, calibrate=False, rng=random.Random(0))
    assert plain[0].completion == completions[0] and plain[0].confidence_line is None
    assert "Confidence: 1.00" in plain[0].teacher_messages[-1]["content"] and note not in \
        plain[0].teacher_messages[-1]["content"]


def test_correct_solution_without_a_correct_rollout_falls_back_to_demo(science_rows_path):
    example = load_examples(science_rows_path, "science")[0]
    group = RolloutGroup(example, ["x", "y"], [False, False])
    (t, _) = build_targets(group, "science", "correct_solution", calibrate=True, rng=random.Random(0))
    assert t.used_fallback and "This is an example for a response" in t.teacher_messages[-1]["content"]



@pytest.mark.parametrize("correct, p_acc", [([True] * 8, 1.0), ([False] * 8, 0.0), ([True, False, False, False], 0.25),
                                            ([True, True, False], 2 / 3)])
def test_p_acc_is_correct_over_k(correct, p_acc, science_rows_path):
    example = load_examples(science_rows_path, "science")[0]
    group = RolloutGroup(example, [f"c{k}\nConfidence: 0.9" for k in range(len(correct))], correct)
    assert group.p_acc == p_acc and group.confidences == [0.9] * len(correct) and group.format_adherence == 1.0
    targets = build_targets(group, "science", "demo", calibrate=True, rng=random.Random(0))
    assert {t.confidence_line for t in targets} == {f"Confidence: {p_acc:.2f}"}
    assert [t.completion for t in targets] == [f"c{k}" for k in range(len(correct))]


def test_verify_rollouts_gives_verdicts_and_reasons(science_rows_path):
    from caopd.scoring.calibration import verify_rollouts

    example = load_examples(science_rows_path, "science")[0]  # gold B
    group = verify_rollouts(example, ["<answer>B</answer>", "<answer>C</answer>", "no tags"], "science")
    assert group.correct == [True, False, False] and group.reasons == (None, "wrong answer", "no answer")


PLAIN = Example(3, "What is 2 + 2?\nA: 3\nB: 4", "B", "<answer>B</answer>\nConfidence: 0.95", "synthetic")
NO_DEMO = Example(4, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}],
                  "C", None, "synthetic")


def test_prompts_exactly():
    """The texts the models see, pinned whole (a changed word is a changed experiment)."""
    assert inject_confidence_instruction("tools\n\nBegin!\nQuestion: q\n\nBegin!") == \
        f"tools\n{CONFIDENCE_INSTRUCTION}\n\nBegin!\nQuestion: q\n\nBegin!"  # only the first anchor
    assert inject_confidence_instruction("  What?  \n") == f"  What?\n\n{CONFIDENCE_INSTRUCTION}"
    assert student_messages(PLAIN) == [{"role": "user", "content": f"What is 2 + 2?\nA: 3\nB: 4\n\n"
                                                                   f"{CONFIDENCE_INSTRUCTION}"}]
    assert student_messages(NO_DEMO)[0] == {"role": "system", "content": "Be brief."}
    assert demonstration(PLAIN, "science") == "<answer>B</answer>\nConfidence: 0.95"
    assert demonstration(NO_DEMO, "science") == "<answer>\nC\n</answer>"
    question = student_messages(PLAIN)[0]["content"]
    demo = teacher_messages(PLAIN, "<answer>B</answer>\nConfidence: 0.95", "demo", 0.25)
    assert demo == [{"role": "user", "content": "\n\n".join([
        question, "This is an example for a response to the question:", "<answer>B</answer>\nConfidence: 0.25",
        "The empirical confidence for this question is 0.25. Output this exact value in the 'Confidence:' field.",
        "Now answer with a response of your own, including the thinking process."])}]
    solved = teacher_messages(PLAIN, "<answer>B</answer>", "correct_solution", None)
    assert solved == [{"role": "user", "content": "\n\n".join([
        question, "Correct solution:", "<answer>B</answer>\nConfidence: 1.00",
        "Correctly solve the original question."])}]
    with pytest.raises(ValueError, match=r"teacher context mode must be one of \('demo', 'correct_solution'\), "
                                         r"got 'sdft'"):
        teacher_messages(PLAIN, "x", "sdft", None)


def test_targets_keep_the_example_and_p_acc_and_pick_a_correct_rollout():
    group = RolloutGroup(PLAIN, ["<answer>A</answer>", "<answer>B</answer> right one", "<answer>B</answer> also"],
                         [False, True, True])
    demo = build_targets(group, "science", "demo", calibrate=True, rng=random.Random(0))
    assert all(t.example is PLAIN and t.p_acc == 2 / 3 and not t.used_fallback for t in demo)
    for seed in range(6):
        (t, *_) = build_targets(group, "science", "correct_solution", calibrate=True, rng=random.Random(seed))
        shown = t.teacher_messages[-1]["content"].split("Correct solution:\n\n")[1]
        assert shown.startswith(("<answer>B</answer> right one\n", "<answer>B</answer> also\n"))
        assert not t.used_fallback


def test_the_target_with_a_prior_is_the_beta_posterior_mean_of_the_stated_confidence(science_rows_path):
    """(correct + N x mean stated) / (K + N); the paper's P_acc at N = 0 and where nothing is stated."""
    example = load_examples(science_rows_path, "science")[0]
    completions = ["a\nConfidence: 0.40", "b\nConfidence: 0.60", "c", "d\nConfidence: 0.50"] * 2
    group = RolloutGroup(example, completions, [True, True] + [False] * 6)
    assert group.target() == group.target(0.0) == 0.25
    assert group.target(8.0) == pytest.approx((2 + 8 * 0.5) / 16)  # the stated mean 0.5, the missing two left out
    assert group.target(24.0) == pytest.approx((2 + 24 * 0.5) / 32)
    targets = build_targets(group, "science", "demo", calibrate=True, rng=random.Random(0), prior=8.0)
    assert {t.confidence_line for t in targets} == {"Confidence: 0.38"}
    assert "is 0.38." in targets[0].teacher_messages[-1]["content"] and targets[0].p_acc == 0.25
    silent = RolloutGroup(example, ["a", "b"], [True, False])
    assert silent.target(8.0) == 0.5
    opd = build_targets(group, "science", "demo", calibrate=False, rng=random.Random(0), prior=8.0)
    assert opd[0].confidence_line is None and "Confidence: 1.00" in opd[0].teacher_messages[-1]["content"]


def test_the_prior_grows_from_nothing_at_the_first_step_to_its_weight_at_the_last():
    from caopd.training.trainer import prior_at

    assert prior_at(16.0, 0, 150) == 0.0 and prior_at(16.0, 149, 150) == 16.0
    assert prior_at(16.0, 149 // 2, 150) == pytest.approx(16.0 * 74 / 149)
    assert prior_at(0.0, 100, 150) == 0.0 and prior_at(8.0, 0, 1) == 0.0
