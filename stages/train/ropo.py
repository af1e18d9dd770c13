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
the reverse sweep runs the same strides back, … 4, 2, 1, on pairs shifted by h, half a forward
block (h the largest stride), so it mixes across every forward block's edge and no two
consecutive stages share a plane (two rotations in one plane in a row would be one). Angles per
layer: stages × in
(2 stages on Llama-3-8B's q_proj and v_proj: 0.0086% of its parameters, the seed's figure).

At run time nothing is ever d × d: the layer computes y = ((x·R) · Wᵀ) ⊙ m + b, rotating the
activations. Each sweep stays inside blocks of 2h coordinates (h its largest stride; the
reverse sweep's blocks shifted by h), so it is one orthogonal 2h × 2h matrix per block, built
from the angles each forward (2h·d numbers) and applied as a batched block product: two small
products per token instead of 2·stages element-wise passes (a 576 × 576 layer's forward and
backward 3× faster than stage by stage on this CPU, bench/RESULTS.md). `rotate` applies the
stages one by one: the exact reference (and the path for sizes no block divides), used for the
merge. Angles start at 0 and m at 1, so R = I and W' = W exactly: training starts from the
reference model. Every other weight of the model is frozen. For export, `merge_state_dict`
writes W' into the layer's `weight` (a plain HF checkpoint).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ── the rotation, as pure functions ─────────────────────────────────────────────────────────
class Stage(NamedTuple):
    """One stage: the pairs (i + shift, i + stride + shift) mod d, i in the first half of each
    block of 2·stride; `left`, `right` list them in the order of the stage's angles."""

    stride: int
    shift: int
    left: Tensor
    right: Tensor


def _butterfly(d: int, stride: int, shift: int = 0) -> Stage:
    i = torch.arange(d, device="cpu")  # index arithmetic on the CPU, even under a `torch.device("meta")` context
    left = i[(i // stride) % 2 == 0]
    left = left[left + stride < d]
    return Stage(stride, shift, (left + shift) % d, (left + stride + shift) % d)


def sweep(d: int, stages: int) -> list[Stage]:
    """Every stage of a layer with `d` inputs, forward sweep then reverse sweep.

    The forward sweep's strides 1, 2, …, h (h = 2^(stages−1)) stay inside aligned blocks of 2h
    coordinates; the reverse sweep runs them back, h, …, 2, 1, inside the blocks shifted by h, so
    it mixes across every forward block's edge and its first stage shares no plane with the
    forward sweep's last (two rotations in one plane in a row would be one)."""
    strides = [1 << s for s in range(stages) if 4 * (1 << s) <= d] or [1]
    forward = [_butterfly(d, stride) for stride in strides]
    reverse = [_butterfly(d, stride, shift=strides[-1]) for stride in reversed(strides)] if d >= 4 else []
    return forward + reverse


def _rotate_stage(x: Tensor, theta: Tensor, stage: Stage) -> Tensor:
    """(x_a, x_b) ↦ (x_a cos θ − x_b sin θ, x_a sin θ + x_b cos θ) on the stage's pairs.

    When 2·stride divides d the pairs are a view: blocks of 2·stride, first half against second
    half (after rolling the shifted patterns into place), so a stage is a few element-wise
    operations and one copy, with no gather or scatter — forward and backward. Otherwise (odd
    sizes) it gathers the pairs and writes them back."""
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    d, block = x.shape[-1], 2 * stage.stride
    if d % block == 0:
        if stage.shift:
            x = torch.roll(x, -stage.shift, dims=-1)
        v = x.unflatten(-1, (d // block, 2, stage.stride))
        x0, x1 = v.select(-2, 0), v.select(-2, 1)
        cos, sin = cos.view(d // block, stage.stride), sin.view(d // block, stage.stride)
        x = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-2).flatten(-3)
        return torch.roll(x, stage.shift, dims=-1) if stage.shift else x
    a, b = stage.left, stage.right
    xa, xb = x[..., a], x[..., b]
    return x.index_copy(-1, a, xa * cos - xb * sin).index_copy(-1, b, xa * sin + xb * cos)


def rotate(x: Tensor, angles: Tensor, stages: list[Stage], inverse: bool = False) -> Tensor:
    """x·R for row vectors x (…, d), the stages in order; `angles` holds the stages' angles one
    after the other. `inverse`: x·Rᵀ (the stages backwards, angles negated)."""
    steps = list(zip(stages, torch.split(angles, [len(st.left) for st in stages])))
    for stage, theta in reversed(steps) if inverse else steps:
        x = _rotate_stage(x, -theta if inverse else theta, stage)
    return x


def block_size(d: int, stages: list[Stage]) -> int | None:
    """2h, the size of the blocks each sweep stays in, when it divides d (then `sweep_blocks`
    applies); else None."""
    block = 2 * max(st.stride for st in stages)
    forward = [st for st in stages if st.shift == 0]
    return block if d % block == 0 and len(forward) * 2 == len(stages) else None


def sweep_blocks(d: int, angles: Tensor, stages: list[Stage]) -> tuple[Tensor, Tensor]:
    """Each sweep as d/2h orthogonal 2h × 2h blocks, [d/2h, 2h, 2h] (forward, reverse): the
    products of the sweep's Givens rotations inside each block, built by rotating 2h basis rows
    (2h·d numbers per stage: nothing the size of the activations or of d × d)."""
    block = block_size(d, stages)
    half = len(stages) // 2
    sizes = [len(st.left) for st in stages]
    forward_angles, reverse_angles = angles.split([sum(sizes[:half]), sum(sizes[half:])])
    shift = stages[half].shift
    basis = torch.eye(block, dtype=angles.dtype, device=angles.device).repeat(1, d // block)  # row r: 1 at every j·2h + r
    out = []
    for part, theta, offset in ((stages[:half], forward_angles, 0), (stages[half:], reverse_angles, shift)):
        rows = rotate(torch.roll(basis, offset, dims=-1), theta, part)  # the basis of the blocks starting at `offset`
        out.append(torch.roll(rows, -offset, dims=-1).view(block, d // block, block).transpose(0, 1))
    return out[0], out[1]


def rotate_blocks(x: Tensor, forward: Tensor, reverse: Tensor, shift: int) -> Tensor:
    """x·R through the two sweeps' blocks: x·B_forward per block, then, in the blocks shifted by
    `shift`, ·B_reverse. Two small batched products over the activations, O(d·2h) per token."""
    blocks, block = forward.shape[0], forward.shape[-1]
    x = torch.einsum("...ji,jic->...jc", x.unflatten(-1, (blocks, block)), forward.to(x.dtype)).flatten(-2)
    x = torch.roll(x, -shift, dims=-1)
    x = torch.einsum("...ji,jic->...jc", x.unflatten(-1, (blocks, block)), reverse.to(x.dtype)).flatten(-2)
    return torch.roll(x, shift, dims=-1)


def rotation_matrix(d: int, angles: Tensor, stages: list[Stage]) -> Tensor:
    """R as a dense d × d matrix (rows of I rotated): for tests and small layers only."""
    return rotate(torch.eye(d, dtype=angles.dtype), angles, stages)


def merged_weight(weight: Tensor, angles: Tensor, magnitude: Tensor, stages: list[Stage]) -> Tensor:
    """W' = diag(m)·W·Rᵀ, computed in float64 row by row (w_i·Rᵀ) and returned in W's dtype."""
    w = rotate(weight.double(), angles.double(), stages, inverse=True)
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
        self.stages_per_sweep = stages
        device = base.weight.device
        pairs = sweep(self.in_features, stages)
        self.angles = nn.Parameter(torch.zeros(sum(len(st.left) for st in pairs), dtype=base.weight.dtype, device=device))
        self.magnitude = nn.Parameter(torch.ones(self.out_features, dtype=base.weight.dtype, device=device))
        self._shape = [(st.stride, st.shift) for st in pairs]
        self._block = block_size(self.in_features, pairs) is not None
        for k, st in enumerate(pairs):  # index buffers (for sizes no block divides): they move with the module, never saved
            self.register_buffer(f"_left{k}", st.left.to(device), persistent=False)
            self.register_buffer(f"_right{k}", st.right.to(device), persistent=False)

    def stages(self) -> list[Stage]:
        return [Stage(stride, shift, getattr(self, f"_left{k}"), getattr(self, f"_right{k}"))
                for k, (stride, shift) in enumerate(self._shape)]  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        stages = self.stages()
        if self._block:  # the sweeps as blocks (built from the angles, d·2h numbers), two batched products
            forward, reverse = sweep_blocks(self.in_features, self.angles.float(), stages)
            x = rotate_blocks(x, forward, reverse, stages[len(stages) // 2].shift)
        else:  # stage by stage
            x = rotate(x, self.angles, stages)
        y = F.linear(x, self.weight) * self.magnitude.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stages={self.stages_per_sweep}"


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
            stages = [st._replace(left=st.left.cpu(), right=st.right.cpu()) for st in module.stages()]
            state[f"{name}.weight"] = merged_weight(state[f"{name}.weight"], angles, magnitude, stages)
    return state


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, RoPOLinear) for m in model.modules())
