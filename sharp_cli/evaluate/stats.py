"""Uncertainty of the eval table: spread over seeds and paired bootstrap intervals (numpy only).

A difference between two methods is measured on the same questions, so its interval resamples
questions, not answers: one bootstrap resample draws n of the n questions with replacement and
takes the mean of the per-question differences (method A's correctness minus method B's, each
already averaged over that method's seeds). The same draw serves both methods, which is what makes
the interval paired: questions both methods get right (or wrong) add nothing to its width. The 95%
interval is the 2.5th and 97.5th percentile of the resampled means (numpy's linear interpolation).
docs/eval.md explains how to read it.
"""

from __future__ import annotations

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0  # the bootstrap's own generator: the same results file gives the same table
LEVEL = 0.95
_CHUNK = 256  # resamples drawn at a time: a (chunk, n) index array, not (resamples, n)


def spread(values: list[float]) -> dict:
    """{"mean", "min", "max", "std"} of per-seed accuracies; std is the sample standard deviation
    (ddof 1), None with fewer than two seeds."""
    if not values:
        return {"mean": None, "min": None, "max": None, "std": None}
    x = np.asarray(values, dtype=np.float64)
    return {"mean": float(x.mean()), "min": float(x.min()), "max": float(x.max()),
            "std": float(x.std(ddof=1)) if x.size > 1 else None}


def resample_indices(n: int, resamples: int, seed: int = DEFAULT_SEED):
    """Yield (chunk, n) arrays of question indices drawn with replacement, `resamples` rows in all.
    The same (n, resamples, seed) always gives the same draws, so every comparison over the same
    questions uses the same resamples."""
    rng = np.random.default_rng(seed)
    left = resamples
    while left > 0:
        size = min(_CHUNK, left)
        yield rng.integers(0, n, size=(size, n))
        left -= size


def interval(differences, indices, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of the mean of `differences` (n,) over the resamples in
    `indices`, an iterable of (rows, n) index arrays."""
    d = np.asarray(differences, dtype=np.float64)
    means = np.concatenate([d[idx].mean(axis=1) for idx in indices])
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_difference(a, b, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                      level: float = LEVEL) -> dict | None:
    """Mean of a - b over paired questions with its bootstrap interval.

    a, b: (n,) per-question scores in [0, 1] of two methods on the same n questions (correctness
    averaged over seeds). Returns {"difference", "low", "high", "significant", "questions"}, where
    significant means the interval leaves 0 out; the interval is None with resamples=0. None when
    there is no question."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two (n,) arrays, got {a.shape} and {b.shape}")
    if a.size == 0:
        return None
    d = a - b
    out = {"difference": float(d.mean()), "low": None, "high": None, "significant": None, "questions": int(d.size)}
    if resamples > 0:
        if np.all(d == d[0]):  # every resample gives d[0]; spares the draws and float rounding
            low = high = float(d[0])
        else:
            low, high = interval(d, resample_indices(d.size, resamples, seed), level)
        out.update(low=low, high=high, significant=bool(low > 0 or high < 0))
    return out


def paired_ratio(a, b, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                 level: float = LEVEL) -> dict | None:
    """mean(a) / mean(b) over paired questions with its bootstrap interval: the share of a
    reference's accuracy (b) that a method (a) keeps. Each resample draws the same questions for
    both; a resample whose b-mean is 0 has no ratio and is left out. None without questions or with
    mean(b) == 0; low/high None with resamples=0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two (n,) arrays, got {a.shape} and {b.shape}")
    if a.size == 0 or b.mean() == 0:
        return None
    out = {"ratio": float(a.mean() / b.mean()), "low": None, "high": None, "questions": int(a.size)}
    if resamples > 0:
        ratios = []
        for idx in resample_indices(a.size, resamples, seed):
            num, den = a[idx].mean(axis=1), b[idx].mean(axis=1)
            ratios.append(num[den > 0] / den[den > 0])
        tail = (1.0 - level) / 2
        low, high = np.quantile(np.concatenate(ratios), [tail, 1.0 - tail])
        out.update(low=float(low), high=float(high))
    return out
