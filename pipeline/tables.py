"""The report's cells and labels: numbers as text, markdown tables, and the words for scenarios,
methods and models, shared by every section."""

from __future__ import annotations

from typing import Any

from pipeline.config import SCENARIO_SOURCES

# who writes a side of a pair, in the words of the scenario names
SOURCE_NAMES = {"policy": "policy", "reference": "solution", "other": "other model"}


def method_label(train: Any) -> str:
    """What trains a variant, in a few letters: the objective (`dpo`), or `ogd` for the OGD update
    rule (its objective is only logged), with `+ ropo` when RoPO is the parameterisation."""
    label = "ogd" if train.update.type == "ogd" else train.method.type
    return f"{label} + ropo" if train.parameterisation.type == "ropo" else label


def num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def count(value: Any) -> str:
    return "-" if value is None else str(value)


def pp(share: float | None) -> str:
    """A difference of two shares in percentage points."""
    return "-" if share is None else f"{100 * share:+.1f} pp"


def usd(cost: float) -> str:
    return f"${cost:,.2f}" if cost >= 1 else f"${cost:.4f}" if cost >= 0.01 else f"${cost:.6f}"


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """`align`: one "l" or "r" per column."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]  # fmt: skip


def sides(k: int) -> str:
    """`solution × policy`: who writes chosen × rejected in scenario k."""
    return " × ".join(SOURCE_NAMES[source] for source in SCENARIO_SOURCES[k])


def scenario_name(k: int) -> str:
    return f"{k}: {sides(k)}"



def interval(value: float | None, ci: list[float] | None, fmt: str = ".1%") -> str:
    """`51.6% [39.1%, 64.1%]`: a number and its 95% interval."""
    if value is None:
        return "-"
    return f"{value:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def pp_interval(diff: float | None, low: float | None = None, high: float | None = None) -> str:
    """`+23.4 pp [+12.5, +34.4]`: a difference of shares in percentage points, with its interval."""
    if diff is None:
        return "-"
    return pp(diff) + (f" [{100 * low:+.1f}, {100 * high:+.1f}]" if low is not None else "")
