"""Score completions against a dataset: accuracy and calibration, as ``caopd eval`` reports them.

Input rows are ``{"id": int, "completion": str}``; an id may repeat (one row per sample).
Completions without a verbalized confidence are counted apart and either excluded from the
calibration metrics (default, with a warning) or counted as confidence 0.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from caopd.errors import InputError
from caopd.evaluation.metrics import CalibrationMetrics, calibration_metrics
from caopd.inputs.data import Example, iter_jsonl
from caopd.scoring.confidence import parse_confidence
from caopd.scoring.verifiers import get_task

MISSING_POLICIES = ("exclude", "zero")


@dataclass(frozen=True)
class Completion:
    id: int
    text: str
    source: str


@dataclass(frozen=True)
class ScoredCompletion:
    """confidence: the parsed, clipped value, or None when the completion states none."""

    id: int
    correct: bool
    confidence: float | None
    clipped: bool
    reason: str | None = None  # why it is wrong (verifiers.WRONG_REASONS)


@dataclass(frozen=True)
class EvalReport:
    dataset: str
    n_completions: int
    n_missing_confidence: int
    n_clipped: int
    format_adherence: float  # share of completions with a parseable confidence
    accuracy_all: float  # over every completion, with or without a confidence
    missing_confidence: str
    metrics: CalibrationMetrics  # over the scored completions (see missing_confidence)
    wrong_reasons: dict[str, int] = field(default_factory=dict)  # wrong completions by reason

    def to_dict(self) -> dict:
        return asdict(self)


def _warn_cut(where: str) -> None:
    print(f"warning: {where}: a last line cut off mid-write (no newline, not JSON); skipped", file=sys.stderr)


def read_completions(path: Path, samples: int | None = None) -> list[Completion]:
    """The rows of a completions file, each {"id": int, "completion": str}: a missing or mistyped field
    is one line naming file:line (an id of true or 5.0 is not question 1 or 5: such rows are refused,
    counted); ``samples``: also refuse questions with more rows than that (a duplicated id). A last line
    cut off mid-write is skipped with a warning."""
    completions, wrong, per_question = [], [], Counter()
    for row, where in iter_jsonl(path, cut_last_line=_warn_cut):
        for name, kind in (("id", int), ("completion", str)):
            if name not in row:
                raise InputError(f"{where}: missing field {name!r}")
            if not isinstance(row[name], kind) or isinstance(row[name], bool):
                wrong.append(f"{where}: field {name!r} must be {kind.__name__}, got {type(row[name]).__name__}")
                break
        else:
            completions.append(Completion(row["id"], row["completion"], where))
            per_question[row["id"]] += 1
    if wrong:
        raise InputError(wrong[0] + (f" ({len(wrong) - 1} more such rows refused)" if len(wrong) > 1 else ""))
    if samples is not None:
        extra = [question for question, n in per_question.items() if n > samples]
        if extra:
            first = next(c.source for c in completions if c.id == extra[0])
            raise InputError(f"{path}: {len(extra)} question(s) have more rows than --samples {samples} (a "
                             f"duplicated id; first: id {extra[0]} at {first}): refused")
    return completions


def load_completions(path: str | Path) -> list[Completion]:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; --input takes a JSON Lines file of completions")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    completions = read_completions(path)
    if not completions:
        raise InputError(f"{path}: no completions")
    return completions


def score_completions(examples: list[Example], completions: list[Completion], dataset: str) -> list[ScoredCompletion]:
    task = get_task(dataset)
    by_id = {e.id: e for e in examples}
    scored = []
    for c in completions:
        example = by_id.get(c.id)
        if example is None:
            raise InputError(f"{c.source}: id {c.id} is not in the dataset ({len(by_id)} examples)")
        parsed = parse_confidence(c.text)
        verdict = task.check(c.text, example.gold)
        scored.append(ScoredCompletion(c.id, verdict.correct, parsed.value if parsed else None,
                                       bool(parsed and parsed.clipped), verdict.reason))
    return scored


def summarize(scored: list[ScoredCompletion], dataset: str, missing_confidence: str = "exclude") -> EvalReport:
    if missing_confidence not in MISSING_POLICIES:
        raise InputError(f"--missing-confidence must be one of {MISSING_POLICIES}, got {missing_confidence!r}")
    n_missing = sum(s.confidence is None for s in scored)
    kept = [s for s in scored if s.confidence is not None or missing_confidence == "zero"]
    if n_missing and missing_confidence == "exclude":
        print(f"warning: {n_missing} of {len(scored)} completions state no confidence; excluded from "
              "the calibration metrics (--missing-confidence zero counts them as 0)", file=sys.stderr)
    metrics = calibration_metrics([s.correct for s in kept],
                                  [0.0 if s.confidence is None else s.confidence for s in kept])
    return EvalReport(
        dataset=dataset,
        n_completions=len(scored),
        n_missing_confidence=n_missing,
        n_clipped=sum(s.clipped for s in scored),
        format_adherence=1.0 - n_missing / len(scored) if scored else 0.0,
        accuracy_all=sum(s.correct for s in scored) / len(scored) if scored else 0.0,
        missing_confidence=missing_confidence,
        metrics=metrics,
        wrong_reasons=dict(sorted(Counter(s.reason for s in scored if not s.correct and s.reason).items())),
    )


def report_rows(report: EvalReport) -> list[list]:
    m = report.metrics
    return [["completions", report.n_completions], ["accuracy (all)", report.accuracy_all],
            ["missing confidence", report.n_missing_confidence], ["clipped confidence", report.n_clipped],
            ["format adherence", report.format_adherence], ["scored", m.n], ["accuracy", m.shown(m.accuracy)],
            ["mean confidence", m.shown(m.mean_confidence)], ["ECE (10 bins)", m.shown(m.ece)],
            ["Brier", m.shown(m.brier)], ["SPR", m.shown(m.spr)], ["AUROC", m.shown(m.auroc)],
            ["OCG", m.shown(m.ocg)],
            *([f"wrong: {reason}", n] for reason, n in report.wrong_reasons.items())]
