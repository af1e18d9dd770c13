"""Hyperspherical energy and distinct-n (stages/evaluate/geometry.py, diversity.py) against
hand-derived cases and a brute-force double loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stages.evaluate.diversity import distinct, distinct_n
from stages.evaluate.geometry import hyperspherical_energy, layer_energies


def test_two_orthogonal_neurons():
    # ‖e1 − e2‖ = √2 for each ordered pair: HE = 2/√2
    assert hyperspherical_energy(torch.tensor([[3.0, 0.0], [0.0, 0.5]])) == pytest.approx(math.sqrt(2))


def test_three_neurons_at_120_degrees():
    w = torch.tensor([[math.cos(a), math.sin(a)] for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)])
    assert hyperspherical_energy(w) == pytest.approx(6 / math.sqrt(3))  # 6 ordered pairs at distance √3


def test_blocks_scale_and_brute_force_agree():
    w = torch.randn(37, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = [row / row.norm() for row in w]
    brute = sum(1 / float((unit[i] - unit[j]).norm()) for i, j in itertools.permutations(range(37), 2))
    assert hyperspherical_energy(w) == pytest.approx(brute, rel=1e-12)
    assert hyperspherical_energy(w, block=5) == pytest.approx(brute, rel=1e-12)
    assert hyperspherical_energy(w * torch.rand(37, 1, dtype=torch.float64)) == pytest.approx(brute, rel=1e-12)


def test_layer_energies_take_decoder_layer_matrices_only():
    gen = torch.Generator().manual_seed(1)
    before = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 3, generator=gen),
              "model.layers.1.mlp.up_proj.weight": torch.randn(5, 3, generator=gen),
              "model.layers.0.input_layernorm.weight": torch.ones(3), "model.embed_tokens.weight": torch.randn(9, 3)}  # fmt: skip
    after = {k: v.clone() for k, v in before.items()}
    after["model.layers.1.mlp.up_proj.weight"][0] += 1.0
    rows = layer_energies(before, after)
    assert [(r["layer"], r["module"]) for r in rows] == [(0, "self_attn.q_proj"), (1, "mlp.up_proj")]
    assert rows[0]["he_relative_change"] == 0.0 and rows[1]["he_relative_change"] != 0.0


def test_distinct_n_hand_case():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c → 3 unique / 7; bigrams: ab ba ab | ab bc → 3 unique / 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct(texts, 4)["distinct_4"] == pytest.approx(1.0)  # one 4-gram
    assert distinct_n([""], 1) == 0.0


def test_float32_is_within_1e6_of_float64():
    """evaluate computes in float32: on a layer of SmolLM2's size its error is ~1e-7 relative."""
    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(2))
    exact = hyperspherical_energy(w)
    assert hyperspherical_energy(w, dtype=torch.float32) == pytest.approx(exact, rel=1e-6)
    assert hyperspherical_energy(w, block=100, dtype=torch.float32) == pytest.approx(exact, rel=1e-6)
