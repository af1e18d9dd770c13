"""RoPO (stages/train/ropo.py): the rotation is orthogonal and equals the product of its Givens
matrices built densely; the layer starts exactly at the base; training moves the weights but not
the angles between neurons or the hyperspherical energy; the merged plain model equals the
adapted one; the trainable share on Llama-3-8B's shape (meta device) is the paper's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stages.evaluate.geometry import hyperspherical_energy, neuron_cosines
from stages.train.ropo import (RoPOLinear, apply_ropo, block_size, merge_state_dict, merged_weight, parameter_counts,
                               rotate, rotate_blocks, rotation_matrix, sweep, sweep_blocks)  # fmt: skip


def _givens_product(d: int, angles: torch.Tensor, stages) -> torch.Tensor:
    """R as the product of one dense d × d Givens matrix per rotated pair, stage by stage."""
    R = torch.eye(d, dtype=torch.float64)
    offset = 0
    for _, _, a, b in stages:
        for k, (i, j) in enumerate(zip(a.tolist(), b.tolist())):
            G = torch.eye(d, dtype=torch.float64)
            c, s = math.cos(angles[offset + k]), math.sin(angles[offset + k])
            G[i, i], G[i, j], G[j, i], G[j, j] = c, s, -s, c  # row vector x: x·G maps (x_i, x_j) to (c·x_i − s·x_j, s·x_i + c·x_j)
            R = R @ G
        offset += len(a)
    return R


@pytest.mark.parametrize("d,stages", [(8, 2), (12, 2), (7, 1), (16, 3), (20, 3), (24, 3)])  # (7, 1), (20, 3): no block divides d
def test_rotation_is_the_product_of_its_givens_matrices_and_orthogonal(d, stages):
    pairs = sweep(d, stages)
    for _, _, a, b in pairs:  # each stage: disjoint pairs
        assert len(set(a.tolist()) | set(b.tolist())) == 2 * len(a)
    planes = [{frozenset(p) for p in zip(a.tolist(), b.tolist())} for _, _, a, b in pairs]
    assert all(not (p & q) for p, q in zip(planes, planes[1:])), "two stages in a row share a plane: they would be one"
    angles = torch.randn(sum(len(st.left) for st in pairs), generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    R = rotation_matrix(d, angles, pairs)
    torch.testing.assert_close(R, _givens_product(d, angles, pairs), atol=1e-12, rtol=0)
    torch.testing.assert_close(R @ R.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, angles, pairs, inverse=True), x @ R.T, atol=1e-12, rtol=0)
    if block_size(d, pairs):  # the layer's fast path: the two sweeps as blocks
        forward, reverse = sweep_blocks(d, angles, pairs)
        torch.testing.assert_close(rotate_blocks(x, forward, reverse, pairs[len(pairs) // 2].shift), x @ R, atol=1e-12, rtol=0)


def test_every_coordinate_is_rotated_in_both_sweeps():
    pairs = sweep(64, 2)
    assert len(pairs) == 4
    for _, _, a, b in pairs:
        assert sorted(a.tolist() + b.tolist()) == list(range(64))


def test_merged_weight_is_diag_m_w_r_transposed():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    pairs = sweep(8, 2)
    angles = torch.randn(sum(len(st.left) for st in pairs), generator=gen, dtype=torch.float64)
    m = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    torch.testing.assert_close(merged_weight(W, angles, m, pairs), torch.diag(m) @ W @ rotation_matrix(8, angles, pairs).T,
                               atol=1e-12, rtol=0)  # fmt: skip


def test_layer_is_the_base_layer_at_initialisation_and_trains_only_angles_and_magnitudes():
    base = nn.Linear(16, 5)
    layer = RoPOLinear(base, stages=2)
    x = torch.randn(3, 7, 16)
    assert torch.equal(layer(x), base(x))  # angles 0, m 1: bit for bit
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"angles", "magnitude"}
    assert set(layer.state_dict()) == {"weight", "bias", "angles", "magnitude"}  # index buffers are not saved
    assert layer.angles.numel() == 2 * 16 and layer.magnitude.numel() == 5


def _dpo_steps(model, batch, steps: int, lr: float) -> None:
    from stages.train.loop import make_optimizer, policy_logps
    from stages.train.objectives import PairLogps, dpo

    with torch.no_grad():
        ref_c, ref_r = policy_logps(model, batch)

    class Cfg:
        optimizer, weight_decay = "adamw", 0.0

    Cfg.lr = lr
    opt = make_optimizer(model, Cfg)
    for _ in range(steps):
        c, r = policy_logps(model, batch)
        n = torch.ones_like(c)
        dpo(PairLogps(c, r, n, n, ref_c, ref_r), beta=0.1).losses.mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def trained(tiny_llama):
    """The tiny Llama with RoPO on q_proj, v_proj and up_proj after 5 AdamW steps of DPO."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train.batch import collate, tokenize_pair
    from tests.unit.test_ogd import PAIRS

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    batch = collate([tokenize_pair(tokenizer, row, 256) for row in PAIRS], tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    adapted = apply_ropo(model, ["q_proj", "v_proj", "up_proj"], stages=2)
    with torch.no_grad():
        initial_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        base_logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    _dpo_steps(model, batch, steps=5, lr=0.05)
    return {"base": base, "model": model, "adapted": adapted, "batch": batch,
            "initial_logits": initial_logits, "base_logits": base_logits}  # fmt: skip


def test_adapted_model_starts_exactly_at_the_reference(trained):
    assert torch.equal(trained["initial_logits"], trained["base_logits"])


def test_only_the_adapted_layers_moved_and_they_did(trained):
    model, base = trained["model"], trained["base"]
    assert len(trained["adapted"]) == 3 * 2  # three kinds × two layers
    merged = merge_state_dict(model, model.state_dict())
    assert merged.keys() == base.state_dict().keys()
    for key, w in base.state_dict().items():
        moved = float((merged[key] - w).abs().max())
        if any(f".{name}." in key for name in ("q_proj", "v_proj", "up_proj")) and key.endswith("weight"):
            assert moved > 1e-3, f"{key} did not move: training would be trivial"
        else:
            assert moved == 0.0, key


def test_neuron_angles_and_hyperspherical_energy_are_unchanged_by_training(trained):
    """Seed 000's invariant: W' = diag(m)·W·Rᵀ keeps every angle between W's rows (to 1e-5 in
    fp32) and so the hyperspherical energy, while DPO steps change the magnitudes and rotation."""
    merged = merge_state_dict(trained["model"], trained["model"].state_dict())
    for name in trained["adapted"]:
        W, W1 = trained["base"].get_submodule(name).weight.detach(), merged[f"{name}.weight"]
        assert float((neuron_cosines(W1) - neuron_cosines(W)).abs().max()) <= 1e-5, name
        he, he1 = hyperspherical_energy(W), hyperspherical_energy(W1)
        assert he1 == pytest.approx(he, rel=1e-6), name
        layer = trained["model"].get_submodule(name)
        assert float(layer.angles.detach().abs().max()) > 1e-3 and float((layer.magnitude.detach() - 1).abs().max()) > 1e-3


def test_a_full_weight_dpo_step_does_change_the_energy(tiny_llama, trained):
    """The invariant is RoPO's, not any training's: the same DPO steps on full weights move HE."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    _dpo_steps(model, trained["batch"], steps=5, lr=0.01)
    for name in trained["adapted"]:
        W, W1 = trained["base"].get_submodule(name).weight, model.get_submodule(name).weight
        assert abs(hyperspherical_energy(W1) / hyperspherical_energy(W) - 1) > 1e-5, name


def test_merged_plain_model_equals_the_adapted_model(tiny_llama, trained):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    plain.load_state_dict(merge_state_dict(trained["model"], trained["model"].state_dict()))
    batch = trained["batch"]
    with torch.no_grad():
        want = trained["model"](input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert float((want - trained["initial_logits"]).abs().max()) > 1e-3  # the adapted model did move
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_trainable_share_of_llama_3_8b_is_the_papers():
    """Seed 000 trains 0.0086% of an 8B model's parameters; q_proj and v_proj with two stages per
    sweep give it on Llama-3-8B's shape (built on the meta device: no memory, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        full = parameter_counts(model)
        apply_ropo(model, ["q_proj", "v_proj"], stages=2)
    counts = parameter_counts(model)
    assert full["total"] == counts["total"] == 8_030_261_248
    # per layer: angles 2 × (2 stages × 2 sweeps × 4096/2) + magnitudes 4096 (q) + 1024 (v)
    assert counts["trainable"] == 32 * (2 * 8192 + 4096 + 1024)
    assert round(counts["trainable_percent"], 4) == 0.0086


def test_unknown_module_names_are_an_error_naming_the_layers_there_are(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match=r"no linear layer named qkv_proj .*its linear layers are .*q_proj"):
        apply_ropo(model, ["q_proj", "qkv_proj"], stages=2)
