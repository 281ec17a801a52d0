"""How sure an accuracy, or an accuracy drop between two classifiers, is.

:func:`compare_accuracy` compares a candidate (e.g. a mixed-precision policy) with a
reference (e.g. W8A8) on the *same* samples. Because both classify the same samples, the
comparison is paired: only the samples on which exactly one of the two is right carry
information about the difference. It gives

- the drop, ``reference accuracy - candidate accuracy`` in points (positive when the
  candidate is worse);
- a confidence interval of the drop by a paired bootstrap (``scipy.stats.bootstrap`` with
  ``paired=True``, percentile method, seeded): the samples are resampled as pairs;
- an exact McNemar test: under "both are equally accurate" each discordant sample is
  equally likely to favour either, so the count favouring the reference is binomial with
  ``p = 1/2`` over the discordant samples (``scipy.stats.binomtest``, two-sided);
- a verdict on an allowed drop ``max_drop`` (see :attr:`AccuracyComparison.verdict`).

The allowed drop *holds* only when the interval's upper end is at most ``max_drop``: with a
95 % interval that is a one-sided 97.5 % upper confidence bound, so "holds" says that the
data rule out a true drop larger than allowed, not merely that the measured drop is small. A
measured drop within the allowance whose interval reaches past it is "inconclusive".

:func:`accuracy_resolution` states how finely an accuracy measured on ``n`` samples
resolves: one sample is ``100 / n`` points, and the binomial standard error at accuracy
``p`` is ``100 * sqrt(p (1 - p) / n)`` points. Accuracies are in percent throughout, as
:func:`tvm_cim.learn.train.accuracy` gives them; differences are in points.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from tvm_cim.core.errors import CimError

__all__ = ["AccuracyComparison", "Resolution", "compare_accuracy", "accuracy_resolution"]

#: Bootstrap resamples processed per vectorised batch; bounds the memory to about
#: ``batch * n`` bytes per array.
_BATCH = 200


@dataclass(frozen=True)
class AccuracyComparison:
    """A candidate's accuracy against a reference's on the same samples.

    Attributes
    ----------
    n
        Number of samples.
    reference_accuracy, candidate_accuracy
        Accuracies in percent.
    drop
        ``reference_accuracy - candidate_accuracy`` in points.
    low, high
        The drop's confidence interval, in points.
    p_value
        Two-sided exact McNemar p-value of "the two are equally accurate".
    only_reference, only_candidate
        Samples that only the reference, or only the candidate, classifies correctly.
    max_drop
        The allowed drop in points.
    confidence
        Confidence level of the interval (e.g. 0.95).
    """

    n: int
    reference_accuracy: float
    candidate_accuracy: float
    drop: float
    low: float
    high: float
    p_value: float
    only_reference: int
    only_candidate: int
    max_drop: float
    confidence: float

    @property
    def holds(self) -> bool:
        """Whether the interval's upper end is at most the allowed drop."""
        return self.high <= self.max_drop

    @property
    def verdict(self) -> str:
        """``"holds"`` (upper end <= allowed), ``"exceeded"`` (lower end > allowed) or
        ``"inconclusive"`` (the interval contains the allowed drop)."""
        if self.holds:
            return "holds"
        return "exceeded" if self.low > self.max_drop else "inconclusive"

    def to_dict(self) -> dict:
        """Every field and the verdict, JSON-ready."""
        return {**dataclasses.asdict(self), "verdict": self.verdict}

    def describe(self, reference: str = "W8A8") -> str:
        """One line for summaries, e.g. ``97.22 % vs W8A8 98.06 % on 10000 samples: ...``."""
        level = f"{100 * self.confidence:g} %"
        return (
            f"{self.candidate_accuracy:.2f} % vs {reference} {self.reference_accuracy:.2f} % "
            f"on {self.n} samples: drop {self.drop:+.2f} points ({level} CI "
            f"{self.low:+.2f} .. {self.high:+.2f}), McNemar p = {self.p_value:.3g}; "
            f"allowed {self.max_drop:g}: {self.verdict}"
        )


@dataclass(frozen=True)
class Resolution:
    """How finely an accuracy measured on ``n`` samples resolves.

    Attributes
    ----------
    n
        Number of samples.
    accuracy
        The accuracy in percent at which ``stderr`` is taken.
    step
        One sample, in points: ``100 / n``.
    stderr
        Binomial standard error of the accuracy, in points.
    """

    n: int
    accuracy: float
    step: float
    stderr: float

    def describe(self) -> str:
        """One line, e.g. ``500 samples: one sample is 0.20 points; ...``."""
        return (
            f"{self.n} samples: one sample is {self.step:.3g} points; at "
            f"{self.accuracy:.2f} % the standard error is {self.stderr:.3g} points"
        )


def accuracy_resolution(n: int, accuracy: float) -> Resolution:
    """The resolution of an accuracy measured on ``n`` samples.

    Parameters
    ----------
    n
        Number of samples (positive).
    accuracy
        Accuracy in percent, 0 to 100, at which to take the standard error.

    Returns
    -------
    Resolution
        ``step = 100 / n`` and ``stderr = 100 * sqrt(p (1 - p) / n)`` with
        ``p = accuracy / 100``, both in points.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise CimError(f"sample count must be a positive integer, got {n!r}")
    p = _percent(accuracy, "accuracy") / 100.0
    return Resolution(int(n), 100.0 * p, 100.0 / n, 100.0 * math.sqrt(p * (1.0 - p) / n))


def compare_accuracy(
    reference,
    candidate,
    labels=None,
    *,
    max_drop: float = 0.1,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> AccuracyComparison:
    """Compare a candidate's accuracy with a reference's on the same samples.

    Parameters
    ----------
    reference, candidate
        Without ``labels``: per-sample correctness, booleans (or 0/1) of shape ``(n,)``.
        With ``labels``: predicted classes ``(n,)`` or scores ``(n, classes)`` (argmax).
    labels
        True classes ``(n,)``, or None.
    max_drop
        Allowed drop in points (non-negative).
    confidence
        Confidence level of the interval, between 0 and 1.
    n_resamples
        Bootstrap resamples.
    seed
        Seed of the bootstrap; the same inputs and seed give the same interval.

    Returns
    -------
    AccuracyComparison
        Accuracies, drop, interval, McNemar p-value and verdict.

    Raises
    ------
    CimError
        For inputs of different lengths, empty or non-binary correctness, or bad options.
    """
    from scipy import stats

    ref, cand = _correct(reference, candidate, labels)
    max_drop = float(max_drop)
    if not math.isfinite(max_drop) or max_drop < 0:
        raise CimError(f"max_drop must be a non-negative number of points, got {max_drop!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise CimError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise CimError(f"n_resamples must be an integer, got {n_resamples!r}")
    if n_resamples < 100:
        raise CimError(f"n_resamples must be at least 100, got {n_resamples}")

    n = len(ref)
    only_ref = int(np.count_nonzero(ref & ~cand))
    only_cand = int(np.count_nonzero(cand & ~ref))
    drop = 100.0 * (only_ref - only_cand) / n
    discordant = only_ref + only_cand
    if discordant == 0:
        # Every resample then gives the same difference; the test has nothing to count.
        low = high = drop
        p_value = 1.0
    else:
        low, high = _bootstrap_interval(ref, cand, float(confidence), int(n_resamples), seed)
        p_value = float(stats.binomtest(only_ref, discordant, 0.5).pvalue)
    return AccuracyComparison(
        n=n,
        reference_accuracy=100.0 * np.count_nonzero(ref) / n,
        candidate_accuracy=100.0 * np.count_nonzero(cand) / n,
        drop=drop,
        low=low,
        high=high,
        p_value=p_value,
        only_reference=only_ref,
        only_candidate=only_cand,
        max_drop=max_drop,
        confidence=float(confidence),
    )


# ------------------------------------------------------------------------ helpers


def _percent(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CimError(f"{what} must be a percentage, got {value!r}") from None
    if not 0.0 <= v <= 100.0:
        raise CimError(f"{what} must be a percentage from 0 to 100, got {value!r}")
    return v


def _correct(reference, candidate, labels) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample correctness of both classifiers as boolean vectors of one length."""
    pairs = (("reference", reference), ("candidate", candidate))
    if labels is None:
        ref, cand = (_binary(a, name) for name, a in pairs)
    else:
        y = np.asarray(labels)
        if y.ndim != 1:
            raise CimError(f"labels must be a vector, got shape {y.shape}")
        ref, cand = (_hits(a, name, y) for name, a in pairs)
    if len(ref) != len(cand):
        raise CimError(
            f"reference and candidate cover different samples: {len(ref)} against {len(cand)}"
        )
    if len(ref) == 0:
        raise CimError("no samples to compare")
    return ref, cand


def _hits(a, name: str, y: np.ndarray) -> np.ndarray:
    """Whether each of ``a``'s predictions (classes or scores) matches ``y``."""
    v = np.asarray(a)
    if v.ndim not in (1, 2):
        raise CimError(f"{name} predictions must be classes (n,) or scores (n, classes)")
    pred = v.argmax(axis=1) if v.ndim == 2 else v
    if len(pred) != len(y):
        raise CimError(f"{name} has {len(pred)} predictions but labels has {len(y)}")
    return pred == y


def _binary(a, name: str) -> np.ndarray:
    v = np.asarray(a)
    if v.ndim != 1:
        raise CimError(f"{name} correctness must be a vector, got shape {v.shape}")
    if v.dtype != bool and not np.isin(v, (0, 1)).all():
        raise CimError(f"{name} correctness must be booleans or 0/1; pass labels for predictions")
    return v.astype(bool)


def _bootstrap_interval(
    ref: np.ndarray, cand: np.ndarray, confidence: float, n_resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of the drop in points, resampling the samples as pairs."""
    from scipy import stats

    def drop(r, c, axis=-1):
        return 100.0 * (r.mean(axis=axis) - c.mean(axis=axis))

    result = stats.bootstrap(
        (ref.astype(np.int8), cand.astype(np.int8)),
        drop,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        batch=_BATCH,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return float(ci.low), float(ci.high)
