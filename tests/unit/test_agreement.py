"""Judge agreement against hand computations, a published example and a second implementation."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from stages.judge.agreement import agreement, cohen_kappa, confusion_matrix, disagreement_weights, exact_agreement

# 3 labels, 15 rows; rows = judge A, columns = judge B.
#          B=1 B=2 B=3 | row marginal r
#   A=1     4   1   0  |  5
#   A=2     1   3   1  |  5
#   A=3     0   2   3  |  5
#   col c   5   6   4  | N = 15
HAND_3X3 = np.array([[4, 1, 0], [1, 3, 1], [0, 2, 3]])


def _rows_of(cm: np.ndarray, labels=(1, 2, 3)) -> tuple[list[int], list[int]]:
    """Per-row scores (a, b) that give the confusion matrix `cm`."""
    a, b = [], []
    for i, j in np.ndindex(cm.shape):
        a += [labels[i]] * int(cm[i, j])
        b += [labels[j]] * int(cm[i, j])
    return a, b


def test_unweighted_kappa_of_a_3x3_table_worked_by_hand():
    # p_o = (4 + 3 + 3) / 15 = 2/3
    # p_e = Σ_i r_i c_i / N² = (5·5 + 5·6 + 5·4) / 225 = 75/225 = 1/3
    # κ = (p_o − p_e) / (1 − p_e) = (1/3) / (2/3) = 1/2
    p_o, p_e = Fraction(2, 3), Fraction(1, 3)
    assert exact_agreement(HAND_3X3) == pytest.approx(float(p_o), abs=1e-15)
    assert cohen_kappa(HAND_3X3) == pytest.approx(float((p_o - p_e) / (1 - p_e)), abs=1e-15)
    assert cohen_kappa(HAND_3X3) == pytest.approx(0.5, abs=1e-15)


def test_quadratic_and_linear_kappa_of_the_3x3_table_worked_by_hand():
    # E = outer(r, c) / N: every row is [5·5, 5·6, 5·4] / 15 = [5/3, 2, 4/3].
    # Quadratic weights, k = 3: w = (i−j)²/(k−1)² → 1/4 for neighbours, 1 for 1-vs-3.
    #   Σ w O = 1/4 · (O12 + O21 + O23 + O32) + 1 · (O13 + O31) = 1/4 · (1 + 1 + 1 + 2) + 0 = 5/4
    #   Σ w E = 1/4 · (2 + 5/3 + 4/3 + 2) + 1 · (4/3 + 5/3) = 7/4 + 3 = 19/4
    #   κ_q = 1 − (5/4) / (19/4) = 14/19
    # Linear weights: w = |i−j|/(k−1) → 1/2 for neighbours, 1 for 1-vs-3.
    #   Σ w O = 5/2;  Σ w E = 7/2 + 3 = 13/2;  κ_l = 1 − 5/13 = 8/13
    assert cohen_kappa(HAND_3X3, "quadratic") == pytest.approx(float(Fraction(14, 19)), abs=1e-15)
    assert cohen_kappa(HAND_3X3, "linear") == pytest.approx(float(Fraction(8, 13)), abs=1e-15)
    # the same numbers from per-row scores, through `agreement`
    result = agreement(*_rows_of(HAND_3X3), labels=(1, 2, 3))
    assert result["confusion"] == HAND_3X3.tolist()
    assert (result["n"], result["n_excluded"]) == (15, 0)
    assert result["exact"] == pytest.approx(2 / 3) and result["kappa"] == pytest.approx(0.5)
    assert result["kappa_quadratic"] == pytest.approx(14 / 19) and result["kappa_linear"] == pytest.approx(8 / 13)
    # means: A = (5·1 + 5·2 + 5·3)/15 = 2; B = (5·1 + 6·2 + 4·3)/15 = 29/15
    assert result["mean_a"] == pytest.approx(2.0) and result["mean_b"] == pytest.approx(29 / 15)


def test_the_textbook_example_gives_its_published_kappa():
    # Wikipedia, "Cohen's kappa", simple example: 50 grant proposals, two readers, yes/no.
    # Both yes 20, A yes B no 5, A no B yes 10, both no 15: p_o = 0.7, p_e = 0.5, κ = 0.4.
    cm = np.array([[20, 5], [10, 15]])
    assert exact_agreement(cm) == pytest.approx(0.7, abs=1e-15)
    assert cohen_kappa(cm) == pytest.approx(0.4, abs=1e-15)
    # with two labels every disagreement is the maximal one: all weightings agree
    assert cohen_kappa(cm, "linear") == pytest.approx(0.4, abs=1e-15)
    assert cohen_kappa(cm, "quadratic") == pytest.approx(0.4, abs=1e-15)


def test_kappa_is_symmetric_in_the_two_judges():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cm = rng.integers(0, 9, size=(5, 5))
        for weights in (None, "linear", "quadratic"):
            assert cohen_kappa(cm, weights) == pytest.approx(cohen_kappa(cm.T, weights), abs=1e-12)
    a, b = rng.integers(1, 6, 200), rng.integers(1, 6, 200)
    ab, ba = agreement(a, b), agreement(b, a)
    assert ab["confusion"] == np.array(ba["confusion"]).T.tolist()
    for key in ("n", "exact", "kappa", "kappa_linear", "kappa_quadratic"):
        assert ab[key] == pytest.approx(ba[key], abs=1e-12)
    assert (ab["mean_a"], ab["mean_b"]) == (ba["mean_b"], ba["mean_a"])


def test_perfect_agreement_gives_kappa_one():
    scores = [1, 2, 2, 3, 4, 5, 5, 5]
    result = agreement(scores, scores)
    assert result["exact"] == result["kappa"] == result["kappa_quadratic"] == 1.0
    assert cohen_kappa(np.diag([3, 0, 1, 0, 7])) == 1.0


def test_judges_that_score_independently_get_kappa_zero():
    # O = outer(r, c) / N exactly, so O = E and every weighting gives 0
    cm = np.outer([1, 2, 3], [2, 1, 1])  # r = (4, 8, 12), c = (12, 6, 6), N = 24
    expected = np.outer(cm.sum(1), cm.sum(0)) / cm.sum()
    np.testing.assert_array_equal(cm, expected)
    for weights in (None, "linear", "quadratic"):
        assert cohen_kappa(cm, weights) == pytest.approx(0.0, abs=1e-15)


def test_two_constant_judges_give_an_undefined_kappa_not_a_flattering_one():
    # Both always say 3: p_o = 1 but p_e = 1 too, κ = 0/0 → NaN (None in `agreement`).
    cm = np.zeros((5, 5), dtype=int)
    cm[2, 2] = 7
    for weights in (None, "linear", "quadratic"):
        assert math.isnan(cohen_kappa(cm, weights))
    result = agreement([3] * 7, [3] * 7)
    assert result["exact"] == 1.0 and result["kappa"] is None and result["kappa_quadratic"] is None
    # Constant but different (A always 3, B always 5): E = O, one off-diagonal cell, κ = 0.
    assert agreement([3] * 7, [5] * 7)["kappa"] == 0.0
    # No rows at all: nothing is defined.
    empty = agreement([None, 2], [4, float("nan")])
    assert empty["n"] == 0 and empty["n_excluded"] == 2
    assert empty["exact"] is None and empty["kappa"] is None and empty["mean_a"] is None


def test_rows_either_judge_left_unscored_are_excluded_and_counted():
    a = [5, None, 3, float("nan"), 1, 2]
    b = [5, 4, None, float("nan"), 2, 2]
    cm = confusion_matrix(a, b)
    assert cm.sum() == 3 and cm[4, 4] == 1 and cm[0, 1] == 1 and cm[1, 1] == 1  # rows A, columns B
    result = agreement(a, b)
    assert (result["n"], result["n_excluded"], result["unscored_a"], result["unscored_b"]) == (3, 3, 2, 2)
    assert result["mean_a"] == pytest.approx((5 + 1 + 2) / 3) and result["mean_b"] == pytest.approx(3.0)
    import pandas as pd  # nullable pandas columns, as judged tables come back

    nullable = agreement(pd.Series(a, dtype="Float64"), pd.array([5, 4, None, None, 2, 2], dtype="Int64"))
    assert nullable["confusion"] == result["confusion"]


def test_a_score_outside_the_labels_is_an_error_not_dropped():
    with pytest.raises(ValueError, match=r"scores \[0.0, 6.0\] are not among the labels"):
        confusion_matrix([1, 0, 2], [6, 1, 2])
    with pytest.raises(ValueError, match="different numbers of rows"):
        confusion_matrix([1, 2], [1])


def _kappa_pairwise(a: list[int], b: list[int], weights, k: int = 5) -> float:
    """κ without a matrix: Σ w O / N is the mean penalty over items; Σ w E / N is the mean penalty
    over every (item i of A, item j of B) pair, since E / N is the product of the two marginals."""
    def w(x: int, y: int) -> float:
        if weights is None:
            return float(x != y)
        d = abs(x - y) / (k - 1)
        return d if weights == "linear" else d * d

    n = len(a)
    observed = sum(w(x, y) for x, y in zip(a, b)) / n
    chance = sum(w(x, y) for x in a for y in b) / (n * n)
    return 1.0 - observed / chance


def test_kappa_matches_an_item_by_item_implementation_on_random_scores():
    rng = random.Random(1)
    for trial in range(10):
        n = rng.randint(5, 120)
        a = [rng.randint(1, 5) for _ in range(n)]
        b = [x if rng.random() < 0.5 else rng.randint(1, 5) for x in a]  # correlated, not equal
        if len(set(a)) == len(set(b)) == 1:
            continue
        cm = confusion_matrix(a, b)
        assert exact_agreement(cm) == pytest.approx(sum(x == y for x, y in zip(a, b)) / n, abs=1e-12)
        for weights in (None, "linear", "quadratic"):
            assert cohen_kappa(cm, weights) == pytest.approx(_kappa_pairwise(a, b, weights), abs=1e-12), (trial, weights)


def test_disagreement_weights_are_zero_on_the_diagonal_and_one_at_the_far_corner():
    for weights in (None, "linear", "quadratic"):
        w = disagreement_weights(5, weights)
        assert np.all(np.diag(w) == 0) and w[0, 4] == w[4, 0] == 1.0
    assert disagreement_weights(5, "linear")[0, 1] == 0.25 and disagreement_weights(5, "quadratic")[0, 2] == 0.25
    with pytest.raises(ValueError, match="weights must be"):
        disagreement_weights(5, "cubic")  # type: ignore[arg-type]
