"""What evaluate asks each model: the held-out sets and the forgetting tasks, as one prompt list.

All of them are answered in one generation pass (one engine start per model); each row carries
its `set`: a name from `evaluate.sets` (the first is the report's headline, by default the run's
own held-out prompts), or `forgetting/<task>` for a built-in TAX task (`pipeline/tasks.py`).
A held-out prompt whose text is a training prompt is dropped and counted: a held-out set must
measure what training did not see. Prompt ids of later sets are prefixed with the set's name, so
two sets drawn from the same generator never share an id.
"""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.data import load_prompts
from pipeline.errors import UserError
from pipeline.tasks import task_prompts

FORGETTING = "forgetting/"


def evaluation_prompts(cfg: RunConfig) -> tuple[list[dict], dict[str, int]]:
    """(prompt rows with a `set` key, held-out prompts dropped per set for equalling a training prompt)."""
    trained = {row["prompt"].strip() for row in load_prompts(cfg.data, "train")}
    rows: list[dict] = []
    dropped: dict[str, int] = {}
    for i, (name, held) in enumerate(cfg.evaluate.sets.items()):
        prompts = load_prompts(held.data or cfg.data, "eval")
        unseen = [p for p in prompts if p["prompt"].strip() not in trained]
        dropped[name] = len(prompts) - len(unseen)
        limit = held.num_prompts or cfg.evaluate.num_prompts
        unseen = unseen[:limit]
        if not unseen:
            raise UserError(f"evaluate.sets.{name}: no held-out prompt left ({dropped[name]} of {len(prompts)} equal a "
                            "training prompt); give the set other prompts (its data:) or hold out more")
        prefix = "" if i == 0 else f"{name}/"
        rows += [{**p, "prompt_id": prefix + p["prompt_id"], "set": name} for p in unseen]
    if cfg.evaluate.forgetting:
        f = cfg.evaluate.forgetting
        for task in f.tasks:
            rows += [{**p, "set": FORGETTING + task} for p in task_prompts(task, f.num_prompts, f.seed)]
    return rows, dropped
