import numpy as np
import pytest

from caopd.evaluation.metrics import (
    auroc,
    bin_index,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    overconfidence_gap,
    reliability_bins,
    strict_pairwise_ranking,
)


def test_bins_endpoints():
    assert bin_index(np.array([0.0, 0.05, 0.1, 0.3, 0.7, 0.9, 0.99, 1.0])).tolist() == [0, 0, 1, 3, 7, 9, 9, 9]


def test_ece_by_hand():
    # bin 9: confs 1.0, 0.9 (mean .95), both right -> |.95-1| = .05, weight 2/4
    # bin 2: confs .2, .2, 1 right of 2 -> |.2-.5| = .3, weight 2/4
    correct, conf = [1, 1, 1, 0], [1.0, 0.9, 0.2, 0.2]
    assert expected_calibration_error(correct, conf) == pytest.approx(0.5 * 0.05 + 0.5 * 0.3)
    bins = reliability_bins(correct, conf)
    assert [b.count for b in bins] == [0, 0, 2, 0, 0, 0, 0, 0, 0, 2]
    assert bins[9].accuracy == 1.0 and bins[2].mean_confidence == pytest.approx(0.2)
    assert bins[0].accuracy is None


def test_ece_where_the_bin_count_matters():
    """A correct answer at 0.19 and a wrong one at 0.11 share the 10-bin bin [0.1, 0.2): accuracy
    0.5 at mean confidence 0.15, ECE 0.35. With 11 bins they fall apart: (0.81 + 0.11) / 2 = 0.46.
    Catches ECE computed with another bin count (the case above gives 0.175 with 10 or 11)."""
    assert expected_calibration_error([1, 0], [0.19, 0.11]) == pytest.approx(0.35)
    assert expected_calibration_error([1, 0], [0.19, 0.11], n_bins=11) == pytest.approx(0.46)
    assert calibration_metrics([1, 0], [0.19, 0.11]).ece == pytest.approx(0.35)
    assert [b.count for b in reliability_bins([1, 0], [0.19, 0.11])] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 0]


def test_brier_and_ocg_by_hand():
    correct, conf = [1, 0, 1], [0.8, 0.6, 0.5]
    assert brier_score(correct, conf) == pytest.approx((0.04 + 0.36 + 0.25) / 3)
    assert overconfidence_gap(correct, conf) == pytest.approx((1.9 / 3) - 2 / 3)


def test_spr_and_auroc_by_hand():
    # correct: .9 .5 ; wrong: .5 .2  -> pairs (.9,.5)>,(.9,.2)>,(.5,.5)tie,(.5,.2)>
    correct, conf = [1, 1, 0, 0], [0.9, 0.5, 0.5, 0.2]
    assert strict_pairwise_ranking(correct, conf) == pytest.approx(3 / 4)
    assert auroc(correct, conf) == pytest.approx(3.5 / 4)


def test_spr_saturated_model_scores_zero():
    correct, conf = [1, 0, 1, 0], [1.0, 1.0, 1.0, 1.0]
    assert strict_pairwise_ranking(correct, conf) == 0.0
    assert auroc(correct, conf) == 0.5


@pytest.mark.parametrize("correct", [[1, 1, 1], [0, 0], []])
def test_spr_one_class_empty_is_zero(correct):
    assert strict_pairwise_ranking(correct, [0.5] * len(correct)) == 0.0


def test_spr_large_matches_brute_force_on_a_sample_and_runs_on_100k():
    rng = np.random.default_rng(0)
    correct = rng.random(100_000) < 0.6
    conf = np.round(np.clip(rng.normal(0.5 + 0.2 * correct, 0.2), 0, 1), 2)  # many ties
    spr = strict_pairwise_ranking(correct, conf)
    y, c = correct[:3000], conf[:3000]
    brute = np.mean(c[y][:, None] > c[~y][None, :])
    assert strict_pairwise_ranking(y, c) == pytest.approx(brute, abs=1e-12)
    assert spr == pytest.approx(0.7537861658983366, abs=1e-12)  # pinned: numpy's PCG64 stream with seed 0


def test_calibration_metrics_consistent_and_validated():
    m = calibration_metrics([1, 0, 1, 1], [0.9, 0.8, 0.7, 0.3])
    assert m.n == 4 and m.accuracy == 0.75 and m.mean_confidence == pytest.approx(0.675)
    assert m.ocg == pytest.approx(0.675 - 0.75)
    assert sum(b.count for b in m.bins) == 4
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_metrics([1], [1.5])
    with pytest.raises(ValueError, match="values"):
        calibration_metrics([1, 0], [0.5])


def test_empty_and_one_class_inputs():
    assert (expected_calibration_error([], []), brier_score([], []), overconfidence_gap([], [])) == (0.0, 0.0, 0.0)
    empty = calibration_metrics([], [])
    assert (empty.n, empty.accuracy, empty.mean_confidence, empty.auroc) == (0, 0.0, 0.0, 0.5)
    assert auroc([1, 1], [0.2, 0.9]) == 0.5 and auroc([0], [0.3]) == 0.5  # no (correct, wrong) pair


def test_bins_edges_and_other_bin_counts():
    bins = reliability_bins([1, 0, 1], [0.05, 0.25, 0.27])
    assert [x for b in bins[:3] for x in (b.low, b.high)] == pytest.approx([0.0, 0.1, 0.1, 0.2, 0.2, 0.3])
    assert bins[2].count == 2 and bins[2].mean_confidence == pytest.approx(0.26) and bins[2].accuracy == 0.5
    assert bins[1].mean_confidence is None and bins[1].accuracy is None
    five = calibration_metrics([1, 0], [0.19, 0.11], n_bins=5)  # one bin [0, 0.2): |0.15 - 0.5|
    assert len(five.bins) == 5 and five.ece == pytest.approx(0.35) and five.bins[0].count == 2
    eleven = calibration_metrics([1, 0], [0.19, 0.11], n_bins=11)
    assert len(eleven.bins) == 11 and eleven.ece == pytest.approx(0.46)


def test_metrics_round_trip_and_reject_nan():
    m = calibration_metrics([1, 0, 1], [0.9, 0.4, 0.6])
    assert m.to_dict()["bins"][9] == {"low": 0.9, "high": 1.0, "count": 1, "mean_confidence": 0.9, "accuracy": 1.0}
    assert type(m).from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match=r"^confidences must lie in \[0, 1\] \(clip or exclude them first\)$"):
        calibration_metrics([1], [float("nan")])
    with pytest.raises(ValueError, match=r"^confidences must lie in \[0, 1\]"):
        calibration_metrics([1, 0], [0.5, -0.1])


def test_a_table_without_rows_is_its_headers():
    """benchmarks/kernel_kl.py with one implementation has no ratio rows: format_table raised TypeError."""
    from caopd.evaluation.tables import format_table

    assert format_table(["ratio", "value"], [], markdown=True) == "| ratio | value |\n|-------|-------|"
    assert format_table(["a"], [[None], [1.5]]).splitlines()[2:] == ["   n/a", "1.5000"]
