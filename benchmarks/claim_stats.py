"""The statistics behind `make claims`' verdicts (issue 25): tests, a multiple-comparison correction, the smallest
difference a test can detect, a bootstrap interval for the share of fine-tuning's gain, and the verdict rule.

Every rule here is checked in tests/test_claim_stats.py against hand-computed cases and by a simulation under the
null (both arms drawn from one distribution), which shows its false-positive rate at or below its nominal level;
the old page's rule ("a difference larger than the larger half-range of two seeds") is simulated there too.

    comparisons = [Comparison("MLM masked acc", dense=(12.1, 12.5, ...), moe=(12.9, ...))]
    adjusted = holm([welch(c.dense, c.moe) for c in comparisons])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8


def welch(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sided p-value of Welch's t-test of equal means (unequal variances). Arms without any spread (up to
    rounding): 1.0 when their means are equal, 0.0 when not."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least 2 values per arm, got {len(a)} and {len(b)}")
    if _constant(a) and _constant(b):  # also equal up to rounding (means of equal metrics)
        return 1.0 if math.isclose(a.mean(), b.mean(), rel_tol=1e-9, abs_tol=1e-9) else 0.0
    with warnings.catch_warnings():  # one arm without spread: scipy warns of precision, its variance is just 0
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _constant(x: np.ndarray) -> bool:
    return float(np.ptp(x)) <= 1e-9 * max(1.0, float(np.abs(x).max()))


def permutation(a: Sequence[float], b: Sequence[float]) -> float:
    """The exact two-sided p-value of the difference of means over every split of the pooled values into arms of
    these sizes (the smallest possible p is 2 / C(n_a + n_b, n_a): 0.33 with 2 seeds an arm, 0.008 with 5)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    result = stats.permutation_test((a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
                                    permutation_type="independent", alternative="two-sided", n_resamples=np.inf,
                                    vectorized=True)
    return float(min(1.0, result.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (in the given order): the family-wise error of rejecting every adjusted
    p below alpha is at most alpha, whatever the dependence between the tests."""
    order = np.argsort(pvalues, kind="stable")
    m, adjusted, running = len(pvalues), [0.0] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def detectable_difference(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA, power: float = POWER,
                          tests: int = 1) -> float:
    """The smallest true difference of means that a two-sided test at ``alpha`` (Bonferroni over ``tests``, the
    bound Holm's first step uses) detects with probability ``power``, given the arms' sizes and their pooled
    spread (a t approximation): the power a verdict of "not resolved" states."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = len(a), len(b)
    sd = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    df = na + nb - 2
    return float((stats.t.ppf(1 - alpha / (2 * tests), df) + stats.t.ppf(power, df)) * sd * math.sqrt(1 / na + 1 / nb))


def verdict(difference: float, adjusted_p: float, detectable: float, expected_sign: int, alpha: float = ALPHA) -> str:
    """The page's verdict on one claim: "agrees" or "does not agree (significant)" when the corrected test rejects
    equality (by the sign of our ``difference`` against the papers' ``expected_sign``, +1 or -1), else "not resolved
    at this power" with the difference the test would have detected."""
    if adjusted_p < alpha:
        return "agrees" if np.sign(difference) == expected_sign else "does not agree (significant)"
    return f"not resolved at this power (detectable: {detectable:.2g})"


def share_interval(zero: np.ndarray, tuned: np.ndarray, full: np.ndarray, *, resamples: int = 2000,
                   level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """The share of fine-tuning's gain that tuning recovers, (tuned - zero) / (full - zero) of the mean metric,
    and its percentile bootstrap interval over test samples and seeds.

    Args:
        zero: the zero-shot model's per-sample metric (n,) (e.g. 1 for a correct answer), one model.
        tuned: the tuned runs' (seeds, n), one row per seed (each its own subset); the same n test samples.
        full: the fine-tuned runs' (seeds', n).
        resamples: bootstrap draws: each draws the seeds of each arm with replacement, then the test samples with
            replacement (the same samples for the three arms: they are paired).

    Returns:
        The estimate on the data as it is, and the interval's bounds. Resampling the seeds as well as the samples
        counts the samples' noise within each seed's mean twice, so the interval errs wide (up to sqrt(2)). A draw
        where fine-tuning gains nothing has no share and is left out; where more draws than the interval's tail
        are such (fine-tuning's gain itself is not significant), or the data's own gain is not positive, the
        interval is unbounded, (-inf, inf): a share of nothing is not estimated.
    """
    zero, tuned, full = np.asarray(zero, float), np.atleast_2d(tuned).astype(float), np.atleast_2d(full).astype(float)
    n = zero.shape[0]
    if tuned.shape[1] != n or full.shape[1] != n:
        raise ValueError(f"the arms must score the same {n} test samples")
    estimate = _share(zero.mean(), tuned.mean(), full.mean())
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, n, (resamples, n))
    tuned_seeds = rng.integers(0, tuned.shape[0], (resamples, tuned.shape[0]))
    full_seeds = rng.integers(0, full.shape[0], (resamples, full.shape[0]))
    z = zero[samples].mean(axis=1)
    t = np.stack([tuned[s][:, i].mean() for s, i in zip(tuned_seeds, samples, strict=True)])
    f = np.stack([full[s][:, i].mean() for s, i in zip(full_seeds, samples, strict=True)])
    gain = f - z
    tail = 100 * (1 - level) / 2
    if full.mean() <= zero.mean() or 100 * np.mean(gain <= 0) > tail:  # the gain itself is not significant
        return estimate, -math.inf, math.inf
    low, high = np.percentile((t - z)[gain > 0] / gain[gain > 0], [tail, 100 - tail])
    return estimate, float(low), float(high)


def _share(zero: float, tuned: float, full: float) -> float:
    return float("nan") if full == zero else (tuned - zero) / (full - zero)
