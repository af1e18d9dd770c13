"""The reward model of `method: {type: reward_model}`: the policy's backbone with a one-output head.

Seed 003 §5.3 trains a Bradley–Terry reward model and DPO on the same pairs from the same
initialisation, and compares their preference accuracy on held-out pairs step by step. Here the
reward model is `AutoModelForSequenceClassification(policy, num_labels=1)`: the policy's decoder
and a new linear `score` head (initialised from `train.seed`, alike on every worker), as TRL's
`RewardTrainer` builds it. It reads a pair as the reward-model judge does (`pipeline/chat.py`:
the whole conversation through the chat template, the reward at the last non-pad token), so the
saved checkpoint is a judge as it is: `judge: {type: reward_model, model: .../checkpoint}`.
The loop treats it like a policy whose "log-probs" are rewards (`loop.pair_logps`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def is_reward_model(model: Any) -> bool:
    """A sequence-classification model (FSDP2 keeps the class name as a suffix: FSDPLlamaFor...)."""
    return type(model).__name__.endswith("ForSequenceClassification")


def load_reward_backbone(path: str, tokenizer: Any) -> Any:
    """The policy's weights under a fresh one-output head, fp32, its `pad_token_id` set for HF's pooling."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from pipeline.chat import reward_pad_id

    # "Some weights ... were not initialized: ['score.weight']" is the point here, not news
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    pad_id = reward_pad_id(model.config, tokenizer)
    model.config.get_text_config().pad_token_id = model.config.pad_token_id = pad_id
    return model


def pair_rewards(model: Any, input_ids: Tensor, attention_mask: Tensor, num_pairs: int) -> tuple[Tensor, Tensor]:
    """(r(x,y+) [B], r(x,y−) [B]) from one forward over the 2B right-padded conversations."""
    rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    return rewards[:num_pairs], rewards[num_pairs:]
