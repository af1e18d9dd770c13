"""The `reference` sampler: the dataset's own worked solutions as candidates.

Scenarios 2 and 4 (METHODS.md) put the dataset's solution on the chosen side. Writing it as a
candidate row, like any model's sample, lets the judge score it and `pairs` treat every source
alike: a solution the judge scores no higher than the rejected sample gives no pair. One
candidate per prompt (`candidate_id` 0), no token ids (training tokenizes the text, with EOS),
`model` "dataset".
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.artifacts import join, write_table
from pipeline.errors import UserError
from stages.sample.candidates import SCHEMA, build_messages


def candidates(prompts: list[dict], template: object, source: str) -> list[dict]:
    """One row per prompt whose response is its `solution`. `template` is the policy's sampler:
    the chosen solution is paired with the policy's chat, so it carries the same messages."""
    missing = [p["prompt_id"] for p in prompts if not (p.get("solution") or "").strip()]
    if missing:
        raise UserError(
            f"{source}: {len(missing)} of {len(prompts)} prompt(s) have no solution (first: {missing[0]!r}), but "
            "pairs.scenarios 2 and 4 take the dataset's solutions as chosen responses. Map the column holding them "
            "with data.fields.solution, or drop scenarios 2 and 4"
        )
    return [{
        "prompt_id": p["prompt_id"], "candidate_id": 0, "prompt": p["prompt"],
        "messages": build_messages(template, p["prompt"]), "solution": p["solution"], "answer": p.get("answer"),
        "response": p["solution"], "prompt_token_ids": None, "response_token_ids": None, "prompt_tokens": None,
        "response_tokens": None, "finish_reason": "stop", "sampler": "reference", "model": "dataset", "seed": None,
    } for p in prompts]  # fmt: skip


def generate(prompts: list[dict], template: object, out_dir: Path, source: str) -> None:
    write_table(pa.Table.from_pylist(candidates(prompts, template, source), schema=SCHEMA), join(out_dir, "candidates.parquet"))
