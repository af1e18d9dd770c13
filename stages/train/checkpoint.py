"""Checkpoints of a training run: sharded ones to resume from, and the final plain HF export.

- `save_checkpoint` / `restore_checkpoint`: every rank's shards of the model and optimiser
  (torch distributed checkpoint) plus rank 0's trainer state (step, lr scheduler, guard), reported
  through `ray.train.report(checkpoint=...)`; Ray Train keeps them in the run's storage and hands
  the latest back (`ray.train.get_checkpoint()`) to restarted workers or a rerun of the stage.
- `keep_metrics_up_to`: the metrics of steps redone after a restore are dropped first.
- `save_hf_checkpoint`: the full state dict gathered to rank 0, saved as a plain HF folder (a RoPO
  model's rotations and magnitudes merged into its weights first).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from stages.train.guard import Guard


TRAINER_STATE = "trainer_state.json"


def save_checkpoint(model, optimizer, scheduler, guard: "Guard | None", step: int, metrics: dict[str, float]) -> None:
    """A sharded checkpoint after `step`, reported to Ray Train (which keeps it in the run's storage).

    Every rank saves its shards of the model and the optimizer with torch distributed checkpoint
    (DCP: each rank writes only what it holds) into its own local folder and reports it; Ray Train
    merges the folders into one checkpoint, so this works across nodes. Rank 0 adds the rest of
    the state: the step (the data position: the batch schedule is a function of the seed), the lr
    scheduler and the guard. Dropout is off and nothing else draws random numbers, so there is no
    RNG state to keep.
    """
    import shutil
    import tempfile

    import ray.train
    import torch.distributed.checkpoint as dcp
    from ray.train import Checkpoint
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    local = Path(tempfile.mkdtemp(prefix=f"train-step-{step}-"))
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(local))
        if dist.get_rank() == 0:
            state = {"step": step, "scheduler": scheduler.state_dict(), "guard": guard.state() if guard else None}
            (local / TRAINER_STATE).write_text(json.dumps(state))
        ray.train.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=f"step-{step:06d}")  # fmt: skip
    finally:
        shutil.rmtree(local, ignore_errors=True)


def restore_checkpoint(path: Path, model, optimizer, scheduler, guard: "Guard | None") -> int:
    """Load a `save_checkpoint` folder into the model, optimiser, scheduler and guard; the step it was taken after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # (creates the optimiser's state to load into)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = json.loads((path / TRAINER_STATE).read_text())
    scheduler.load_state_dict(trainer["scheduler"])
    if guard is not None and trainer["guard"] is not None:
        guard.load(trainer["guard"])
    return int(trainer["step"])


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (logged before a failure, redone now): `metrics.jsonl`
    keeps exactly one line per step across restarts."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def save_hf_checkpoint(model, tokenizer, out_dir: Path) -> None:
    """Gather the full state dict to rank 0 and save a plain HF folder (loads in transformers and vLLM;
    a reward model as AutoModelForSequenceClassification, the reward-model judge's input)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from stages.train.reward_model import is_reward_model
    from stages.train.ropo import is_adapted, merge_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        if is_adapted(model):  # RoPO: W' = diag(m)·W·Rᵀ into each adapted layer's weight, a plain model
            state = merge_state_dict(model, state)
        auto = AutoModelForSequenceClassification if is_reward_model(model) else AutoModelForCausalLM
        with torch.device("meta"):
            plain = auto.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(state, assign=True)
        plain.tie_weights()
        if getattr(model, "generation_config", None) is not None:
            plain.generation_config = model.generation_config
        plain.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()
