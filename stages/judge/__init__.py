"""judge: every candidate gets a 1-5 score and a reason, by judge `type:` (today: verifier).

Scoring runs as a Ray Data `map_batches` over the candidate Parquet, so it spreads over a
cluster the same way sampling does; the scored rows keep every candidate column.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import ray

from pipeline.config import JudgeConfig, RunConfig
from stages.judge.verifier import score_math


def score_frame(batch: pd.DataFrame, judge: JudgeConfig) -> pd.DataFrame:
    """Add `score`, `score_reason`, `extracted_answer`, `judge` to a batch of candidates."""
    verdicts = [
        score_math(response, answer, solution)
        for response, answer, solution in zip(batch["response"], batch["answer"], batch["solution"])
    ]
    return batch.assign(
        score=[v.score for v in verdicts],
        score_reason=[v.reason for v in verdicts],
        extracted_answer=[v.extracted for v in verdicts],
        judge=judge.type,
    )


def judge_dataset(ds: "ray.data.Dataset", judge: JudgeConfig) -> "ray.data.Dataset":
    return ds.map_batches(score_frame, fn_kwargs={"judge": judge}, batch_format="pandas", batch_size=judge.batch_size)


def run(cfg: RunConfig, inputs: dict[str, str], out: Path) -> dict:
    ds = judge_dataset(ray.data.read_parquet(inputs["sample"]), cfg.judge)
    ds.write_parquet(str(out))
    scores = ray.data.read_parquet(str(out)).select_columns(["score"]).to_pandas()["score"]
    return {"rows": len(scores), "score_counts": {int(k): int(v) for k, v in scores.value_counts().sort_index().items()}}
