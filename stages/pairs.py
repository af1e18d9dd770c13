"""pairs: best vs worst candidate per prompt, TRL-ready, one folder per scenario.

Protocol (3D-properties §5.2): chosen = the best-scored candidate, rejected = the worst; prompts
whose candidates all score alike carry no preference signal and are dropped, as are prompts
whose best-worst gap is below `min_margin`, and candidates the judge left unscored (`score`
null) take no part (the manifest counts each reason apart). Ties inside the
best or the worst group are broken deterministically: `tie_break: first` takes the lowest
`candidate_id`; `random` draws with a generator seeded by (`pairs.seed`, `prompt_id`), so a
rerun picks the same pair whatever the row order.

Scenarios (who wrote chosen × rejected): 1 = policy × policy. 2-4 swap in the dataset's
reference solution as chosen and/or another model's sample as rejected; they arrive with the
reference and other-model samplers.

Columns: `prompt` (the chat as the policy saw it), `chosen`, `rejected` (one assistant turn each),
TRL's conversational format, plus `prompt_id`, `chosen_score`, `rejected_score`,
`chosen_candidate_id`, `rejected_candidate_id`, `chosen_source`, `rejected_source`, `scenario`,
and, so training scores exactly what the policy wrote, `chosen_token_ids`/`rejected_token_ids`
(the sampled ids, None for text from elsewhere) and `chosen_finish_reason`/`rejected_finish_reason`
("length" for a response the token budget cut off: it gets no EOS in training).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.config import PairsConfig, RunConfig


def pick(candidates: list[dict[str, Any]], want: str, tie_break: str, seed: int, prompt_id: str) -> dict[str, Any]:
    """The best (`want="max"`) or worst (`want="min"`) candidate, ties broken by `tie_break`."""
    target = (max if want == "max" else min)(c["score"] for c in candidates)
    tied = sorted((c for c in candidates if c["score"] == target), key=lambda c: c["candidate_id"])
    if tie_break == "first" or len(tied) == 1:
        return tied[0]
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{want}".encode()).hexdigest()
    return random.Random(digest).choice(tied)


def select_pair(candidates: list[dict[str, Any]], cfg: PairsConfig) -> dict[str, Any] | None:
    """One scenario-1 pair from one prompt's scored candidates, or None when there is no contrast."""
    prompt_id = candidates[0]["prompt_id"]
    best = pick(candidates, "max", cfg.tie_break, cfg.seed, prompt_id)
    worst = pick(candidates, "min", cfg.tie_break, cfg.seed, prompt_id)
    if best["score"] - worst["score"] < cfg.min_margin:
        return None
    messages = [dict(m) for m in best["messages"]]
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": best["response"]}],
        "rejected": [{"role": "assistant", "content": worst["response"]}],
        "prompt_id": prompt_id,
        "chosen_score": float(best["score"]),
        "rejected_score": float(worst["score"]),
        "chosen_candidate_id": int(best["candidate_id"]),
        "rejected_candidate_id": int(worst["candidate_id"]),
        "chosen_source": "policy",
        "rejected_source": "policy",
        "chosen_token_ids": _token_ids(best),
        "rejected_token_ids": _token_ids(worst),
        "chosen_finish_reason": best.get("finish_reason"),
        "rejected_finish_reason": worst.get("finish_reason"),
        "scenario": 1,
        "num_candidates": len(candidates),
    }


def _token_ids(candidate: dict[str, Any]) -> list[int] | None:
    ids = candidate.get("response_token_ids")
    return None if ids is None else [int(t) for t in ids]


def drop_counts(scores: pd.DataFrame, num_pairs: int) -> dict[str, int]:
    """Why prompts gave no pair, from their (prompt_id, score) rows: every scored candidate scored
    alike ("uniform": the prompt is too easy or too hard for the policy), the best-worst gap was
    below `pairs.min_margin` ("margin": a choice of the config), or fewer than two candidates got
    a score at all ("unscored": the judge failed on them). Counted apart."""
    per_prompt = scores.assign(unscored=scores["score"].isna()).groupby("prompt_id").agg(
        scored=("score", "count"), distinct=("score", "nunique"), unscored=("unscored", "sum"))
    unscored = (per_prompt["scored"] < 2) & (per_prompt["unscored"] > 0)
    uniform = ~unscored & (per_prompt["distinct"] <= 1)
    return {"dropped_uniform": int(uniform.sum()), "dropped_unscored": int(unscored.sum()),
            "dropped_margin": int((~unscored & ~uniform).sum()) - num_pairs}  # fmt: skip


def _pairs_of_group(group: pd.DataFrame, cfg: PairsConfig) -> pd.DataFrame:
    scored = group[group["score"].notna()]  # a candidate the judge could not score takes no part
    pair = select_pair(scored.to_dict("records"), cfg) if len(scored) >= 2 else None
    return pd.DataFrame([pair] if pair else [], columns=PAIR_COLUMNS)


PAIR_COLUMNS = [
    "prompt", "chosen", "rejected", "prompt_id", "chosen_score", "rejected_score",
    "chosen_candidate_id", "rejected_candidate_id", "chosen_source", "rejected_source",
    "chosen_token_ids", "rejected_token_ids", "chosen_finish_reason", "rejected_finish_reason",
    "scenario", "num_candidates",
]  # fmt: skip


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ray hands nested columns back as numpy arrays; Arrow wants lists of dicts."""
    def fix(v):
        return [fix(x) for x in v] if isinstance(v, (list, np.ndarray)) else v

    return [{k: fix(v) for k, v in r.items()} for r in rows]


def run(cfg: RunConfig, inputs: dict[str, str], out: Path) -> dict:
    scored = ray.data.read_parquet(inputs["judge"])
    scores = scored.select_columns(["prompt_id", "score"]).to_pandas()
    stats: dict[str, Any] = {"prompts": int(scores.prompt_id.nunique()), "rows": 0}
    for scenario in cfg.pairs.scenarios:
        pairs = scored.groupby("prompt_id").map_groups(
            _pairs_of_group, fn_kwargs={"cfg": cfg.pairs}, batch_format="pandas"
        )
        # One row per prompt: small enough to collect, sort and write as one plain Arrow file.
        rows = sorted(_plain(pairs.take_all()), key=lambda r: r["prompt_id"])
        folder = out / f"s{scenario}"
        folder.mkdir()
        pq.write_table(pa.Table.from_pylist(rows), folder / "pairs.parquet")
        stats[f"s{scenario}"] = {"pairs": len(rows), **drop_counts(scores, len(rows))}
        stats["rows"] += len(rows)
    return stats
