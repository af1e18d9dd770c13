"""How far two judges agree on the same candidates: confusion matrix, exact agreement, Cohen's κ.

Pure numpy (no Ray, no I/O), so every number can be checked by hand. The question it answers:
can the verifier, or a cheaper model, stand in for GPT-4 on this data? Exact agreement alone
flatters judges that both give mostly one score; κ discounts the agreement that the two score
distributions would give by chance, and the quadratic-weighted κ counts a 4-vs-5 disagreement
as much milder than a 1-vs-5 one (on a 1-5 scale it is the usual headline number).

A row that either judge left unscored (None / NaN) has no cell in the matrix: `confusion_matrix`
drops it itself, and `agreement` reports how many were dropped (`n_excluded`).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

LABELS = (1, 2, 3, 4, 5)

Weights = Literal["linear", "quadratic"] | None


def _scores(values: Any) -> np.ndarray:
    """float64 scores with NaN where a score is missing (None, NaN, pandas' NA)."""
    try:
        return np.asarray(values, dtype=np.float64).reshape(-1)
    except TypeError:  # an object array mixing numbers and pandas' NA
        return np.array([_score(v) for v in values], dtype=np.float64)


def _score(value: Any) -> float:
    try:
        return float(value)
    except TypeError:  # None, pd.NA
        return float("nan")


def confusion_matrix(a: Sequence[float], b: Sequence[float], labels: Sequence[int] = LABELS) -> np.ndarray:
    """Counts `cm[i, j]` of rows where judge A gave `labels[i]` and judge B gave `labels[j]`.

    Rows = A's score, columns = B's score, `int64`, shape (k, k) with k = len(labels). Rows where
    either score is missing (None/NaN) are excluded here, so a caller may pass the raw columns. A
    present score that is not one of `labels` is an error (a judge broke its 1-5 contract), not
    something to drop silently.
    """
    a, b = _scores(a), _scores(b)
    if a.shape != b.shape:
        raise ValueError(f"the two judges scored different numbers of rows: {a.size} vs {b.size}")
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    index = {float(label): i for i, label in enumerate(labels)}
    outside = sorted({float(v) for v in np.concatenate([a, b]) if float(v) not in index})
    if outside:
        raise ValueError(f"scores {outside[:5]} are not among the labels {list(labels)}")
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(cm, ([index[float(v)] for v in a], [index[float(v)] for v in b]), 1)
    return cm


def exact_agreement(cm: np.ndarray) -> float:
    """p_o = trace(cm) / N: the share of rows both judges scored the same. NaN for N = 0."""
    n = cm.sum()
    return float(np.trace(cm) / n) if n else float("nan")


def disagreement_weights(k: int, weights: Weights = None) -> np.ndarray:
    """The k×k penalty w_ij of a disagreement between label i and label j (0 on the diagonal):
    1 off it (unweighted), |i−j|/(k−1) (linear), (i−j)²/(k−1)² (quadratic)."""
    i, j = np.indices((k, k), dtype=np.float64)
    if weights is None:
        return (i != j).astype(np.float64)
    scale = max(k - 1, 1)
    if weights == "linear":
        return np.abs(i - j) / scale
    if weights == "quadratic":
        return (i - j) ** 2 / scale**2
    raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")


def cohen_kappa(cm: np.ndarray, weights: Weights = None) -> float:
    """Cohen's κ (Cohen, 1960; weighted: Cohen, 1968) from a confusion matrix of counts.

        κ = 1 − Σ_ij w_ij O_ij / Σ_ij w_ij E_ij,   E = outer(row marginals, column marginals) / N

    O = the observed counts, E = the counts expected if the two judges scored independently with
    their own score distributions, w from `disagreement_weights` (0 on the diagonal). Unweighted,
    this is the familiar (p_o − p_e) / (1 − p_e). κ = 1: perfect agreement; 0: no better than
    chance; < 0: worse than chance. Symmetric in the two judges (w is symmetric, and transposing
    O transposes E).

    Degenerate case: when E has no mass off the diagonal (Σ w E = 0) the ratio is 0/0. That
    happens exactly when both judges give every row one and the same score (or N = 0): they
    agree, but chance would agree as much, so κ is undefined and this returns NaN (as sklearn's
    `cohen_kappa_score` does), never a flattering 1.0. Report exact agreement beside it.
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n == 0:
        return float("nan")
    w = disagreement_weights(cm.shape[0], weights)
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    chance = float((w * expected).sum())
    if chance == 0.0:
        return float("nan")
    return float(1.0 - (w * cm).sum() / chance)


def agreement(a_scores: Sequence[float], b_scores: Sequence[float], labels: Sequence[int] = LABELS) -> dict[str, Any]:
    """Everything `compare-judges` reports about judges A and B, as JSON-ready values.

    `a_scores[i]` and `b_scores[i]` score the same candidate. Keys: `n` (rows both judges scored),
    `n_excluded` (rows either left unscored), `unscored_a`, `unscored_b`, `exact`, `kappa`,
    `kappa_linear`, `kappa_quadratic`, `mean_a`, `mean_b` (over the same `n` rows, so the two
    are comparable), `labels`, `confusion` (list of lists, rows A, columns B). A value that is
    undefined (no rows; κ when both judges are one constant) is None.
    """
    a, b = _scores(a_scores), _scores(b_scores)
    cm = confusion_matrix(a, b, labels)
    both = ~(np.isnan(a) | np.isnan(b))

    def num(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    return {
        "n": int(cm.sum()),
        "n_excluded": int((~both).sum()),
        "unscored_a": int(np.isnan(a).sum()),
        "unscored_b": int(np.isnan(b).sum()),
        "exact": num(exact_agreement(cm)),
        "kappa": num(cohen_kappa(cm)),
        "kappa_linear": num(cohen_kappa(cm, "linear")),
        "kappa_quadratic": num(cohen_kappa(cm, "quadratic")),
        "mean_a": float(a[both].mean()) if both.any() else None,
        "mean_b": float(b[both].mean()) if both.any() else None,
        "labels": [int(label) for label in labels],
        "confusion": cm.tolist(),
    }
