"""Paired accuracy comparison: McNemar against hand counts, bootstrap coverage, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tvm_cim.core.errors import CimError
from tvm_cim.learn.confidence import accuracy_resolution, compare_accuracy

pytest.importorskip("scipy")


def _pairs(both: int, only_ref: int, only_cand: int, neither: int, seed: int = 0):
    """Correctness vectors with the given 2x2 table, in a shuffled order."""
    ref = np.array([1] * both + [1] * only_ref + [0] * only_cand + [0] * neither, dtype=bool)
    cand = np.array([1] * both + [0] * only_ref + [1] * only_cand + [0] * neither, dtype=bool)
    order = np.random.default_rng(seed).permutation(len(ref))
    return ref[order], cand[order]


def _exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value summed by hand from the binomial(b + c, 1/2) law."""
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_small_table_by_hand():
    ref, cand = _pairs(both=10, only_ref=7, only_cand=1, neither=2)
    r = compare_accuracy(ref, cand, max_drop=0.1, n_resamples=999)
    assert (r.n, r.only_reference, r.only_candidate) == (20, 7, 1)
    assert r.reference_accuracy == pytest.approx(85.0)
    assert r.candidate_accuracy == pytest.approx(55.0)
    assert r.drop == pytest.approx(30.0)
    # 2 * P(X <= 1) for X ~ Binomial(8, 1/2) = 2 * 9 / 256.
    assert r.p_value == pytest.approx(18 / 256)
    assert r.low <= r.drop <= r.high
    assert r.verdict == "exceeded" and not r.holds


@pytest.mark.parametrize("b, c", [(12, 5), (5, 12), (3, 0), (40, 40)])
def test_mcnemar_matches_the_binomial_sum(b, c):
    ref, cand = _pairs(both=50, only_ref=b, only_cand=c, neither=10)
    r = compare_accuracy(ref, cand, n_resamples=999)
    assert r.p_value == pytest.approx(_exact_mcnemar(b, c), rel=1e-9)


def test_identical_classifiers():
    ref, _ = _pairs(both=90, only_ref=0, only_cand=0, neither=10)
    r = compare_accuracy(ref, ref.copy(), max_drop=0.0)
    assert (r.drop, r.low, r.high, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert r.holds and r.verdict == "holds"
    assert r.reference_accuracy == r.candidate_accuracy == pytest.approx(90.0)


def test_interval_matches_the_normal_approximation():
    """On many samples the bootstrap interval is close to drop +- z * paired standard error."""
    n, b, c = 4000, 80, 40
    ref, cand = _pairs(both=3600, only_ref=b, only_cand=c, neither=n - 3600 - b - c)
    r = compare_accuracy(ref, cand, n_resamples=2999, seed=1)
    d = (b - c) / n
    se = 100 * math.sqrt(((b + c) / n - d * d) / n)
    assert r.drop == pytest.approx(1.0)
    assert r.low == pytest.approx(r.drop - 1.96 * se, abs=0.06)
    assert r.high == pytest.approx(r.drop + 1.96 * se, abs=0.06)


def test_interval_covers_the_true_drop_in_most_trials():
    """Samples drawn with a known 2-point drop: the 95 % interval covers it in most trials."""
    rng = np.random.default_rng(7)
    p_only_ref, p_only_cand, p_both = 0.05, 0.03, 0.85
    true_drop = 100 * (p_only_ref - p_only_cand)
    trials, covered = 40, 0
    for t in range(trials):
        cell = rng.choice(4, size=500, p=[p_both, p_only_ref, p_only_cand, 0.07])
        ref, cand = np.isin(cell, (0, 1)), np.isin(cell, (0, 2))
        r = compare_accuracy(ref, cand, n_resamples=999, seed=t)
        covered += r.low <= true_drop <= r.high
    assert covered >= 34, covered


def test_bootstrap_is_seeded():
    ref, cand = _pairs(both=300, only_ref=20, only_cand=9, neither=30)
    a = compare_accuracy(ref, cand, n_resamples=999, seed=3)
    assert a == compare_accuracy(ref, cand, n_resamples=999, seed=3)


def test_predictions_and_scores_give_the_same_comparison():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=300)
    ref_pred = np.where(rng.random(300) < 0.9, labels, (labels + 1) % 10)
    cand_pred = np.where(rng.random(300) < 0.85, labels, (labels + 3) % 10)
    by_correct = compare_accuracy(ref_pred == labels, cand_pred == labels, n_resamples=999)
    assert compare_accuracy(ref_pred, cand_pred, labels, n_resamples=999) == by_correct
    scores = np.eye(10)[cand_pred] + 0.01 * rng.random((300, 10))
    assert compare_accuracy(ref_pred, scores, labels, n_resamples=999) == by_correct


def test_verdicts_and_description():
    # A candidate 2 points better: the interval lies below any non-negative allowance.
    ref, cand = _pairs(both=8000, only_ref=100, only_cand=300, neither=1600)
    better = compare_accuracy(ref, cand, max_drop=0.1, n_resamples=999)
    assert better.drop == pytest.approx(-2.0) and better.high < 0 and better.verdict == "holds"
    # A measured drop of 0.05 points whose interval reaches past 0.1.
    ref, cand = _pairs(both=8000, only_ref=55, only_cand=50, neither=1895)
    close = compare_accuracy(ref, cand, max_drop=0.1, n_resamples=999)
    assert close.drop == pytest.approx(0.05)
    assert close.low < 0.1 < close.high and close.verdict == "inconclusive" and not close.holds
    line = close.describe()
    assert "\n" not in line
    assert line.startswith("80.50 % vs W8A8 80.55 % on 10000 samples: drop +0.05 points")
    assert "95 % CI" in line and line.endswith("allowed 0.1: inconclusive")
    assert close.describe("FP32").startswith("80.50 % vs FP32")


def test_bad_inputs():
    ref, cand = _pairs(both=8, only_ref=1, only_cand=1, neither=0)
    with pytest.raises(CimError, match="different samples: 10 against 9"):
        compare_accuracy(ref, cand[:9])
    with pytest.raises(CimError, match="booleans or 0/1"):
        compare_accuracy(np.array([0, 2, 1]), np.array([1, 1, 0]))
    with pytest.raises(CimError, match="candidate has 2 predictions but labels has 3"):
        compare_accuracy([0, 1, 2], [0, 1], [0, 1, 2])
    with pytest.raises(CimError, match="no samples"):
        compare_accuracy([], [])
    with pytest.raises(CimError, match="max_drop"):
        compare_accuracy(ref, cand, max_drop=-0.1)
    with pytest.raises(CimError, match="confidence"):
        compare_accuracy(ref, cand, confidence=95)
    with pytest.raises(CimError, match="n_resamples"):
        compare_accuracy(ref, cand, n_resamples=10)


def test_accuracy_resolution():
    small = accuracy_resolution(500, 98.0)
    assert small.step == pytest.approx(0.2)
    assert small.stderr == pytest.approx(100 * math.sqrt(0.98 * 0.02 / 500))
    large = accuracy_resolution(10_000, 98.0)
    assert large.step == pytest.approx(0.01) and large.stderr == pytest.approx(0.14)
    assert accuracy_resolution(180, 100.0).stderr == 0.0
    assert large.describe() == (
        "10000 samples: one sample is 0.01 points; at 98.00 % the standard error is 0.14 points"
    )
    for n, acc in ((0, 50.0), (1.5, 50.0), (True, 50.0), (100, 101.0), (100, "high")):
        with pytest.raises(CimError):
            accuracy_resolution(n, acc)
