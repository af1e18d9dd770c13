"""pairs: chosen vs rejected per prompt, TRL-ready, one folder per scenario.

Protocol (3D-properties §5.2): chosen = the best-scored candidate of the scenario's chosen
source, rejected = the worst of its rejected source; who writes each side is the scenario
(`pipeline.config.SCENARIO_SOURCES`, METHODS.md):

| scenario | chosen from | rejected from |
|---|---|---|
| 1 | policy samples | policy samples |
| 2 | the dataset's solutions (`reference`) | policy samples |
| 3 | policy samples | another model's samples (`other`) |
| 4 | the dataset's solutions | another model's samples |

Chosen must outscore rejected by at least `min_margin` (> 0), so a pair always prefers the
better-judged response. A prompt gives no pair, counted by reason in the manifest, when:
- "unscored": a side has no scored candidate (scenario 1: fewer than two), the judge failed;
- "uniform": no contrast, the chosen side's best is no better than the rejected side's worst
  (scenario 1: every candidate scored alike, the prompt is too easy or too hard);
- "margin": a contrast smaller than `pairs.min_margin`, a choice of the config.
Ties inside the best or the worst group are broken deterministically: `tie_break: first` takes
the lowest `candidate_id`; `random` draws with a generator seeded by (`pairs.seed`,
`prompt_id`), so a rerun picks the same pair whatever the row order.

Columns: `prompt` (the chat as the policy saw it: every source's candidates of the policy and
the dataset carry the policy's chat), `chosen`, `rejected` (one assistant turn each), TRL's
conversational format, plus `prompt_id`, `chosen_score`, `rejected_score`,
`chosen_candidate_id`, `rejected_candidate_id`, `chosen_source`, `rejected_source`,
`chosen_model`, `rejected_model`, `scenario`, and, so training scores exactly what the policy
wrote, `chosen_token_ids`/`rejected_token_ids` (the sampled ids, None for text from elsewhere)
and `chosen_finish_reason`/`rejected_finish_reason` ("length" for a response the token budget
cut off: it gets no EOS in training).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.artifacts import Location, join, read_folder, write_table
from pipeline.config import SCENARIO_SOURCES, PairsConfig, RunConfig

PAIR_COLUMNS = [
    "prompt", "chosen", "rejected", "prompt_id", "chosen_score", "rejected_score",
    "chosen_candidate_id", "rejected_candidate_id", "chosen_source", "rejected_source",
    "chosen_model", "rejected_model", "chosen_token_ids", "rejected_token_ids",
    "chosen_finish_reason", "rejected_finish_reason", "scenario", "num_candidates",
]  # fmt: skip

# what the pairs stage reads of a judged candidate
_READ = ["prompt_id", "candidate_id", "score", "messages", "response", "response_token_ids", "finish_reason", "model"]


def pick(candidates: list[dict[str, Any]], want: str, tie_break: str, seed: int, prompt_id: str) -> dict[str, Any]:
    """The best (`want="max"`) or worst (`want="min"`) candidate, ties broken by `tie_break`."""
    target = (max if want == "max" else min)(c["score"] for c in candidates)
    tied = sorted((c for c in candidates if c["score"] == target), key=lambda c: c["candidate_id"])
    if tie_break == "first" or len(tied) == 1:
        return tied[0]
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{want}".encode()).hexdigest()
    return random.Random(digest).choice(tied)


def scenario_pair(chosen_from: list[dict[str, Any]], rejected_from: list[dict[str, Any]], cfg: PairsConfig,
                  scenario: int = 1) -> tuple[dict[str, Any] | None, str | None]:
    """(pair, None), or (None, why) with why in "unscored", "uniform", "margin".

    `chosen_from` / `rejected_from`: one prompt's scored candidates of each side's source (the
    same list in scenario 1); a candidate with `score` None takes no part."""
    given = len(chosen_from) + len(rejected_from)
    chosen_from = [c for c in chosen_from if _scored(c)]
    rejected_from = [c for c in rejected_from if _scored(c)]
    any_unscored = given > len(chosen_from) + len(rejected_from)
    same = SCENARIO_SOURCES[scenario][0] == SCENARIO_SOURCES[scenario][1]
    if not chosen_from or not rejected_from:
        return None, "unscored"
    if same and len(chosen_from) < 2:  # one candidate left: the judge's failure, or a prompt sampled once
        return None, "unscored" if any_unscored else "uniform"
    prompt_id = chosen_from[0]["prompt_id"]
    best = pick(chosen_from, "max", cfg.tie_break, cfg.seed, prompt_id)
    worst = pick(rejected_from, "min", cfg.tie_break, cfg.seed, prompt_id)
    gap = best["score"] - worst["score"]
    if gap <= 0:
        return None, "uniform"
    if gap < cfg.min_margin:
        return None, "margin"
    chosen_source, rejected_source = SCENARIO_SOURCES[scenario]
    return {
        "prompt": [dict(m) for m in best["messages"]],
        "chosen": [{"role": "assistant", "content": best["response"]}],
        "rejected": [{"role": "assistant", "content": worst["response"]}],
        "prompt_id": prompt_id,
        "chosen_score": float(best["score"]),
        "rejected_score": float(worst["score"]),
        "chosen_candidate_id": int(best["candidate_id"]),
        "rejected_candidate_id": int(worst["candidate_id"]),
        "chosen_source": chosen_source,
        "rejected_source": rejected_source,
        "chosen_model": best.get("model"),
        "rejected_model": worst.get("model"),
        "chosen_token_ids": _token_ids(best),
        "rejected_token_ids": _token_ids(worst),
        "chosen_finish_reason": best.get("finish_reason"),
        "rejected_finish_reason": worst.get("finish_reason"),
        "scenario": scenario,
        "num_candidates": len(chosen_from) if same else len(chosen_from) + len(rejected_from),
    }, None


def select_pair(candidates: list[dict[str, Any]], cfg: PairsConfig) -> dict[str, Any] | None:
    """One scenario-1 pair from one prompt's scored candidates, or None when there is no contrast."""
    return scenario_pair(candidates, candidates, cfg, 1)[0]


def _scored(candidate: dict[str, Any]) -> bool:
    score = candidate.get("score")
    return score is not None and not (isinstance(score, float) and np.isnan(score))


def _token_ids(candidate: dict[str, Any]) -> list[int] | None:
    ids = candidate.get("response_token_ids")
    return None if ids is None else [int(t) for t in ids]


def scenario_pairs(candidates: dict[str, pd.DataFrame], scenario: int, cfg: PairsConfig) -> tuple[list[dict], dict[str, int]]:
    """Every prompt's pair of one scenario from the judged candidates of each source (frames with
    `_READ` columns), sorted by prompt id, and the counts of prompts dropped by reason. Prompts are
    those of the chosen side's source (every source samples the same training prompts)."""
    chosen_source, rejected_source = SCENARIO_SOURCES[scenario]
    chosen_by = _by_prompt(candidates[chosen_source])
    rejected_by = _by_prompt(candidates[rejected_source])
    pairs, dropped = [], {"dropped_uniform": 0, "dropped_unscored": 0, "dropped_margin": 0}
    for prompt_id in sorted(chosen_by):
        pair, why = scenario_pair(chosen_by[prompt_id], rejected_by.get(prompt_id, []), cfg, scenario)
        if pair is None:
            dropped[f"dropped_{why}"] += 1
        else:
            pairs.append(pair)
    return pairs, dropped


def _by_prompt(frame: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in _plain(frame.to_dict("records")):
        out.setdefault(row["prompt_id"], []).append(row)
    return out


def drop_counts(scores: pd.DataFrame, num_pairs: int) -> dict[str, int]:
    """Scenario 1's drop reasons from (prompt_id, score) rows alone (see the module docstring)."""
    per_prompt = scores.assign(unscored=scores["score"].isna()).groupby("prompt_id").agg(
        scored=("score", "count"), distinct=("score", "nunique"), unscored=("unscored", "sum"))
    unscored = (per_prompt["scored"] < 2) & (per_prompt["unscored"] > 0)
    uniform = ~unscored & (per_prompt["distinct"] <= 1)
    return {"dropped_uniform": int(uniform.sum()), "dropped_unscored": int(unscored.sum()),
            "dropped_margin": int((~unscored & ~uniform).sum()) - num_pairs}  # fmt: skip


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parquet hands nested columns back as numpy arrays; Arrow wants lists of dicts."""
    def fix(v):
        return [fix(x) for x in v] if isinstance(v, (list, np.ndarray)) else v

    return [{k: fix(v) for k, v in r.items()} for r in rows]


def _read_judged(folder: str) -> pd.DataFrame:
    return read_folder(folder, _READ).to_pandas()


def run(cfg: RunConfig, inputs: dict[str, str], out: Location) -> dict:
    """`inputs["judge/<source>"]`: the judged candidates of every source the scenarios need."""
    candidates = {key.split("/", 1)[1]: _read_judged(path) for key, path in inputs.items() if key.startswith("judge/")}
    stats: dict[str, Any] = {"prompts": int(candidates["policy"].prompt_id.nunique()), "rows": 0}
    for scenario in cfg.pairs.scenarios:
        rows, dropped = scenario_pairs(candidates, scenario, cfg.pairs)
        # One row per prompt: small enough to write as one plain Arrow file, sorted by prompt id.
        write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), join(out, f"s{scenario}", "pairs.parquet"))
        stats[f"s{scenario}"] = {"pairs": len(rows), **dropped}
        stats["rows"] += len(rows)
    return stats


_TURNS = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PAIR_SCHEMA = pa.schema([
    ("prompt", _TURNS), ("chosen", _TURNS), ("rejected", _TURNS), ("prompt_id", pa.string()),
    ("chosen_score", pa.float64()), ("rejected_score", pa.float64()),
    ("chosen_candidate_id", pa.int64()), ("rejected_candidate_id", pa.int64()),
    ("chosen_source", pa.string()), ("rejected_source", pa.string()),
    ("chosen_model", pa.string()), ("rejected_model", pa.string()),
    ("chosen_token_ids", pa.list_(pa.int64())), ("rejected_token_ids", pa.list_(pa.int64())),
    ("chosen_finish_reason", pa.string()), ("rejected_finish_reason", pa.string()),
    ("scenario", pa.int64()), ("num_candidates", pa.int64()),
])  # fmt: skip
assert PAIR_SCHEMA.names == PAIR_COLUMNS
