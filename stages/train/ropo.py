"""RoPO (seed 000): preference optimisation that only rotates and stretches neurons.

Seed 000 argues that DPO overfits by clustering neurons — the angles between a layer's rows
(its hyperspherical energy, HE) drift — and that updating each weight only by a rotation and a
per-neuron magnitude keeps what those angles encode. For an adapted linear layer with frozen
W (out × in, one neuron per row):

    W' = diag(m) · W · Rᵀ,    R orthogonal,  m ∈ R^out

Rᵀ preserves every inner product between rows, diag(m) only rescales rows: the pairwise angles
of W' are those of W, and so is HE (computed on normalised rows), whatever R and m are.

R is built from Givens rotations over disjoint coordinate pairs ("BIG": Bidirectional Integrated
Givens; the seed names the parts, not the construction, so this is ours). A *stage* rotates all
pairs of one pattern at once, each by its own angle: a vectorised O(in) operation per token. The
forward sweep runs `stages` butterfly patterns with strides 1, 2, 4, … (pair i with i + stride);
the reverse sweep runs the same strides back, … 4, 2, 1, on pairs shifted by the stride
(i + stride with i + 2·stride: across the forward pattern's block edges), so no two stages share
a plane (two rotations in one plane would merge into one) and every coordinate meets partners
on both sides. Angles per layer: stages × in
(2 stages on Llama-3-8B's q_proj and v_proj: 0.0086% of its parameters, the seed's figure).

At run time nothing is ever d × d: the layer computes y = ((x·R) · Wᵀ) ⊙ m + b, rotating the
activations stage by stage. Angles start at 0 and m at 1, so R = I and W' = W exactly: training
starts from the reference model. Every other weight of the model is frozen. For export,
`merge_state_dict` writes W' into the layer's `weight` (a plain HF checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ── the rotation, as pure functions ─────────────────────────────────────────────────────────
def _butterfly(d: int, stride: int, shift: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint pairs (i, i + stride) with i in the first half of each block of 2·stride, every
    index moved by `shift` (mod d)."""
    i = torch.arange(d, device="cpu")  # index arithmetic on the CPU, even under a `torch.device("meta")` context
    left = i[(i // stride) % 2 == 0]
    left = left[left + stride < d]
    return (left + shift) % d, (left + stride + shift) % d


def sweep_pairs(d: int, stages: int) -> list[tuple[Tensor, Tensor]]:
    """The (left, right) index pairs of every stage, forward sweep then reverse sweep, for a
    layer with `d` inputs; each stage's pairs are disjoint."""
    strides = [1 << s for s in range(stages) if 4 * (1 << s) <= d] or [1]
    forward = [_butterfly(d, stride) for stride in strides]
    reverse = [_butterfly(d, stride, shift=stride) for stride in reversed(strides)] if d >= 4 else []
    return forward + reverse


def rotate(x: Tensor, angles: Tensor, pairs: list[tuple[Tensor, Tensor]], inverse: bool = False) -> Tensor:
    """x·R for row vectors x (…, d): each stage maps (x_a, x_b) ↦ (x_a cos θ − x_b sin θ,
    x_a sin θ + x_b cos θ) on its pairs. `angles` holds the stages' angles one after the other.
    `inverse`: x·Rᵀ (the stages backwards, angles negated)."""
    sizes = [len(a) for a, _ in pairs]
    stages = list(zip(pairs, torch.split(angles, sizes)))
    for (a, b), theta in reversed(stages) if inverse else stages:
        theta = -theta if inverse else theta
        cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
        xa, xb = x[..., a], x[..., b]
        x = x.index_copy(-1, a, xa * cos - xb * sin).index_copy(-1, b, xa * sin + xb * cos)
    return x


def rotation_matrix(d: int, angles: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """R as a dense d × d matrix (rows of I rotated): for tests and small layers only."""
    return rotate(torch.eye(d, dtype=angles.dtype), angles, pairs)


def merged_weight(weight: Tensor, angles: Tensor, magnitude: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """W' = diag(m)·W·Rᵀ, computed in float64 row by row (w_i·Rᵀ) and returned in W's dtype."""
    w = rotate(weight.double(), angles.double(), pairs, inverse=True)
    return (magnitude.double()[:, None] * w).to(weight.dtype)


# ── the layer ────────────────────────────────────────────────────────────────────────────────
class RoPOLinear(nn.Module):
    """A frozen linear layer under a trainable rotation of its inputs and stretch of its outputs.
    `weight` and `bias` keep nn.Linear's names (the checkpoint's keys do not move); the trainable
    parameters are `angles` (Σ stages' pairs ≈ stages × in) and `magnitude` (out)."""

    def __init__(self, base: nn.Linear, stages: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.data, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.data, requires_grad=False)
        self.stages = stages
        device = base.weight.device
        pairs = [(a.to(device), b.to(device)) for a, b in sweep_pairs(self.in_features, stages)]
        self.angles = nn.Parameter(torch.zeros(sum(len(a) for a, _ in pairs), dtype=base.weight.dtype, device=device))
        self.magnitude = nn.Parameter(torch.ones(self.out_features, dtype=base.weight.dtype, device=device))
        for k, (a, b) in enumerate(pairs):  # index buffers: they move with the module, never saved
            self.register_buffer(f"_left{k}", a, persistent=False)
            self.register_buffer(f"_right{k}", b, persistent=False)
        self._stage_count = len(pairs)

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        return [(getattr(self, f"_left{k}"), getattr(self, f"_right{k}")) for k in range(self._stage_count)]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(rotate(x, self.angles, self.pairs()), self.weight) * self.magnitude.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stages={self.stages}"


def apply_ropo(model: nn.Module, modules: list[str], stages: int) -> list[str]:
    """Freeze every parameter of `model` and replace each nn.Linear whose name ends in one of
    `modules` by a `RoPOLinear`, in place; the adapted layers' names. A name that matches no
    linear layer is an error naming the layers there are."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in modules]  # fmt: skip
    found = {name.rsplit(".", 1)[-1] for name, _ in targets}
    if missing := [m for m in modules if m not in found]:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"train.parameterisation.modules: no linear layer named {', '.join(missing)} in this model; "
                         f"its linear layers are {', '.join(linear)}")  # fmt: skip
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RoPOLinear(linear, stages))
    return [name for name, _ in targets]


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters, and the trainable share in percent, of the *base* model
    (RoPO's own parameters are not counted in the total). Works on the meta device."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(m.angles.numel() + m.magnitude.numel() for m in model.modules() if isinstance(m, RoPOLinear))
    total = sum(p.numel() for p in model.parameters()) - adapter
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / total}


def merge_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The full state dict of a RoPO-adapted `model` as a plain model's: each adapted layer's
    `weight` replaced by W' = diag(m)·W·Rᵀ, its `angles` and `magnitude` dropped."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, RoPOLinear):
            angles, magnitude = state.pop(f"{name}.angles"), state.pop(f"{name}.magnitude")
            pairs = [(a.cpu(), b.cpu()) for a, b in module.pairs()]
            state[f"{name}.weight"] = merged_weight(state[f"{name}.weight"], angles, magnitude, pairs)
    return state


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, RoPOLinear) for m in model.modules())
