"""Distinct-n: the share of n-grams in a model's generations that are unique (METHODS.md
"Metrics"; seed 000 reports it to show RoPO keeps the diversity DPO loses).

    distinct-n = |unique n-grams| / |n-grams|, pooled over all generations

on whitespace-separated words, so models with different tokenizers are comparable. A pure
function of the texts.
"""

from __future__ import annotations

from collections.abc import Iterable


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams over all n-grams of `texts` (0.0 when there are none)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct(texts: list[str], max_n: int = 4) -> dict[str, float]:
    """distinct-1 … distinct-`max_n` under the names the summaries use."""
    return {f"distinct_{n}": distinct_n(texts, n) for n in range(1, max_n + 1)}
