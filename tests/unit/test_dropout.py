"""Tests for `disable_dropout` (stages/train/loop.py): train-mode forwards become the eval forward.

Two kinds of dropout on tiny random models: `nn.Dropout` modules (GPT-2's resid/embd/attn_pdrop)
and a float attribute read only in train mode (Llama's `attention_dropout`, handed to the
attention kernel as its dropout probability).
"""

from __future__ import annotations

import pytest
import torch

from stages.train.loop import disable_dropout

VOCAB, SEQ = 64, 12


def _gpt2(attn_implementation: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)  # fmt: skip
    return GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation)


def _llama(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5)  # fmt: skip
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)


MODELS = {"gpt2": _gpt2, "llama": _llama}
CONFIG_DROPOUTS = {"gpt2": ["resid_pdrop", "embd_pdrop", "attn_pdrop"], "llama": ["attention_dropout"]}


def _forward(model, train: bool) -> torch.Tensor:
    ids = torch.arange(SEQ).remainder(VOCAB).unsqueeze(0)
    model.train(train)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=[(name, impl) for name in MODELS for impl in ("eager", "sdpa")], ids=lambda p: f"{p[0]}-{p[1]}")
def model_case(request):
    name, impl = request.param
    torch.manual_seed(0)
    return name, MODELS[name](impl)


def test_dropout_changes_train_mode_forwards_before(model_case):
    """Without this the test below would pass for a model that has no dropout to disable."""
    _, model = model_case
    first, second, evaluated = _forward(model, True), _forward(model, True), _forward(model, False)
    assert not torch.equal(first, second)
    assert not torch.equal(first, evaluated)


def test_train_mode_forward_equals_eval_forward_after_disable_dropout(model_case):
    _, model = model_case
    evaluated = _forward(model, False)
    assert disable_dropout(model) is model
    first, second = _forward(model, True), _forward(model, True)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, evaluated, rtol=0, atol=0)


def test_disable_dropout_keeps_the_config(model_case):
    """The saved checkpoint's config.json must keep the user's dropout settings."""
    name, model = model_case
    disable_dropout(model)
    for key in CONFIG_DROPOUTS[name]:
        assert getattr(model.config, key) == 0.5, key
