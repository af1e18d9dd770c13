"""Log-probs of chosen and rejected responses under one model, as a Ray task.

Uses the training code's tokenization and `policy_logps`, on a plain (unsharded) model under the
training precision policy (`stages/train/precision.for_inference`: parameters in the compute
dtype as FSDP2 casts them, no autocast; bf16 logits reduced in fp32), so the "before" numbers
are the reference log-probs training wrote to `reference_logps.parquet` — up to bf16's rounding
differences between batch shapes.
"""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import ray
import torch


@ray.remote(num_cpus=1)
def pair_logps(model_path: str, pairs_file: str, max_length: int, limit: int | None, dtype: str = "float32",
               micro_batch: int = 4) -> pd.DataFrame:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import policy_logps
    from stages.train.precision import for_inference

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = for_inference(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), dtype)
    rows = pq.read_table(pairs_file).to_pylist()[:limit]
    pairs = [tokenize_pair(tokenizer, row, max_length) for row in rows]
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), micro_batch):
            c, r = policy_logps(model, collate(pairs[start : start + micro_batch], pad_id))
            chosen += c.tolist()
            rejected += r.tolist()
    return pd.DataFrame({"prompt_id": [r["prompt_id"] for r in rows], "logps_chosen": chosen, "logps_rejected": rejected})
