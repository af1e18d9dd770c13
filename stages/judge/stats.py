"""What the judge stage's manifest and the report say about a judged table: how many rows got a
score, why the others did not, and for an API judge what it cost. Pure pandas, no Ray."""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.config import JudgePrices


def reason_kind(reason: str) -> str:
    """`unparseable: "I cannot…"` → `unparseable`; `http 500 after 6 tries` stays as it is."""
    return str(reason).split(":", 1)[0]


def judge_stats(frame: pd.DataFrame, prices: JudgePrices | None = None) -> dict[str, Any]:
    """Counts over the judged rows. `score` is null for a row the judge could not score.

    API judges add `judge_tries` (requests sent for the row this time; 0 for a cache hit),
    `judge_cached` and the token counts of the request that produced the score; tokens and cost
    are summed over this run's requests only (a cache hit costs nothing)."""
    scored = frame["score"].notna()
    stats: dict[str, Any] = {
        "rows": len(frame),
        "scored": int(scored.sum()),
        "unscored": int((~scored).sum()),
        "score_counts": {int(k): int(v) for k, v in frame.loc[scored, "score"].astype(int).value_counts().sort_index().items()},
        "unscored_reasons": {k: int(v) for k, v in frame.loc[~scored, "score_reason"].map(reason_kind).value_counts().items()},
    }
    if "judge_tries" in frame:
        fresh = ~frame["judge_cached"].astype(bool)
        tries = frame["judge_tries"].astype(int)
        stats |= {
            "requests": int(tries.sum()),
            "retried": int((tries > 1).sum()),
            "cache_hits": int((~fresh).sum()),
            "prompt_tokens": int(frame.loc[fresh, "judge_prompt_tokens"].fillna(0).sum()),
            "completion_tokens": int(frame.loc[fresh, "judge_completion_tokens"].fillna(0).sum()),
        }
        stats["cost_usd"] = (
            None if prices is None
            else round((stats["prompt_tokens"] * prices.prompt_per_million
                        + stats["completion_tokens"] * prices.completion_per_million) / 1e6, 6)
        )  # fmt: skip
    return stats
