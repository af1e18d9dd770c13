"""judge: every candidate gets a 1-5 score, or none with the reason why, by judge `type:`.

Each plug-in is a module `stages/judge/<type>.py` with two functions:

- `judge(ds, judge_cfg, where) -> Dataset`: lazily adds `score` (1-5, or null for a row it could
  not score: kept, never dropped, never guessed), `score_reason` and `judge` (the type) to every
  row, keeping every candidate column, plus its own columns (`extracted_answer`,
  `judge_reasoning`, `reward`, ...). Work runs inside Ray Data, so it spreads over a cluster.
- `preflight(judge_cfg, data_cfg)`: cheap checks before any sampling (answers present, rubric
  placeholders, the API key's variable set).

`evaluate` judges its greedy answers through the same `judge_dataset`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import ray

from pipeline.config import JudgeConfig, RunConfig
from stages.judge.stats import judge_stats

PLUGINS = {"verifier": "stages.judge.verifier", "openai": "stages.judge.openai", "reward_model": "stages.judge.reward_model"}


def plugin(judge: JudgeConfig) -> ModuleType:
    return importlib.import_module(PLUGINS[judge.type])


def judge_dataset(ds: "ray.data.Dataset", judge: JudgeConfig, where: str = "candidates") -> "ray.data.Dataset":
    """Score `ds` (candidate rows) with `judge`; `where` names the data in error messages."""
    return plugin(judge).judge(ds, judge, where)


def preflight(cfg: RunConfig) -> None:
    plugin(cfg.judge).preflight(cfg.judge, cfg.data)


def run(cfg: RunConfig, inputs: dict[str, str], out: Path) -> dict:
    judge_dataset(ray.data.read_parquet(inputs["sample"]), cfg.judge, where=inputs["sample"]).write_parquet(str(out))
    frame = ray.data.read_parquet(str(out)).drop_columns(_BULKY).to_pandas()
    return judge_stats(frame, getattr(cfg.judge, "prices", None))


# Columns the counts do not need (the chat and token ids are most of a candidate table's bytes).
_BULKY = ["messages", "prompt_token_ids", "response_token_ids"]
