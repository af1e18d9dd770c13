"""Bootstrap intervals, the paired difference and TAX against independent computations."""

import math

import numpy as np
import pytest

from stages.evaluate.intervals import bootstrap_interval, paired_difference, resample_indices, tax, verdict


def test_the_interval_is_the_percentiles_of_a_direct_resampling_loop():
    values = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=float)
    rng = np.random.default_rng(7)  # the same stream, one resample at a time, sorted by hand
    means = sorted(sum(values[rng.integers(0, 10)] for _ in range(10)) / 10 for _ in range(400))
    # numpy's default quantile is linear interpolation between order statistics: at q, position q·(B−1)
    def quantile(q):
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        return means[lo] + (pos - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    low, high = bootstrap_interval(values, resamples=400, seed=7)
    assert low == pytest.approx(quantile(0.025), abs=1e-12)
    assert high == pytest.approx(quantile(0.975), abs=1e-12)


def test_a_large_sample_interval_matches_the_normal_approximation():
    values = (np.random.default_rng(0).random(4000) < 0.3).astype(float)
    p = values.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / values.size)
    low, high = bootstrap_interval(values, resamples=4000, seed=1)
    assert low == pytest.approx(p - half, abs=0.004)
    assert high == pytest.approx(p + half, abs=0.004)


def test_constant_values_give_a_zero_width_interval_and_empty_ones_nan():
    assert bootstrap_interval(np.ones(12)) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([])))


def test_the_paired_interval_resamples_prompts_once_for_both_models():
    base = np.array([0, 1, 0, 0, 1, 0, 1, 0], dtype=float)
    new = np.array([1, 1, 0, 1, 1, 0, 1, 1], dtype=float)
    diff, low, high = paired_difference(base, new, resamples=500, seed=3)
    assert diff == pytest.approx(3 / 8)
    idx = resample_indices(8, 500, 3)
    direct = np.quantile([new[i].mean() - base[i].mean() for i in idx], [0.025, 0.975])
    assert (low, high) == pytest.approx(tuple(direct), abs=1e-12)
    # new never loses a prompt base wins: no resample can give a negative difference
    assert low >= 0


def test_pairing_is_narrower_than_two_independent_intervals_when_prompts_decide_the_score():
    rng = np.random.default_rng(0)
    hard = rng.random(200) < 0.5  # a prompt's difficulty decides both models' answers
    base = (~hard).astype(float)
    new = base.copy()
    new[np.flatnonzero(hard)[:10]] = 1.0  # the new model solves 10 more
    _, low, high = paired_difference(base, new, resamples=2000, seed=0)
    b, n = bootstrap_interval(base, seed=0), bootstrap_interval(new, seed=1)
    assert high - low < 0.5 * ((b[1] - b[0]) + (n[1] - n[0])) / 2
    assert low > 0  # 10 of 200 with no losses: distinguishable


def test_paired_values_must_cover_the_same_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(np.ones(3), np.ones(4))


def test_verdict_words():
    assert verdict(0.01, 0.2).startswith("better")
    assert verdict(-0.2, -0.01).startswith("worse")
    assert verdict(-0.1, 0.1).startswith("not distinguishable")


def test_tax_on_fixed_accuracies():
    sft = {"a": 0.5, "b": 0.8, "c": 0.0}
    # a loses 0.1 of 0.5 (−20%), b gains (counts 0), c is skipped (SFT accuracy 0)
    assert tax({"a": 0.4, "b": 0.9, "c": 0.3}, sft) == pytest.approx(100 / 2 * (-0.2 + 0.0))
    assert tax({"a": 0.5, "b": 0.8}, sft) == 0.0
    assert tax({"a": 0.0, "b": 0.0}, sft) == pytest.approx(-100.0)  # everything forgotten
    assert tax({"c": 0.5}, sft) is None
