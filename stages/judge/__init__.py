"""judge: every candidate gets a 1-5 score and a reason, by judge `type:` (today: verifier).

Scoring runs as a Ray Data `map_batches` over the candidate Parquet, so it spreads over a
cluster the same way sampling does; the scored rows keep every candidate column. The verifier
needs the reference `answer` of every row (checked before any scoring), and tells it which
responses the sampler cut at `max_tokens` (`finish_reason == "length"`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import ray

from pipeline.config import JudgeConfig, RunConfig
from pipeline.errors import UserError
from stages.judge.verifier import score_math


def check_answers(frame: pd.DataFrame, where: str) -> None:
    """Raise a UserError naming the rows of `frame` (prompt_id, answer) that have no reference answer."""
    missing = frame["answer"].isna() | (frame["answer"].astype(str).str.strip() == "")
    if missing.any():
        ids = list(dict.fromkeys(frame.loc[missing, "prompt_id"].astype(str)))
        shown = ", ".join(ids[:3]) + (f", ... ({len(ids)} prompts)" if len(ids) > 3 else "")
        raise UserError(
            f"{where}: {int(missing.sum())} of {len(frame)} rows have no reference answer (prompt_id {shown}); "
            "the verifier judge needs a reference answer for every prompt: map it with data.fields.answer, "
            "or use a judge that needs none"
        )


def score_frame(batch: pd.DataFrame, judge: JudgeConfig) -> pd.DataFrame:
    """Add `score`, `score_reason`, `extracted_answer`, `judge` to a batch of candidates (whose
    answers `judge_dataset` has checked once for the whole dataset)."""
    verdicts = [
        score_math(response, answer, solution, truncated=finish_reason == "length")
        for response, answer, solution, finish_reason in zip(
            batch["response"], batch["answer"], batch["solution"], batch["finish_reason"]
        )
    ]
    return batch.assign(
        score=[v.score for v in verdicts],
        score_reason=[v.reason for v in verdicts],
        extracted_answer=[v.extracted for v in verdicts],
        judge=judge.type,
    )


def judge_dataset(ds: "ray.data.Dataset", judge: JudgeConfig, where: str = "candidates") -> "ray.data.Dataset":
    """Check every row has an answer (reads two columns now), then score lazily."""
    check_answers(ds.select_columns(["prompt_id", "answer"]).to_pandas(), where)
    return ds.map_batches(score_frame, fn_kwargs={"judge": judge}, batch_format="pandas", batch_size=judge.batch_size)


def preflight(cfg: RunConfig) -> None:
    """Before any sampling: the verifier needs a reference answer for every prompt of both splits."""
    from pipeline.data import load_prompts

    for split in ("train", "eval"):
        check_answers(pd.DataFrame(load_prompts(cfg.data, split)), f"data ({split} split)")


def run(cfg: RunConfig, inputs: dict[str, str], out: Path) -> dict:
    ds = judge_dataset(ray.data.read_parquet(inputs["sample"]), cfg.judge, where=inputs["sample"])
    ds.write_parquet(str(out))
    scores = ray.data.read_parquet(str(out)).select_columns(["score"]).to_pandas()["score"]
    return {"rows": len(scores), "score_counts": {int(k): int(v) for k, v in scores.value_counts().sort_index().items()}}
