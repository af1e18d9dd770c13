"""How a reward model reads a (prompt, response): shared by the reward-model judge and training.

A reward model trained on one rendering and asked for verdicts on another scores text it never
saw: the train stage (`method: {type: reward_model}`) and the reward-model judge render the
conversation here, the same way, as TRL's `RewardTrainer` does: the prompt's chat plus
`{"role": "assistant", "content": response}`, through the tokenizer's chat template with no
generation prompt, cut FROM THE LEFT to `max_length` tokens (a reward model reads its verdict
from the end; a long prompt loses its start). The reward is the sequence-classification head's
logit at the row's last token that is not `pad_token_id`: HF's pooling, with the pad id below
written into the model's config.
"""

from __future__ import annotations

from typing import Any, Sequence


def conversation_ids(tokenizer: Any, messages: Sequence[Any], response: str) -> list[int]:
    """Token ids of the prompt's chat followed by the assistant's `response`, whole."""
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    chat.append({"role": "assistant", "content": response})
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has its specials


def keep_end(ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """The last `max_length` ids, and whether any were cut."""
    return ids[-max_length:], len(ids) > max_length


def reward_pad_id(model_config: Any, tokenizer: Any) -> int:
    """The pad id a reward model's rows are padded with and HF's pooling skips: the model's own,
    else the tokenizer's pad, else its EOS, else 0."""
    text = model_config.get_text_config()
    pads = (text.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
    return next(p for p in pads if p is not None)
