"""Tests for stages/train/batch.py (tokenize_pair, collate), loop.batch_schedule and
train.effective_batch_size."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from stages.train import effective_batch_size
from stages.train.batch import TokenizedPair, collate, tokenize_pair
from stages.train.loop import batch_schedule


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _chatml(messages, generation_prompt=True) -> str:
    """The ChatML rendering written out by hand (the template in tests/conftest.py)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


PROMPT = [
    {"role": "system", "content": "Solve it step by step."},
    {"role": "user", "content": "Tom has 3 bags of 4 apples. How many apples?"},
]
CHOSEN = "3 × 4 = 12 apples. The answer is 12."
REJECTED = "3 + 4 = 7. The answer is 7."


def _row(prompt=PROMPT, chosen=CHOSEN, rejected=REJECTED):
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ── tokenize_pair ────────────────────────────────────────────────────────────────────────────
def test_prompt_is_chat_template_with_generation_prompt(tokenizer):
    pair = tokenize_pair(tokenizer, _row(), max_length=512)
    assert tokenizer.decode(pair.prompt) == _chatml(PROMPT)
    assert pair.prompt == _ids(tokenizer, _chatml(PROMPT))
    tail = _ids(tokenizer, "<|im_start|>assistant\n")
    assert pair.prompt[-len(tail):] == tail
    assert pair.prompt[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_responses_end_with_eos(tokenizer):
    pair = tokenize_pair(tokenizer, _row(), max_length=512)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == eos
    for ids, text in ((pair.chosen, CHOSEN), (pair.rejected, REJECTED)):
        assert ids[-1] == eos
        assert ids.count(eos) == 1
        assert tokenizer.decode(ids[:-1]) == text
        assert ids[:-1] == _ids(tokenizer, text)
    # the full chosen sequence reads as the chat the policy produced
    whole = _chatml(PROMPT + [{"role": "assistant", "content": CHOSEN}], generation_prompt=False)
    assert tokenizer.decode(pair.prompt + pair.chosen) == whole.removesuffix("\n")


def test_a_response_cut_off_by_the_token_budget_gets_no_eos(tokenizer):
    eos = tokenizer.eos_token_id
    row = {**_row(), "chosen_finish_reason": "stop", "rejected_finish_reason": "length"}
    pair = tokenize_pair(tokenizer, row, max_length=512)
    assert pair.chosen == _ids(tokenizer, CHOSEN) + [eos]
    assert pair.rejected == _ids(tokenizer, REJECTED), "DPO must not push on an EOS the policy never wrote"


def test_sampled_token_ids_are_trained_on_as_they_are(tokenizer):
    """The ids the policy produced win over the text: here a split no tokenizer would produce
    from the text (one character per token), with and without the EOS the sampler kept."""
    eos = tokenizer.eos_token_id
    by_char = [i for ch in CHOSEN for i in _ids(tokenizer, ch)]
    assert by_char != _ids(tokenizer, CHOSEN)  # the text alone would tokenize differently
    row = {**_row(), "chosen_token_ids": by_char + [eos], "rejected_token_ids": _ids(tokenizer, "3 + 4"),
           "rejected_finish_reason": "length"}  # fmt: skip
    pair = tokenize_pair(tokenizer, row, max_length=512)
    assert pair.chosen == by_char + [eos]
    assert pair.rejected == _ids(tokenizer, "3 + 4")  # cut off: no EOS added to sampled ids either


def test_plain_string_format(tokenizer):
    row = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
    pair = tokenize_pair(tokenizer, row, max_length=512)
    assert tokenizer.decode(pair.prompt) == _chatml([{"role": "user", "content": "What is 2 + 3?"}])
    assert tokenizer.decode(pair.chosen) == "5<|im_end|>"
    assert tokenizer.decode(pair.rejected) == "6<|im_end|>"
    conversational = tokenize_pair(tokenizer, _row([{"role": "user", "content": "What is 2 + 3?"}], "5", "6"), 512)
    assert pair == conversational


def test_truncation_keeps_prompt_and_cuts_response(tokenizer):
    full = tokenize_pair(tokenizer, _row(chosen=CHOSEN * 4, rejected=REJECTED), max_length=10_000)
    n_prompt = len(full.prompt)
    max_length = 2 * n_prompt + 4  # prompt fits in half the budget
    assert len(full.chosen) > max_length - n_prompt  # the chosen response must be cut
    assert len(full.rejected) <= max_length - n_prompt  # the rejected one fits
    cut = tokenize_pair(tokenizer, _row(chosen=CHOSEN * 4, rejected=REJECTED), max_length=max_length)
    assert cut.prompt == full.prompt
    assert len(cut.prompt) + len(cut.chosen) == max_length
    assert cut.chosen == full.chosen[: max_length - n_prompt]  # cut at the end (no EOS left)
    assert cut.chosen[-1] != tokenizer.eos_token_id
    assert cut.rejected == full.rejected  # untouched


def test_long_prompt_is_cut_from_the_left(tokenizer):
    long_prompt = [{"role": "user", "content": "Tom has 3 bags of 4 apples. " * 12}]
    full = tokenize_pair(tokenizer, _row(long_prompt, CHOSEN * 6, REJECTED * 6), max_length=10_000)
    max_length = 40
    assert len(full.prompt) > max_length // 2
    assert len(full.prompt) + len(full.chosen) > max_length
    cut = tokenize_pair(tokenizer, _row(long_prompt, CHOSEN * 6, REJECTED * 6), max_length=max_length)
    assert cut.prompt == full.prompt[-len(cut.prompt):]  # the end (generation prompt) is kept
    assert len(cut.prompt) <= max_length
    for side in ("chosen", "rejected"):
        ids = getattr(cut, side)
        assert len(cut.prompt) + len(ids) <= max_length
        assert len(ids) > 0  # the response keeps some tokens
        assert ids == getattr(full, side)[: len(ids)]


def test_pair_that_fits_is_not_truncated(tokenizer):
    long_prompt = [{"role": "user", "content": "Tom has 3 bags of 4 apples. " * 4}]
    full = tokenize_pair(tokenizer, _row(long_prompt, "12", "7"), max_length=10_000)
    max_length = len(full.prompt) + max(len(full.chosen), len(full.rejected))
    assert len(full.prompt) > max_length // 2  # the case at issue
    assert tokenize_pair(tokenizer, _row(long_prompt, "12", "7"), max_length=max_length) == full


# ── collate ──────────────────────────────────────────────────────────────────────────────────
def test_collate_layout_masks_and_padding(tokenizer):
    rows = [_row(), _row(chosen="12", rejected=REJECTED * 2), {"prompt": "Hi?", "chosen": "7", "rejected": "8"}]
    pairs = [tokenize_pair(tokenizer, r, max_length=512) for r in rows]
    pad = tokenizer.pad_token_id
    batch = collate(pairs, pad_token_id=pad)
    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.loss_mask.shape == (6, width)
    assert batch.num_pairs == 3
    for i, (prompt, response) in enumerate(seqs):
        n = len(prompt) + len(response)
        assert batch.input_ids[i, :n].tolist() == prompt + response
        assert batch.input_ids[i, n:].tolist() == [pad] * (width - n)
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (width - n)
        assert batch.loss_mask[i].tolist() == [0] * len(prompt) + [1] * len(response) + [0] * (width - n)
    # the loss covers exactly the response tokens, and the EOS of each response
    assert batch.loss_mask.sum().item() == sum(len(r) for _, r in seqs)
    eos = tokenizer.eos_token_id
    for i, (prompt, response) in enumerate(seqs):
        last = len(prompt) + len(response) - 1
        assert batch.input_ids[i, last] == eos and batch.loss_mask[i, last] == 1
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.loss_mask.dtype == torch.long


def test_collate_hand_made():
    pairs = [TokenizedPair([5, 6], [7, 8, 9], [10]), TokenizedPair([11], [12], [13, 14])]
    batch = collate(pairs, pad_token_id=0)
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 8, 9],
        [11, 12, 0, 0, 0],
        [5, 6, 10, 0, 0],
        [11, 13, 14, 0, 0],
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids)


# ── batch_schedule ───────────────────────────────────────────────────────────────────────────
def test_schedule_epochs_are_permutations():
    steps = batch_schedule(num_pairs=12, batch_size=3, epochs=3, seed=7, max_steps=None)
    assert len(steps) == 12
    assert all(len(s) == 3 for s in steps)
    epochs = [sum(steps[e * 4 : (e + 1) * 4], []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert epochs[0] != epochs[1]  # a fresh shuffle per epoch
    assert epochs[0] != list(range(12))  # actually shuffled


def test_schedule_drops_partial_batch():
    steps = batch_schedule(num_pairs=10, batch_size=4, epochs=2, seed=0, max_steps=None)
    assert len(steps) == 4  # 2 full batches per epoch; the 2 left over are dropped
    assert all(len(s) == 4 for s in steps)
    for e in range(2):
        seen = steps[2 * e] + steps[2 * e + 1]
        assert len(set(seen)) == 8 and set(seen) <= set(range(10))
    assert batch_schedule(num_pairs=3, batch_size=4, epochs=2, seed=0, max_steps=None) == []


def test_schedule_deterministic_by_seed():
    a = batch_schedule(num_pairs=20, batch_size=5, epochs=2, seed=1, max_steps=None)
    assert a == batch_schedule(num_pairs=20, batch_size=5, epochs=2, seed=1, max_steps=None)
    assert a != batch_schedule(num_pairs=20, batch_size=5, epochs=2, seed=2, max_steps=None)


def test_schedule_max_steps():
    full = batch_schedule(num_pairs=20, batch_size=4, epochs=3, seed=0, max_steps=None)
    assert len(full) == 15
    assert batch_schedule(num_pairs=20, batch_size=4, epochs=3, seed=0, max_steps=7) == full[:7]
    assert batch_schedule(num_pairs=20, batch_size=4, epochs=3, seed=0, max_steps=100) == full


# ── effective_batch_size ─────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("num_pairs, batch_size, workers, want", [
    (100, 8, 2, 8),
    (8, 8, 2, 8),
    (7, 8, 2, 6),
    (5, 8, 2, 4),
    (7, 8, 4, 4),
    (3, 16, 3, 3),
    (1, 8, 1, 1),
])  # fmt: skip
def test_effective_batch_size(num_pairs, batch_size, workers, want):
    got = effective_batch_size(num_pairs, batch_size, workers)
    assert got == want
    assert got % workers == 0 and got <= max(num_pairs, batch_size)


@pytest.mark.parametrize("num_pairs, workers", [(1, 2), (3, 4), (0, 1)])
def test_effective_batch_size_too_few_pairs(num_pairs, workers):
    with pytest.raises(UserError) as info:
        effective_batch_size(num_pairs, 8, workers)
    assert f"only {num_pairs} preference pair" in str(info.value)
    assert f"{workers} training worker" in str(info.value)
