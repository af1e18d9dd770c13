"""Pairs → token ids → padded batches (chosen rows first, then rejected).

The prompt is rendered with the tokenizer's chat template exactly as vLLM rendered it for
sampling (`add_generation_prompt=True`), and each response is followed by EOS, so the training
log-probs are of the very tokens the policy produced.
"""

from __future__ import annotations

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


def tokenize_pair(tokenizer, row: dict[str, Any], max_length: int) -> TokenizedPair:
    """Tokenize one pair; truncate responses (then the prompt, from the left) to `max_length`."""
    text = tokenizer.apply_chat_template(_messages(row["prompt"]), add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chosen = tokenizer(_response_text(row["chosen"]), add_special_tokens=False)["input_ids"] + eos
    rejected = tokenizer(_response_text(row["rejected"]), add_special_tokens=False)["input_ids"] + eos
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length and len(prompt) > max_length // 2:
        # keep the end of the prompt (the question), as much as fits but at least half the budget
        prompt = prompt[-max(max_length // 2, max_length - longest):]
    budget = max_length - len(prompt)
    return TokenizedPair(prompt, chosen[:budget], rejected[:budget])


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


def collate(pairs: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(seqs):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        attention_mask[i, :n] = 1
        loss_mask[i, len(prompt):n] = 1
    return Batch(input_ids, attention_mask, loss_mask)
