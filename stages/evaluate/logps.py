"""Log-probs of chosen and rejected responses under one model, as a Ray task.

Uses the training code's tokenization and `policy_logps`, on a plain (unsharded) model under the
training precision policy (`stages/train/precision.for_inference`: parameters in the compute
dtype as FSDP2 casts them, no autocast; bf16 logits reduced in fp32). Given the reference pass's
batches (`stages.train.reference_batches_for`) the "before" numbers are, bit for bit, the
reference log-probs training wrote to `reference_logps.parquet`: in bf16 a pair's log-probs also
depend on the padded width of the batch it runs in (up to 0.7 nats per response on
SmolLM2-135M), so the precision policy alone is not enough.
"""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import ray
import torch

from pipeline.artifacts import localize
from stages.train.precision import TRAIN_WORKER_CPUS


def plan_batches(batches: list[list[int]] | None, wanted: int, micro_batch: int) -> list[list[int]]:
    """The batches to run so that pairs 0..wanted-1 each appear: the given ones that hold a pair
    not yet seen (so a `limit` skips the rest), or file-order micro-batches."""
    if batches is None:
        return [list(range(s, min(s + micro_batch, wanted))) for s in range(0, wanted, micro_batch)]
    seen: set[int] = set()
    needed = []
    for batch in batches:
        if any(i < wanted and i not in seen for i in batch):
            needed.append(batch)
            seen.update(batch)
    missing = sorted(set(range(wanted)) - seen)
    if missing:
        raise ValueError(f"the batches never run pair(s) {missing[:5]} of the first {wanted}")
    return needed


# max_calls=1: the worker exits after the task and gives back the ~0.7 GB that torch and the
# model hold, before the engines start; a pooled worker that kept it made Ray Data's memory
# detector warn about the next light task it ran ("Operator 'Map(_preprocess)' uses 673.0MiB").
@ray.remote(num_cpus=TRAIN_WORKER_CPUS, max_calls=1)
def pair_logps(model_path: str, pairs_file: str, max_length: int, limit: int | None, dtype: str = "float32",
               micro_batch: int = 4, batches: list[list[int]] | None = None,
               also: str | None = None) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Logps of the first `limit` pairs (all when None), one row each in file order. `batches`
    (pair indices) are the forwards to run, a pair's first appearance counting; default:
    file-order micro-batches of `micro_batch`. `also`: a second pairs file, all of its pairs in
    file-order micro-batches, on the same loaded model: then (pairs' logps, its logps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import policy_logps
    from stages.train.precision import for_inference

    torch.set_num_threads(TRAIN_WORKER_CPUS)  # a training worker's threads: the same rounding
    model_path = str(localize(model_path))  # this node's copy of a checkpoint on an object store
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = for_inference(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), dtype)

    def run(path: str, limit: int | None, batches: list[list[int]] | None) -> pd.DataFrame:
        rows = pq.read_table(path).to_pylist()
        wanted = len(rows) if limit is None else min(limit, len(rows))
        pairs = [tokenize_pair(tokenizer, row, max_length) for row in rows]
        logps: dict[int, tuple[float, float]] = {}
        with torch.no_grad():
            for batch in plan_batches(batches, wanted, micro_batch):
                c, r = policy_logps(model, collate([pairs[i] for i in batch], pad_id))
                for i, chosen, rejected in zip(batch, c.tolist(), r.tolist()):
                    logps.setdefault(i, (chosen, rejected))
        return _frame(rows, pairs, logps, wanted)

    result = run(pairs_file, limit, batches)
    return result if also is None else (result, run(also, None, None))


def _frame(rows: list[dict], pairs: list, logps: dict[int, tuple[float, float]], wanted: int) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt_id": [rows[i]["prompt_id"] for i in range(wanted)],
        "logps_chosen": [logps[i][0] for i in range(wanted)],
        "logps_rejected": [logps[i][1] for i in range(wanted)],
        "tokens_chosen": [len(pairs[i].chosen) for i in range(wanted)],
        "tokens_rejected": [len(pairs[i].rejected) for i in range(wanted)],
    })  # fmt: skip
