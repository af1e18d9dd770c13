"""train: Ray Train workers run FSDP2 preference optimisation on one scenario's pairs.

The runner runs it once per variant (`round-K/train/<variant>/`), handing it a config whose
`train` is the variant's; it starts from the round's policy (`inputs["policy"]`) and measures
rewards against `inputs["ref_model"]` (the same model, or the run's initial policy when
`next_round.ref_model: initial`).

Writes into the stage folder:
- `checkpoint/`: a plain HF folder (the config as loaded: dropout is switched off for training
  only, never in the saved config); for `method: {type: reward_model}` a one-output
  sequence-classification model, a `judge: {type: reward_model}` as it is;
- `metrics.jsonl`: one line per step, TRL's metric names plus the 3D diagnostics (names in
  `stages/train/objectives.py` and `loop.term_grad_norms`), the same in `tensorboard/`;
- `tokenized_pairs.parquet`: `prompt_id, prompt_ids, chosen_ids, rejected_ids`, the token ids
  every step trains on, tokenized once here so no worker tokenizes every pair;
- `reference_logps.parquet` (methods with a reference): `prompt_id, ref_chosen_logps, ref_rejected_logps`, one row per pair
  in the pairs file's order — the reference log-probs every step's reward is measured from,
  under the precision policy of `stages/train/precision.py`, in `reference_batches_for`'s
  batches; evaluate's "before" log-probs are checked against them.
The worker loop is `stages/train/loop.py`.

The stage folder may be on an object store (`s3://...`): the tokenized pairs and Ray Train's
sharded checkpoints (`storage_path`) live there, every worker reads its node's copy of the models
(`pipeline.artifacts.localize`), and rank 0 uploads what it writes, so the workers may be on any
nodes. The manifest records which (`stats.placement`).
"""

from __future__ import annotations

import json
import logging
import os

import pyarrow.parquet as pq

from pipeline.artifacts import WEIGHTS, Location, files_under, is_file, join, localize, read_text, remove, staged, working_copy
from pipeline.config import RunConfig, TrainConfig
from pipeline.errors import UserError
from stages.train.precision import TRAIN_WORKER_CPUS

log = logging.getLogger("pipeline.train")
NONFINITE = "non-finite loss or gradient"  # the worker's FloatingPointError, recognised here
WORKERS = "workers.json"  # rank 0 writes each rank's node id; the driver moves it into the manifest


def effective_batch_size(num_pairs: int, batch_size: int, num_workers: int) -> int:
    """The configured global batch, or — with fewer pairs than that — the largest multiple of the
    worker count that fits, so a small round still trains instead of failing after sampling."""
    if num_pairs >= batch_size:
        return batch_size
    shrunk = num_pairs - num_pairs % num_workers
    if shrunk == 0:
        raise UserError(
            f"only {num_pairs} preference pair(s) for {num_workers} training worker(s): nothing to train on. "
            "Sample more prompts (data.num_train), more candidates (sampler.n) or lower train.num_workers"
        )
    log.warning("only %d pairs: global batch %d → %d", num_pairs, batch_size, shrunk)
    return shrunk


def trained_pairs(num_pairs: int, tc: TrainConfig) -> int:
    """How many of a pairs file's `num_pairs` rows are trained on: all but the last
    `held_out_pairs` (evaluated every `eval_every` steps, never trained on)."""
    if tc.held_out_pairs and tc.held_out_pairs >= num_pairs:
        raise UserError(
            f"train.held_out_pairs={tc.held_out_pairs}: scenario {tc.scenario} has only {num_pairs} pairs, so none "
            "would be left to train on; hold out fewer (a tenth of the pairs is usual)"
        )
    return num_pairs - tc.held_out_pairs


def reference_batches_for(num_pairs: int, tc: TrainConfig) -> list[list[int]]:
    """The forward batches (pair indices) in which the train stage computes the reference
    log-probs of a pairs file of `num_pairs` rows under `tc` (its trained pairs, the first
    `trained_pairs`). In bf16 a pair's log-probs depend on the padded width of its batch, so a
    forward that must reproduce `reference_logps.parquet` (evaluate's "before") runs these batches."""
    from stages.train.loop import epoch_order, reference_batches
    from stages.train.schedule import micro_batch_for

    trained = trained_pairs(num_pairs, tc)
    share = effective_batch_size(trained, tc.batch_size, tc.num_workers) // tc.num_workers
    return reference_batches(epoch_order(trained, tc.seed, 0), micro_batch_for(share, tc.micro_batch_size), tc.num_workers)


def scaling_config(tc: TrainConfig):
    """Ray Train's ScalingConfig from the config: how many workers, what each holds, how they spread.
    Nothing names a machine: `resources_per_worker` may ask for a custom resource that only some
    nodes offer (`ray start --resources='{"trainer": 8}'`), which is how a cluster pins training."""
    from ray.train import ScalingConfig

    resources = tc.resources_per_worker
    if resources is None:
        resources = {"GPU": 1} if tc.use_gpu else {"CPU": TRAIN_WORKER_CPUS}
    return ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=dict(resources),
                         placement_strategy=tc.placement_strategy)  # fmt: skip


def run(cfg: RunConfig, inputs: dict[str, str], out: Location) -> dict:
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from stages.train.batch import write_tokenized
    from stages.train.loop import train_loop

    tc = cfg.train
    pairs_file = localize(inputs["pairs"]) / f"s{tc.scenario}" / "pairs.parquet"
    if not pairs_file.is_file():
        raise UserError(f"{pairs_file} not found: train.scenario={tc.scenario} must be one of pairs.scenarios")
    num_pairs = pq.read_metadata(pairs_file).num_rows
    batch_size = effective_batch_size(trained_pairs(num_pairs, tc), tc.batch_size, tc.num_workers)
    tokenized = join(out, "tokenized_pairs.parquet")  # where every worker reads it, on any node
    if not is_file(tokenized):  # a resumed stage has it
        tokenizer = AutoTokenizer.from_pretrained(localize(inputs["policy"], exclude=WEIGHTS))
        with staged(out) as local:
            write_tokenized(local / "tokenized_pairs.parquet", tokenizer, pq.read_table(pairs_file).to_pylist(),
                            tc.max_length, reward_model=tc.trains_reward_model)  # fmt: skip
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "policy": inputs["policy"], "ref_model": inputs.get("ref_model", inputs["policy"]),
            "tokenized": str(tokenized), "out": str(out),
            "train": tc.model_dump(mode="json"), "batch_size": batch_size,
            # fault injection for tests: a NaN loss at this step; SIGKILL rank R's process after step S (once)
            "inject_nan_at_step": int(os.environ.get("PIPELINE_TRAIN_INJECT_NAN_AT_STEP", 0)) or None,
            "kill_rank_at_step": dict(x.split(":") for x in os.environ.get("PIPELINE_TRAIN_KILL", "").split(",") if x),
        },  # fmt: skip
        scaling_config=scaling_config(tc),
        # Ray Train's storage is in the stage's own unfinished folder (the runner keeps it across a kill
        # for the same config; local or an object store): run again, Ray Train finds the latest
        # checkpoint there and the loop resumes.
        run_config=TrainRunConfig(name="train", storage_path=str(join(out, ".ray-train")),
                                  failure_config=FailureConfig(max_failures=tc.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        trainer.fit()
    except Exception as err:  # Ray Train wraps the worker's exception; a NaN is the user's to act on
        if NONFINITE in str(err):
            line = next(x for x in str(err).splitlines() if NONFINITE in x)
            saved = sorted({p.split("/")[0] for p in files_under(join(out, ".ray-train", "train")) if p.startswith("step-")})
            last = (f"the last good checkpoint, {join(out, '.ray-train', 'train', saved[-1])}, is kept" if saved
                    else "no checkpoint was taken before it")
            raise UserError(
                f"training stopped: {line.split('FloatingPointError: ')[-1].strip()}. No update from that step was "
                f"applied; {last}; the round's policy is unchanged. Lower train.lr, turn on train.grad_clip, or "
                f"check the pairs (metrics so far: {join(out, 'metrics.jsonl')})"
            ) from None
        raise
    _wait_for_workers_to_leave(scaling_config(tc))
    metrics = join(out, "metrics.jsonl")
    steps = sum(1 for line in read_text(metrics).splitlines() if line.strip()) if is_file(metrics) else 0
    run_info = json.loads(read_text(join(out, WORKERS)))
    remove(join(out, ".ray-train"))  # the sharded checkpoints: done, checkpoint/ is the model
    remove(join(out, WORKERS))
    for marker in working_copy(out).glob(".killed-*"):  # left by the tests' fault injection
        marker.unlink()
    return {"pairs": num_pairs, "held_out_pairs": tc.held_out_pairs, "batch_size": batch_size, "steps": steps,
            "rows": steps, "placement": placement(run_info["workers"]), "parameters": run_info["parameters"],
            # printed in the stage's done line: RoPO's share is the figure its paper reports (0.0086% of an 8B model)
            "trainable_parameters": run_info["parameters"]["trainable"],
            "trainable_percent": float(f"{run_info['parameters']['trainable_percent']:.4g}")}  # fmt: skip


def _wait_for_workers_to_leave(scaling, timeout: float = 15.0) -> None:
    """Ray Train tears its worker actors down after `fit()` returns, asynchronously; the next
    stage's first Ray Data job, started while they still hold the CPUs, warns that "the Ray
    cluster currently does not have any available CPUs". Wait (bounded: on a busy cluster others
    may hold them) until the CPUs the workers held are free again."""
    import time

    import ray

    held = scaling.num_workers * scaling.resources_per_worker.get("CPU", 0)
    wanted = min(held, ray.cluster_resources().get("CPU", 0))
    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < wanted and time.time() < deadline:
        time.sleep(0.2)


def placement(workers: list[dict]) -> dict:
    """Where the workers ran (the manifest keeps it: a multi-node run shows its nodes)."""
    nodes = sorted({w["node_id"] for w in workers})
    return {"nodes": len(nodes), "workers": workers}
