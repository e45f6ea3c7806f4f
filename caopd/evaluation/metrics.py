"""Accuracy and calibration metrics over (correct, confidence) pairs, as in the CaOPD paper.

- ECE: 10 equal-width bins; bin i holds confidences in [i/10, (i+1)/10), the last bin also 1.0.
- Brier: mean (confidence - correct)^2.
- SPR (strict pairwise ranking): P(conf of a correct answer > conf of a wrong one); ties score 0;
  0 when either class is empty. Computed by sorting, O(n log n) time and O(n) memory.
- AUROC: the same with ties scoring 1/2.
- OCG (overconfidence gap): mean confidence - accuracy; positive means overconfident.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BINS = 10


@dataclass(frozen=True)
class Bin:
    low: float
    high: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class CalibrationMetrics:
    n: int
    accuracy: float
    mean_confidence: float
    ece: float
    brier: float
    spr: float
    auroc: float
    ocg: float
    bins: list[Bin]

    def to_dict(self) -> dict:
        return asdict(self)

    def shown(self, value: float) -> float | None:
        """A metric as a table shows it: None (n/a) when nothing was scored (ECE 0 would read as perfect)."""
        return None if self.n == 0 else value

    def fmt(self, value: float, spec: str) -> str:
        return "n/a" if self.n == 0 else format(value, spec)

    @classmethod
    def from_dict(cls, values: dict) -> CalibrationMetrics:
        """From to_dict's output, checked: every number a finite int or float (ValueError naming the field)."""
        bins = values["bins"]
        if not isinstance(bins, list) or not all(isinstance(b, dict) for b in bins):
            raise ValueError("field 'bins' must be a list of objects")
        for where, fields, optional in ((values, cls.__dataclass_fields__, ()), *(
                (b, Bin.__dataclass_fields__, ("mean_confidence", "accuracy")) for b in bins)):
            for name in fields:
                value = where.get(name) if name != "bins" else 0
                if value is None and name in optional:
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                    raise ValueError(f"field {name!r} must be a finite number, got {value!r}")
        return cls(**{**values, "bins": [Bin(**b) for b in bins]})


def _as_arrays(correct, confidence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(correct, dtype=bool).ravel()
    c = np.asarray(confidence, dtype=np.float64).ravel()
    if y.shape != c.shape:
        raise ValueError(f"correct has {y.size} values but confidence has {c.size}")
    if c.size and (np.isnan(c).any() or c.min() < 0.0 or c.max() > 1.0):
        raise ValueError("confidences must lie in [0, 1] (clip or exclude them first)")
    return y, c


def bin_index(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Equal-width bin of each confidence; 1.0 goes to the last bin, 0.0 to the first."""
    return np.minimum(np.floor(confidence * n_bins).astype(np.int64), n_bins - 1)


def reliability_bins(correct, confidence, n_bins: int = N_BINS) -> list[Bin]:
    y, c = _as_arrays(correct, confidence)
    idx = bin_index(c, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sums = np.bincount(idx, weights=c, minlength=n_bins)
    hit_sums = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    return [
        Bin(i / n_bins, (i + 1) / n_bins, int(counts[i]),
            float(conf_sums[i] / counts[i]) if counts[i] else None,
            float(hit_sums[i] / counts[i]) if counts[i] else None)
        for i in range(n_bins)
    ]


def expected_calibration_error(correct, confidence, n_bins: int = N_BINS) -> float:
    y, c = _as_arrays(correct, confidence)
    if not c.size:
        return 0.0
    return float(sum(b.count * abs(b.mean_confidence - b.accuracy)
                     for b in reliability_bins(y, c, n_bins) if b.count) / c.size)


def brier_score(correct, confidence) -> float:
    y, c = _as_arrays(correct, confidence)
    return float(np.mean((c - y) ** 2)) if c.size else 0.0


def _pair_counts(correct, confidence) -> tuple[int, int, int]:
    """(pairs, correct-above-wrong pairs, tied pairs) over all (correct, wrong) pairs."""
    y, c = _as_arrays(correct, confidence)
    wrong = np.sort(c[~y])
    right = c[y]
    below = np.searchsorted(wrong, right, side="left")
    below_or_equal = np.searchsorted(wrong, right, side="right")
    strict = int(below.sum(dtype=np.int64))
    ties = int((below_or_equal - below).sum(dtype=np.int64))
    return right.size * wrong.size, strict, ties


def strict_pairwise_ranking(correct, confidence) -> float:
    pairs, strict, _ = _pair_counts(correct, confidence)
    return strict / pairs if pairs else 0.0


def auroc(correct, confidence) -> float:
    """Area under the ROC curve of confidence as a detector of correct answers (0.5 if undefined)."""
    pairs, strict, ties = _pair_counts(correct, confidence)
    return (strict + 0.5 * ties) / pairs if pairs else 0.5


def overconfidence_gap(correct, confidence) -> float:
    y, c = _as_arrays(correct, confidence)
    return float(c.mean() - y.mean()) if c.size else 0.0


def calibration_metrics(correct, confidence, n_bins: int = N_BINS) -> CalibrationMetrics:
    """All metrics at once, over the same (correct, confidence) pairs."""
    y, c = _as_arrays(correct, confidence)
    return CalibrationMetrics(
        n=int(c.size),
        accuracy=float(y.mean()) if c.size else 0.0,
        mean_confidence=float(c.mean()) if c.size else 0.0,
        ece=expected_calibration_error(y, c, n_bins),
        brier=brier_score(y, c),
        spr=strict_pairwise_ranking(y, c),
        auroc=auroc(y, c),
        ocg=overconfidence_gap(y, c),
        bins=reliability_bins(y, c, n_bins),
    )
