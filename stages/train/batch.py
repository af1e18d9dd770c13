"""Pairs → token ids → padded batches (chosen rows first, then rejected).

The prompt is rendered with the tokenizer's chat template exactly as vLLM rendered it for
sampling (`add_generation_prompt=True`). A response is scored as the very tokens the policy
produced: the sampled ids the pairs carry (EOS included when the policy stopped on it), not a
re-tokenisation of the decoded text, which can split differently. Text without ids (a dataset
solution, pairs from elsewhere) is tokenized and gets EOS, unless its `finish_reason` says the
token budget cut it off: DPO must not push on an EOS the policy never wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):  # plain (non-conversational) TRL format
        return [{"role": "user", "content": value}]
    return [dict(m) for m in value]


def _response_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    turns = [dict(m) for m in value]
    return "".join(t["content"] for t in turns if t["role"] == "assistant")


def response_ids(tokenizer, row: dict[str, Any], side: str) -> list[int]:
    """Token ids of the `side` ("chosen" or "rejected") response of a pair row."""
    sampled = row.get(f"{side}_token_ids")
    if sampled is not None:
        return [int(t) for t in sampled]
    ids = tokenizer(_response_text(row[side]), add_special_tokens=False)["input_ids"]
    cut_off = row.get(f"{side}_finish_reason") == "length"
    return ids if cut_off or tokenizer.eos_token_id is None else ids + [tokenizer.eos_token_id]


def tokenize_pair(tokenizer, row: dict[str, Any], max_length: int) -> TokenizedPair:
    """Tokenize one pair; truncate responses (then the prompt, from the left) to `max_length`."""
    text = tokenizer.apply_chat_template(_messages(row["prompt"]), add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    chosen, rejected = response_ids(tokenizer, row, "chosen"), response_ids(tokenizer, row, "rejected")
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length and len(prompt) > max_length // 2:
        # keep the end of the prompt (the question), as much as fits but at least half the budget
        prompt = prompt[-max(max_length // 2, max_length - longest):]
    budget = max_length - len(prompt)
    return TokenizedPair(prompt, chosen[:budget], rejected[:budget])


def tokenize_reward_pair(tokenizer, row: dict[str, Any], max_length: int) -> TokenizedPair:
    """A pair as a reward model reads it (`pipeline/chat.py`, as the reward-model judge does): each
    side the whole conversation, prompt chat + response text, cut from the left to `max_length`.
    No shared prompt (`prompt` is empty): each sequence is "response" to `collate`."""
    from pipeline.chat import conversation_ids, keep_end

    messages = _messages(row["prompt"])
    chosen, _ = keep_end(conversation_ids(tokenizer, messages, _response_text(row["chosen"])), max_length)
    rejected, _ = keep_end(conversation_ids(tokenizer, messages, _response_text(row["rejected"])), max_length)
    return TokenizedPair([], chosen, rejected)


TOKENIZED_COLUMNS = ("prompt_id", "prompt_ids", "chosen_ids", "rejected_ids")


def write_tokenized(path, tokenizer, rows: list[dict[str, Any]], max_length: int, reward_model: bool = False) -> int:
    """Tokenize every pair once (in the driver) into a Parquet of token ids that every worker
    reads, instead of each worker tokenizing every pair: `prompt_id, prompt_ids, chosen_ids,
    rejected_ids`, in the pairs file's order (for a reward model, `tokenize_reward_pair`'s).
    Returns the number of pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenize = tokenize_reward_pair if reward_model else tokenize_pair
    pairs = [tokenize(tokenizer, row, max_length) for row in rows]
    table = pa.table({
        "prompt_id": [str(row.get("prompt_id", i)) for i, row in enumerate(rows)],
        "prompt_ids": [p.prompt for p in pairs], "chosen_ids": [p.chosen for p in pairs],
        "rejected_ids": [p.rejected for p in pairs],
    })  # fmt: skip
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # whole or absent: a resumed stage reuses it
    return len(pairs)


def read_tokenized(path) -> list[TokenizedPair]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(TOKENIZED_COLUMNS[1:])).to_pydict()
    return [TokenizedPair(list(p), list(c), list(r))
            for p, c, r in zip(table["prompt_ids"], table["chosen_ids"], table["rejected_ids"])]  # fmt: skip


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # [2B, T]: B chosen sequences, then their B rejected
    attention_mask: Tensor  # [2B, T]
    loss_mask: Tensor  # [2B, T]: 1 on response tokens

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


def collate(pairs: Sequence[TokenizedPair], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad the 2B sequences to one width, on the right (training's default) or on the left (as a
    generation batch is); the log-probs are the same either way (`loop.policy_logps`, tested)."""
    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(seqs):
        n = len(prompt) + len(response)
        start = 0 if padding_side == "right" else width - n
        input_ids[i, start : start + n] = torch.tensor(prompt + response)
        attention_mask[i, start : start + n] = 1
        loss_mask[i, start + len(prompt) : start + n] = 1
    return Batch(input_ids, attention_mask, loss_mask)
