"""Hyperspherical energy (HE) of weight matrices: how spread out a layer's neurons are.

For a weight W (out × in) with neurons w_i (rows) and ŵ_i = w_i/‖w_i‖ (METHODS.md "Metrics"):

    HE(W) = Σ_{i≠j} ‖ŵ_i − ŵ_j‖⁻¹

Low HE means the neurons point in diverse directions; seed 000 finds DPO raising it (neurons
cluster, the model forgets), and builds RoPO so it cannot change (`stages/train/ropo.py`).
Since ‖ŵ_i − ŵ_j‖² = 2 − 2·ŵ_i·ŵ_j, HE needs only the cosines, which are taken `block` rows at a
time: a 14336 × 4096 layer needs a block × 14336 matrix at once, never an n × n one. Float64 by
default (the cosines of close neurons lose digits in 2 − 2·cos); evaluate passes float32, 2.7×
faster on a CPU, whose ~1e-7 relative error is far below the changes training makes.

Pure functions over tensors (`layer_energies` reads nothing: the caller passes state dicts).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor


def hyperspherical_energy(weight: Tensor, block: int = 1024, eps: float = 1e-12, dtype: torch.dtype = torch.float64) -> float:
    """HE(W) over W's rows, in `dtype`, `block` rows at a time (the sum in float64). Rows of zero
    norm have no direction and are left out; two identical directions contribute 1/√eps (not infinity)."""
    w = weight.detach().to(dtype).reshape(weight.shape[0], -1)
    norms = w.norm(dim=1)
    w = w[norms > 0] / norms[norms > 0, None]
    n = w.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, block):
        cos = w[start : start + block] @ w.T  # [b, n]
        inv = (2.0 - 2.0 * cos).clamp(min=eps).rsqrt()
        rows = torch.arange(start, min(start + block, n))
        inv[rows - start, rows] = 0.0  # i ≠ j
        total += inv.sum(dtype=torch.float64)
    return float(total)


def neuron_cosines(weight: Tensor) -> Tensor:
    """The n × n cosines between W's rows (float64): for tests and small layers only."""
    w = weight.detach().to(torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    return w @ w.T


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.weight$")


def layer_energies(before: dict[str, Tensor], after: dict[str, Tensor], block: int = 1024,
                   dtype: torch.dtype = torch.float64) -> list[dict]:  # fmt: skip
    """HE of every 2-D weight inside a decoder layer (`…layers.N.<module>.weight`) of two state
    dicts with the same keys: one row per matrix, in layer order, with the relative change
    (HE_after − HE_before)/HE_before."""
    rows = []
    for key, w in before.items():
        match = _LAYER.search(key)
        if not match or w.dim() != 2 or key not in after:
            continue
        he_before, he_after = hyperspherical_energy(w, block, dtype=dtype), hyperspherical_energy(after[key], block, dtype=dtype)
        rows.append({"layer": int(match.group(1)), "module": match.group(2), "rows": w.shape[0], "cols": w.shape[1],
                     "he_before": he_before, "he_after": he_after,
                     "he_relative_change": (he_after - he_before) / he_before if he_before else 0.0})  # fmt: skip
    return sorted(rows, key=lambda r: (r["layer"], r["module"]))


def read_weights(model_path: str) -> dict[str, Tensor]:
    """The 2-D decoder-layer weights of an HF folder's safetensors files (I/O: the caller's edge)."""
    from pathlib import Path

    from safetensors import safe_open

    weights: dict[str, Tensor] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if _LAYER.search(key):
                    tensor = f.get_tensor(key)
                    if tensor.dim() == 2:
                        weights[key] = tensor
    return weights
