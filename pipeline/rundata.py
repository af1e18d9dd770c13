"""Reading a run folder: the report's only reads.

`load_run` collects what the finished stages wrote (manifests, `metrics.jsonl`, `summary.json`,
the held-out answers' scores, `geometry.parquet`) into a `RunData`; every table and plot of the
report is built from it and never touches the folder. What is not written yet is simply absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import Location, localize, location, read_manifest, stage_dir
from pipeline.config import RunConfig

# evaluate's part for the round's own policy (`round-K/evaluate/policy/`); variants use their names
POLICY = "policy"

# What the report never reads: an object-store run dir is copied down without them.
NOT_READ = ("checkpoint", ".ray-train", "tensorboard", ".raw")

# the held-out answers' columns the report reads (paired intervals, per set)
ANSWER_COLUMNS = ("prompt_id", "set", "score", "response_tokens")


@dataclass
class RunData:
    """What the finished parts of the config's rounds wrote; a key is absent where nothing was."""

    rounds: list[int]
    sample: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, source) → manifest stats
    judge: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, source) → manifest stats
    pairs: dict[int, dict] = field(default_factory=dict)  # round → manifest stats
    metrics: dict[tuple[int, str], list[dict]] = field(default_factory=dict)  # (round, variant) → a dict per step
    evals: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, "policy" | variant) → summary.json
    train: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, variant) → train manifest stats
    geometry: dict[tuple[int, str], list[dict]] = field(default_factory=dict)  # (round, variant) → a row per matrix
    answers: dict[tuple[int, str], Any] = field(default_factory=dict)  # (round, part) → DataFrame of ANSWER_COLUMNS


def _rounds(run_dir: Path, rounds: int) -> list[int]:
    """The config's rounds that have a folder: a round dropped from the config (`rounds` lowered)
    may still be on disk, but it is not part of this run."""
    return [r for r in range(rounds) if (Path(run_dir) / f"round-{r}").is_dir()]


def _stats(folder: Path) -> dict | None:
    manifest = read_manifest(folder)
    return None if manifest is None else manifest.get("stats") or {}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _metrics(train_dir: Path) -> list[dict[str, Any]] | None:
    path = train_dir / "metrics.jsonl"
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return steps or None


def _put(into: dict, key: Any, value: Any) -> None:
    if value is not None:
        into[key] = value


def load_run(run_dir: Path, cfg: RunConfig) -> RunData:
    """Every manifest, metrics file and evaluation summary of the config's sources and variants."""
    run_dir = Path(run_dir)
    data = RunData(rounds=_rounds(run_dir, cfg.rounds))
    for r in data.rounds:
        for source in cfg.sources():
            _put(data.sample, (r, source), _stats(stage_dir(run_dir, r, "sample") / source))
            _put(data.judge, (r, source), _stats(stage_dir(run_dir, r, "judge") / source))
        _put(data.pairs, r, _stats(stage_dir(run_dir, r, "pairs")))
        for part in (POLICY, *cfg.trains()):
            _put(data.evals, (r, part), _json(stage_dir(run_dir, r, "evaluate") / part / "summary.json"))
            _put(data.answers, (r, part), _answers(stage_dir(run_dir, r, "evaluate") / part))
        for variant in cfg.trains():
            _put(data.metrics, (r, variant), _metrics(stage_dir(run_dir, r, "train") / variant))
            _put(data.train, (r, variant), _stats(stage_dir(run_dir, r, "train") / variant))
            _put(data.geometry, (r, variant), _geometry(stage_dir(run_dir, r, "evaluate") / variant))
    return data


def _geometry(evaluate_dir: Path) -> list[dict] | None:
    """evaluate's hyperspherical energy per matrix (`geometry.parquet`), once the folder is finished."""
    path = evaluate_dir / "geometry.parquet"
    if read_manifest(evaluate_dir) is None or not path.is_file():
        return None
    import pandas as pd

    return pd.read_parquet(path).to_dict("records")



def _answers(evaluate_dir: Path) -> Any:
    """The scores of a finished evaluation's answers (`generations.parquet`), one row per prompt."""
    path = evaluate_dir / "generations.parquet"
    if read_manifest(evaluate_dir) is None or not path.is_file():
        return None
    import pyarrow.parquet as pq

    columns = [c for c in ANSWER_COLUMNS if c in pq.read_schema(path).names]
    frame = pq.read_table(path, columns=columns).to_pandas(ignore_metadata=True)
    if "set" not in frame:  # written before evaluate had several sets: all one set
        frame["set"] = "in_domain"
    return frame


def local_run_dir(run_dir: Location) -> Path:
    """The run dir as a local folder: itself, or this machine's copy of an object-store run dir
    (only what changed since the last copy is fetched again, and no checkpoint)."""
    return localize(location(run_dir), exclude=NOT_READ)
