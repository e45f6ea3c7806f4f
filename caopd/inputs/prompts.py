"""Prompts: the student's (with the confidence instruction) and the teacher's privileged contexts.

Teacher contexts, as in the paper: ``demo`` (SDFT: the question and a gold demonstration) and
``correct_solution`` (SDPO: the question and a verified correct rollout of this step). With a
calibrated target (CaOPD) the context's confidence is P_acc and a note asks the teacher to output
it; without one (plain OPD) the demonstration keeps ``Confidence: 1.00``.
"""
from __future__ import annotations

from caopd.inputs.data import Example
from caopd.scoring.confidence import format_confidence, strip_confidence
from caopd.scoring.verifiers import get_task

CONFIDENCE_INSTRUCTION = ("Confidence: your confidence level (0.0-1.0) that your answer is correct, "
                          "as a number only, no other words or explanation.")
BEGIN_ANCHOR = "\n\nBegin!"
TEACHER_MODES = ("demo", "correct_solution")


def inject_confidence_instruction(prompt: str) -> str:
    """The confidence line goes before the ``Begin!`` anchor of a ReAct prompt, else at the end."""
    if BEGIN_ANCHOR in prompt:
        return prompt.replace(BEGIN_ANCHOR, "\n" + CONFIDENCE_INSTRUCTION + BEGIN_ANCHOR, 1)
    return prompt.rstrip() + "\n\n" + CONFIDENCE_INSTRUCTION


def student_messages(example: Example) -> list[dict]:
    """Chat messages of the student prompt: the dataset prompt plus the confidence instruction
    (in the last user turn for chat prompts; before ``Begin!`` for tool-use prompts)."""
    if isinstance(example.prompt, str):
        return [{"role": "user", "content": inject_confidence_instruction(example.prompt)}]
    messages = [dict(m) for m in example.prompt]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = inject_confidence_instruction(messages[last_user]["content"])
    return messages


def demonstration(example: Example, dataset: str) -> str:
    """The written gold demonstration, or one rendered from the gold answer where there is none."""
    return example.demonstration if example.demonstration else get_task(dataset).render_answer(example.gold)


def calibration_note(p_acc: float) -> str:
    return (f"The empirical confidence for this question is {p_acc:.2f}. "
            "Output this exact value in the 'Confidence:' field.")


def teacher_messages(example: Example, response: str, mode: str, p_acc: float | None) -> list[dict]:
    """The teacher's context: the student prompt, then ``response`` (a demonstration in ``demo``
    mode, a verified rollout in ``correct_solution`` mode) ending in ``Confidence: P_acc``
    (``1.00`` when p_acc is None: plain OPD), the note when calibrated, then the closing line."""
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher context mode must be one of {TEACHER_MODES}, got {mode!r}")
    messages = student_messages(example)
    question = messages[-1]["content"]
    shown = strip_confidence(response) + "\n" + format_confidence(1.0 if p_acc is None else p_acc)
    if mode == "demo":
        parts = [question, "This is an example for a response to the question:", shown]
        closing = "Now answer with a response of your own, including the thinking process."
    else:
        parts = [question, "Correct solution:", shown]
        closing = "Correctly solve the original question."
    if p_acc is not None:
        parts.append(calibration_note(p_acc))
    messages[-1] = {"role": messages[-1]["role"], "content": "\n\n".join([*parts, closing])}
    return messages
