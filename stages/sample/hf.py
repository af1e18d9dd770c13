"""The `hf` sampler: batched transformers `generate` on a Ray Data actor pool.

For models vLLM cannot serve (an architecture it lacks, custom modelling code), and for quick
runs: there is no engine to start, so a tiny model samples in seconds. It writes the rows the vLLM
sampler writes (`CANDIDATE_COLUMNS`). The prompt is rendered with the chat template exactly as
training renders it (`stages/train/batch.py`), and the response ids are the very ids `generate`
returned, cut after the first stop token (EOS kept): what follows it is padding.

The prompts are cut into blocks of `batch_size` here, in order, and Ray Data hands each actor call
one whole block, so a batch is the same on any cluster. Each call left-pads its prompts, repeats
each `n` times and seeds torch with a hash of (`seed`, the batch's first prompt_id): the samples
depend on the seed and the batch, not on which actor took it or when. `temperature` 0 is greedy
(evaluate's answers).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipeline.artifacts import localize
from pipeline.config import HFSampler
from stages.sample.candidates import SCHEMA, build_messages, finish_reason, stop_token_ids


def batch_seed(seed: int, prompt_id: str) -> int:
    """The torch seed of the batch that starts with `prompt_id`: the same in every process
    (Python's `hash` of a string is not)."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # < 2**63


def until_stop(ids: list[int], stop_ids: frozenset[int]) -> list[int]:
    """A generated row up to and including its first stop token. `generate` fills a finished row
    with `pad_token_id`, which may be EOS itself; without a stop token the row is all the model's."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[: i + 1]
    return ids


class HFGenerator:
    """A Ray Data actor: loads the model once, turns a batch of prompt rows into `n` candidate
    rows each."""

    def __init__(self, sampler: HFSampler, model_path: str, model_name: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.sampler, self.model_name = sampler, model_name
        self.device = torch.device("cuda" if sampler.use_gpu else "cpu")
        model_path = str(localize(model_path))  # this node's copy of a checkpoint on an object store
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.stop_ids = stop_token_ids(model_path)
        pads = (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0)
        self.pad_id = next(p for p in pads if p is not None)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, sampler.dtype))
        self.model = model.to(self.device).eval()

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has its specials

    def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """`n` responses per prompt; row `i * n + c` is candidate `c` of prompt `i`."""
        import torch

        s = self.sampler
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        # `n` copies of each prompt rather than `num_return_sequences`, which greedy search refuses.
        input_ids, attention_mask = (
            t.repeat_interleave(s.n, dim=0).to(self.device) for t in (input_ids, attention_mask)
        )
        if s.temperature > 0:  # top_k 0: off, as in vLLM (transformers' default is 50)
            how = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
        else:
            how = {"do_sample": False}
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=s.max_tokens,
                pad_token_id=self.pad_id, eos_token_id=sorted(self.stop_ids) or None, **how,
            )  # fmt: skip
        return [until_stop(row, self.stop_ids) for row in out[:, width:].tolist()]

    def __call__(self, batch: pa.Table) -> pa.Table:
        s, prompts = self.sampler, batch.to_pylist()
        chats = [build_messages(s, p["prompt"]) for p in prompts]
        prompt_ids = [self.prompt_ids(m) for m in chats]
        responses = self.generate(prompt_ids, batch_seed(s.seed, prompts[0]["prompt_id"]))
        rows: list[dict[str, Any]] = []
        for i, (p, messages, ids) in enumerate(zip(prompts, chats, prompt_ids)):
            for c, response in enumerate(responses[i * s.n : (i + 1) * s.n]):
                rows.append({
                    "prompt_id": p["prompt_id"], "candidate_id": c, "prompt": p["prompt"], "messages": messages,
                    "solution": p.get("solution"), "answer": p.get("answer"),
                    "response": self.tokenizer.decode(response, skip_special_tokens=True),
                    "prompt_token_ids": ids, "response_token_ids": response,
                    "prompt_tokens": len(ids), "response_tokens": len(response),
                    "finish_reason": finish_reason(response, self.stop_ids, s.max_tokens),
                    "sampler": s.type, "model": self.model_name, "seed": s.seed,
                })  # fmt: skip
        return pa.Table.from_pylist(rows, schema=SCHEMA)


def generate(sampler: HFSampler, model_path: str, model_name: str, prompts: list[dict], out_dir: Path) -> None:
    """Write `sampler.n` candidates for every prompt as Parquet files under `out_dir`."""
    # One Arrow block per batch, cut here: Ray Data hands each actor call one whole block, so a
    # batch (its padding, its seed) is the same on any cluster. `from_items` would split by the
    # cluster's CPU count.
    size = sampler.batch_size
    blocks = [pa.Table.from_pylist(prompts[i : i + size]) for i in range(0, len(prompts), size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        HFGenerator,
        fn_constructor_kwargs={"sampler": sampler, "model_path": model_path, "model_name": model_name},
        compute=ray.data.ActorPoolStrategy(size=sampler.workers),
        num_gpus=1 if sampler.use_gpu else 0,
        num_cpus=1,
        batch_size=size,
        batch_format="pyarrow",
    )
    ds.write_parquet(str(out_dir))
