"""Tests for stages/train/precision.py: FSDP2's policy and its unsharded counterpart agree."""

from __future__ import annotations

import pytest
import torch

from stages.train.precision import compute_dtype, for_inference, fsdp_policy


def test_bf16_policy_is_bf16_params_over_fp32_reductions():
    mp = fsdp_policy("bfloat16")
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_policy("float32").param_dtype is None  # no casts


def test_unknown_dtype_names_the_allowed_ones():
    with pytest.raises(ValueError, match="float32, bfloat16"):
        compute_dtype("float16")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).train()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_for_inference_casts_parameters_as_fsdp_param_dtype_does(dtype):
    """Parameters in the compute dtype, buffers (rotary inv_freq) left fp32 as FSDP2 leaves them:
    casting inv_freq to bf16 too moves the logps by 4e-3 (tests/stage/test_precision.py)."""
    model = _tiny_llama()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    out = for_inference(model, dtype)
    assert out is model and not model.training
    for name, p in model.named_parameters():
        assert p.dtype == compute_dtype(dtype), name
        assert torch.equal(p.float(), weights[name].to(compute_dtype(dtype)).float()), name
    assert all(b.dtype == torch.float32 for b in model.buffers())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
