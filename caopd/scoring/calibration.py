"""Stages 2-4 of CaOPD: empirical accuracy over K rollouts and target replacement.

P_acc = correct / K per prompt; the student's completion gets its confidence replaced by P_acc;
the teacher context gets ``Confidence: P_acc`` and the note (prompts.teacher_messages). With
``calibrate=False`` (plain OPD/SDFT) completions are kept as sampled and the teacher keeps 1.00.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from caopd.inputs.data import Example
from caopd.inputs.prompts import demonstration, teacher_messages
from caopd.scoring.confidence import format_confidence, parse_confidence, strip_confidence
from caopd.scoring.verifiers import get_task


@dataclass(frozen=True)
class RolloutGroup:
    """The K completions sampled for one prompt, verified. correct[k] is completions[k]'s verdict."""

    example: Example
    completions: list[str]
    correct: list[bool]
    reasons: tuple[str | None, ...] = ()  # why each wrong one is wrong (verifiers.WRONG_REASONS)

    @property
    def p_acc(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def confidences(self) -> list[float]:
        """The confidences the completions state (those without one left out)."""
        return [p.value for p in map(parse_confidence, self.completions) if p is not None]

    @property
    def format_adherence(self) -> float:
        return sum(parse_confidence(c) is not None for c in self.completions) / len(self.completions)


@dataclass(frozen=True)
class DistillationTarget:
    """One training sequence: the student's (revised) completion and the teacher's context.
    used_fallback: correct_solution mode had no correct rollout and fell back to demo."""

    example: Example
    completion: str
    confidence_line: str | None  # appended to the completion (kept whole when truncating)
    teacher_messages: list[dict]
    p_acc: float
    used_fallback: bool
    sampled_ids: tuple[int, ...] | None = None  # the ids the engine sampled for the whole completion


def verify_rollouts(example: Example, completions: list[str], dataset: str) -> RolloutGroup:
    task = get_task(dataset)
    verdicts = [task.check(c, example.gold) for c in completions]
    return RolloutGroup(example, completions, [v.correct for v in verdicts], tuple(v.reason for v in verdicts))


def revise_completion(completion: str, p_acc: float) -> tuple[str, str]:
    """(body without any confidence statement, the ``Confidence: P_acc`` line to append)."""
    return strip_confidence(completion), format_confidence(p_acc)


def build_targets(group: RolloutGroup, dataset: str, teacher_mode: str, calibrate: bool,
                  rng: random.Random) -> list[DistillationTarget]:
    """A distillation target for each of the group's K completions."""
    p_acc = group.p_acc if calibrate else None
    correct = [c for c, ok in zip(group.completions, group.correct) if ok]
    mode, fallback = teacher_mode, False
    if teacher_mode == "correct_solution" and not correct:
        mode, fallback = "demo", True
    response = rng.choice(correct) if mode == "correct_solution" else demonstration(group.example, dataset)
    teacher = teacher_messages(group.example, response, mode, p_acc)
    targets = []
    for completion in group.completions:
        if calibrate:
            body, line = revise_completion(completion, group.p_acc)
        else:
            body, line = completion, None
        targets.append(DistillationTarget(group.example, body, line, teacher, group.p_acc, fallback,
                                          getattr(completion, "token_ids", None)))
    return targets
