"""`python -m pipeline compare-judges`: two judges score the same candidates; how far do they agree?

The question it answers before a long run: can the verifier, or a cheaper model, stand in for
GPT-4 on this data? Both judges score round K's finished sample folder (the first `--limit`
prompts' candidates, to keep API cost down), rows are matched on (prompt_id, candidate_id), and
`stages/judge/agreement.py` gives the confusion matrix, exact agreement and Cohen's κ.

```
RUN_DIR/compare-judges/<A>-vs-<B>/
  scores.parquet     prompt_id, candidate_id, score_<A>, score_<B>, reason_<A>, reason_<B>
  agreement.json     the judges, round, limit, and `agreement()`'s numbers
  confusion.png      the confusion matrix as a heatmap (rows A, columns B)
  _manifest.json
```

The folder is written atomically (`pipeline.artifacts.atomic_dir`); a rerun moves the previous
comparison aside rather than deleting it. `python -m pipeline report` lists every comparison.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, get_args

import pandas as pd
import yaml
from pydantic import ValidationError

from pipeline.artifacts import atomic_dir, join, location, read_folder, read_manifest, stage_dir, staged, write_table, write_text
from pipeline.config import JudgeConfig, RunConfig, format_validation_error
from pipeline.errors import UserError
from stages.judge.agreement import agreement

COMPARE_DIR = "compare-judges"
KEY = ["prompt_id", "candidate_id"]


@dataclass(frozen=True)
class Comparison:
    """What one `compare-judges` run found and where it wrote it."""

    out: Path
    names: tuple[str, str]
    round: int
    prompts: int
    agreement: dict[str, Any]


# ── the judge files ──────────────────────────────────────────────────────────────────────────
def judge_types() -> list[str]:
    members = get_args(get_args(JudgeConfig)[0])
    return [m.model_fields["type"].default for m in members]


def load_judge(path: str | Path) -> JudgeConfig:
    """One judge block from a YAML file: the whole file (`type: openai`, `model: gpt-4o`, ...), or
    the `judge:` block of a whole run config. Errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"judge file not found: {path} (pass a YAML file holding one judge block, "
                        "e.g. `type: openai` and `model: gpt-4o`, or a run config with a `judge:` block)")  # fmt: skip
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    whole = isinstance(raw, dict) and "judge" in raw
    block, prefix = (raw["judge"], "judge.") if whole else (raw, "")
    if not isinstance(block, dict):
        raise UserError(f"{path}: {prefix.rstrip('.') or '(top level)'}: a judge block is a mapping of keys like "
                        f"`type: openai`, got {type(block).__name__}")  # fmt: skip
    if "type" not in block:
        raise UserError(f"{path}: {prefix}type: say which judge with a `type:` key; allowed: {', '.join(judge_types())}")
    try:
        return RunConfig.model_validate({"judge": block}).judge
    except ValidationError as err:
        message = format_validation_error(err, source=str(path))
    # a bare judge block's keys are top-level keys of its file: `model`, not `judge.model`
    raise UserError(message if whole else message.replace("\n  judge.", "\n  "))


def judge_names(paths: Sequence[str | Path]) -> tuple[str, str]:
    """The judges' names in columns, folder names and tables: the files' stems, made safe for a
    column or folder name, with `-1`/`-2` added when the two are equal."""
    a, b = (re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(p).stem) or "judge" for p in paths)
    return (f"{a}-1", f"{b}-2") if a == b else (a, b)


# ── the candidates ───────────────────────────────────────────────────────────────────────────
def finished_sample(run_dir: Path, round_: int, config_path: str) -> Path:
    folder = join(stage_dir(run_dir, round_, "sample"), "policy")  # the policy's candidates
    if read_manifest(folder) is None:
        refresh = f"python -m pipeline stage sample {config_path} --part policy" + (f" --round {round_}" if round_ else "")
        raise UserError(f"compare-judges scores the candidates in {folder}, which is not finished: run `{refresh}` first "
                        "(with the same --run-dir)")  # fmt: skip
    return folder


def first_prompts(folder: Path, limit: int) -> list[str]:
    """The first `limit` prompt ids in the folder's row order (files by name, rows in order)."""
    ids = read_folder(folder, ["prompt_id"]).to_pandas()["prompt_id"]
    return list(dict.fromkeys(ids.astype(str)))[:limit]


def _keep_prompts(batch: pd.DataFrame, keep: set[str]) -> pd.DataFrame:
    return batch[batch["prompt_id"].astype(str).isin(keep)]


def score_candidates(folder: Path, judge: JudgeConfig, keep: list[str] | None) -> pd.DataFrame:
    """(prompt_id, candidate_id, score, score_reason) of every candidate (of the `keep` prompts)."""
    import ray

    from stages.judge import judge_dataset

    ds = ray.data.read_parquet(str(folder))
    if keep is not None:
        ds = ds.map_batches(_keep_prompts, fn_kwargs={"keep": set(keep)}, batch_format="pandas")
    judged = judge_dataset(ds, judge, where=str(folder))
    return judged.select_columns([*KEY, "score", "score_reason"]).to_pandas()


# ── the comparison ───────────────────────────────────────────────────────────────────────────
def compare_frames(scores_a: pd.DataFrame, scores_b: pd.DataFrame, names: tuple[str, str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Match two judged tables (prompt_id, candidate_id, score, score_reason) row for row.

    Returns the side-by-side table (prompt_id, candidate_id, score_<A>, score_<B>, reason_<A>,
    reason_<B>; scores nullable Int64, null = unscored), sorted by key, and `agreement()` of its
    two score columns. Raises UserError when a (prompt_id, candidate_id) repeats or one judge
    returned a row the other did not: the two judges must score the same candidates.
    """
    a, b = names
    if a == b:
        raise ValueError(f"the two judges need different names, got {a!r} twice")
    sides = []
    for name, frame in ((a, scores_a), (b, scores_b)):
        twice = frame[frame.duplicated(KEY, keep=False)]
        if len(twice):
            keys = ", ".join(f"({p}, {c})" for p, c in twice[KEY].drop_duplicates().head(3).itertuples(index=False))
            raise UserError(f"judge {name!r}: {len(twice)} rows share a (prompt_id, candidate_id), e.g. {keys}; "
                            "each candidate must appear once in the sample folder")  # fmt: skip
        sides.append(frame[[*KEY, "score", "score_reason"]].rename(
            columns={"score": f"score_{name}", "score_reason": f"reason_{name}"}))  # fmt: skip
    merged = sides[0].merge(sides[1], on=KEY, how="outer", indicator=True)
    for side, name in (("left_only", a), ("right_only", b)):
        alone = merged[merged["_merge"] == side]
        if len(alone):
            other = b if name == a else a
            keys = ", ".join(f"({p}, {c})" for p, c in alone[KEY].head(3).itertuples(index=False))
            raise UserError(f"judges {a!r} and {b!r} did not score the same candidates: {len(alone)} rows "
                            f"scored by {name!r} only, e.g. {keys}; {other!r} dropped them")  # fmt: skip
    table = merged.drop(columns="_merge").sort_values(KEY, ignore_index=True)
    for name in names:
        table[f"score_{name}"] = pd.to_numeric(table[f"score_{name}"]).astype("Int64")
    table = table[[*KEY, f"score_{a}", f"score_{b}", f"reason_{a}", f"reason_{b}"]]
    return table, agreement(table[f"score_{a}"], table[f"score_{b}"])


def compare_judges(
    cfg: RunConfig,
    run_dir: Path,
    judge_files: Sequence[str | Path],
    round_: int = 0,
    limit: int | None = None,
    config_path: str = "CONFIG",
) -> Comparison:
    """Score round `round_`'s candidates with both judges and write the comparison folder. Every
    check that needs no work (judge files, round, a finished sample folder, each judge's own
    preflight) runs before Ray starts."""
    from pipeline.runner import init_ray

    if len(judge_files) != 2:
        raise UserError(f"compare-judges needs exactly two --judge files, got {len(judge_files)}")
    judges = [load_judge(p) for p in judge_files]
    names = judge_names(judge_files)
    if not 0 <= round_ < cfg.rounds:
        raise UserError(f"--round {round_}: this config has rounds 0..{cfg.rounds - 1}")
    run_dir = Path(run_dir).resolve()  # Ray workers have another cwd
    folder = finished_sample(run_dir, round_, config_path)
    keep = first_prompts(folder, limit) if limit is not None else None

    from stages.judge import plugin

    for judge in judges:
        plugin(judge).preflight(judge, cfg.data)
    init_ray(cfg)
    scores = [score_candidates(folder, judge, keep) for judge in judges]
    table, result = compare_frames(scores[0], scores[1], names)

    setup = {"judges": {name: j.model_dump(mode="json") for name, j in zip(names, judges)}, "round": round_,
             "limit": limit, "sample": str(folder), "sample_key": read_manifest(folder).get("key")}  # fmt: skip
    out = join(location(run_dir), COMPARE_DIR, f"{names[0]}-vs-{names[1]}")
    write_comparison(out, table, result, names, setup)
    return Comparison(out=out, names=names, round=round_, prompts=int(table["prompt_id"].nunique()), agreement=result)


def write_comparison(out: Path, table: pd.DataFrame, result: dict[str, Any], names: tuple[str, str], setup: dict[str, Any]) -> None:
    """scores.parquet, agreement.json (`setup` + `result`), confusion.png and a manifest, all or nothing."""
    from pipeline.report import plot_confusion

    key = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]
    stats = {"rows": len(table), "prompts": int(table["prompt_id"].nunique())}
    with atomic_dir(out, {"stage": COMPARE_DIR, "key": key, **setup, "stats": stats}) as tmp:
        write_table(table, join(tmp, "scores.parquet"))
        summary = {"a": names[0], "b": names[1], **setup, "prompts": stats["prompts"], **result}
        write_text(join(tmp, "agreement.json"), json.dumps(summary, indent=2, allow_nan=False) + "\n")
        with staged(tmp) as local:
            plot_confusion(result["confusion"], result["labels"], names, local / "confusion.png")


# ── the terminal ─────────────────────────────────────────────────────────────────────────────
def confusion_text(confusion: Sequence[Sequence[int]], labels: Sequence[int], names: tuple[str, str]) -> str:
    """The matrix as a small aligned table: rows = judge A's score, columns = judge B's."""
    width = max(4, *(len(str(v)) + 1 for row in confusion for v in row))
    head = f"{names[0]} ↓ / {names[1]} →"
    lines = [head, "     " + "".join(f"{label:>{width}}" for label in labels)]
    for label, row in zip(labels, confusion):
        lines.append(f"{label:>5}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def format_comparison(c: Comparison, config_path: str = "CONFIG") -> str:
    from pipeline.report import agreement_numbers

    r = c.agreement
    a, b = c.names
    return "\n".join([
        f"{a} vs {b} on round {c.round}'s candidates ({c.prompts} prompts):",
        "",
        confusion_text(r["confusion"], r["labels"], c.names),
        "",
        agreement_numbers(r, c.names, sep="\n"),
        "",
        f"output: {c.out}",
        f"add it to report/report.md with `python -m pipeline report {config_path}` (same --run-dir)",
    ])  # fmt: skip
