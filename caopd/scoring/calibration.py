"""Stages 2-4 of CaOPD: empirical accuracy over K rollouts and target replacement.

P_acc = correct / K per prompt; the student's completion gets its confidence replaced by the target
(P_acc, the paper's rule); the teacher context gets ``Confidence: <target>`` and the note
(prompts.teacher_messages). With ``calibrate=False`` (plain OPD/SDFT) completions are kept as
sampled and the teacher keeps 1.00.

The target with a prior (``confidence_prior`` N > 0): P_acc from K = 8 rollouts is a noisy draw
(standard deviation sqrt(p (1 - p) / K), 0.11 at p = 0.11), and the per-token reverse KL fits
the student to the targets' mode, not their mean: on hard questions the most frequent targets
(0.00 and 0.12 at p = 0.11) sit below the accuracy, and the demo's CaOPD ended underconfident
there. The Beta posterior mean with a prior centred on the student's own mean stated confidence
s over the K rollouts, worth N rollouts,

    target = (correct + N s) / (K + N),

is less noisy (its rollout part's deviation times K / (K + N)) and keeps the fixed point: the
student's s is the target's mean only where s equals the accuracy. Without a stated confidence
among the K, the target is P_acc.
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

    def target(self, prior: float = 0.0) -> float:
        """The confidence target: P_acc, or with ``prior`` N > 0 the posterior mean
        (correct + N x mean stated confidence) / (K + N)."""
        stated = self.confidences
        if prior <= 0 or not stated:
            return self.p_acc
        return (sum(self.correct) + prior * sum(stated) / len(stated)) / (len(self.correct) + prior)

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
                  rng: random.Random, prior: float = 0.0) -> list[DistillationTarget]:
    """A distillation target for each of the group's K completions (``prior``: ``RolloutGroup.target``)."""
    confidence = group.target(prior) if calibrate else None
    correct = [c for c, ok in zip(group.completions, group.correct) if ok]
    mode, fallback = teacher_mode, False
    if teacher_mode == "correct_solution" and not correct:
        mode, fallback = "demo", True
    response = rng.choice(correct) if mode == "correct_solution" else demonstration(group.example, dataset)
    teacher = teacher_messages(group.example, response, mode, confidence)
    targets = []
    for completion in group.completions:
        if calibrate:
            body, line = revise_completion(completion, confidence)
        else:
            body, line = completion, None
        targets.append(DistillationTarget(group.example, body, line, teacher, group.p_acc, fallback,
                                          getattr(completion, "token_ids", None)))
    return targets
