"""The verifier judge (`judge: {type: verifier}`): the rule-based math rubric of `math_rules.py`
as a Ray Data `map_batches`. It needs the reference `answer` of every row, checked once for the
whole dataset before any scoring (and for both prompt splits in the run's preflight), and tells
the rules which responses the sampler cut at `max_tokens` (`finish_reason == "length"`).

Columns added: `score` (1-5, never null), `score_reason`, `extracted_answer`, `judge`.
"""

from __future__ import annotations

import pandas as pd
import ray

from pipeline.config import DataConfig, VerifierJudge
from pipeline.errors import UserError
from stages.judge.math_rules import score_math


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


def score_frame(batch: pd.DataFrame, judge: VerifierJudge) -> pd.DataFrame:
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


def judge(ds: "ray.data.Dataset", judge: VerifierJudge, where: str) -> "ray.data.Dataset":
    check_answers(ds.select_columns(["prompt_id", "answer"]).to_pandas(), where)
    return ds.map_batches(score_frame, fn_kwargs={"judge": judge}, batch_format="pandas", batch_size=judge.batch_size)


def preflight(judge: VerifierJudge, data: DataConfig) -> None:
    """Before any sampling: a reference answer for every prompt of both splits."""
    from pipeline.data import load_prompts

    for split in ("train", "eval"):
        check_answers(pd.DataFrame(load_prompts(data, split)), f"data ({split} split)")
