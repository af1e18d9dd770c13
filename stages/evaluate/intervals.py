"""How sure is a held-out number? Bootstrap intervals, the paired difference, and TAX.

On 64 prompts one answer is 1.6 points of "4&5 points", and a 95% interval on a share near 50%
is about ±12 points: a table of point estimates invites reading noise. Every share in the report
carries a percentile-bootstrap interval (Efron & Tibshirani 1993, §13): resample the prompts with
replacement B times, recompute the share, take the 2.5% and 97.5% quantiles. A base-vs-checkpoint
difference is *paired*: both models answered the same prompts, so each resample draws prompt
indices once and takes the difference of the two shares on them, which cancels the prompts'
own difficulty and gives a much narrower interval than two independent ones would.

Forgetting is the alignment tax of seed 001 §3:
    TAX = 100/|T| · Σ_i min(0, (T_i(θ) − T_i(θ_SFT)) / T_i(θ_SFT)),
a mean relative loss in percent (0 = nothing forgotten; gains do not offset losses).

Pure functions over numpy arrays: no Ray, no I/O.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

LEVEL = 0.95


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) prompt indices drawn with replacement, reproducible by seed."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _quantiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_interval(values: np.ndarray, resamples: int = 2000, seed: int = 0,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (0/1 indicators give a share)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    stats = values[resample_indices(values.size, resamples, seed)].mean(axis=1)
    return _quantiles(stats, level)


def paired_difference(base: np.ndarray, new: np.ndarray, resamples: int = 2000, seed: int = 0,
                      level: float = LEVEL) -> tuple[float, float, float]:
    """mean(new) − mean(base) over the same prompts (row i of both is prompt i), and its paired
    percentile-bootstrap interval: (difference, low, high)."""
    base, new = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if base.shape != new.shape:
        raise ValueError(f"paired values need the same prompts, got {base.shape} and {new.shape}")
    if base.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = resample_indices(base.size, resamples, seed)
    stats = new[idx].mean(axis=1) - base[idx].mean(axis=1)
    return (float(new.mean() - base.mean()), *_quantiles(stats, level))


def verdict(low: float, high: float) -> str:
    """The interval of a difference, in words."""
    if low > 0:
        return "better (the 95% interval excludes 0)"
    if high < 0:
        return "worse (the 95% interval excludes 0)"
    return "not distinguishable from noise (the 95% interval includes 0)"


def tax(accuracy: Mapping[str, float], sft_accuracy: Mapping[str, float]) -> float | None:
    """TAX in percent over the tasks both have, skipping tasks the SFT model scores 0 on (the
    relative change is undefined there); None when no task is left."""
    tasks = [t for t in accuracy if sft_accuracy.get(t)]
    if not tasks:
        return None
    return 100.0 / len(tasks) * sum(min(0.0, (accuracy[t] - sft_accuracy[t]) / sft_accuracy[t]) for t in tasks)
