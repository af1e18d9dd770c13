"""Orthogonal Gradient Descent (seed 001 §4–5): raise the chosen responses' likelihood without
raising the rejected responses' with it.

With g_w = ∇θ mean_i NLL(y+_i | x_i) and g_l = ∇θ mean_i NLL(y−_i | x_i) over the step's pairs,

    g = g_w − max(0, g_w·g_l) / ‖g_l‖² · g_l

is handed to the optimiser (then clipped, then stepped: the paper uses RMSprop, lr 1e-6, warm-up
150 steps). When g_w·g_l < 0, lowering NLL(y+) already raises NLL(y−) and g = g_w; otherwise g is
g_w's projection orthogonal to g_l. Either way the step −η·g is a descent direction of NLL(y+) (g·g_w ≥ 0,
Theorem 5.3) and not one of NLL(y−) (g·g_l ≤ 0, Theorem 5.4), to first order and for plain SGD.
NLL(y|x) = −logp(y|x), summed over the response tokens as every objective here takes it.

What follows from the rule:
- no reference model and no hyper-parameter: the training loop still computes reference
  log-probs once from the starting policy (never a second model), but only to *log* the
  configured `method`'s loss for comparison (the paper's Figure 6 plots DPO's at β = 0.1);
- chosen and rejected enter only through two batch means, so they need not be paired: a pairs
  file works as it is, and a set of unpaired "good" and "bad" responses would too;
- the dot product and the norm are over the whole parameter vector. Under FSDP2 each rank holds a
  disjoint shard of every gradient, so `global_dot` sums the shard-local partials and all-reduces
  them: the projection equals the single-process one on any number of workers;
- with gradient accumulation both gradients are accumulated over the micro-batches first and
  projected once per optimiser step;
- memory: one extra gradient copy (g_w is kept while the second backward writes g_l; g is then
  formed in g_l's place).

`ogd_coefficient` and `ogd_direction` are pure (tested in float64 on random vectors);
`global_dot` and `ogd_step` are the loop's edge, used by `stages/train/loop.py`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from stages.train.batch import Batch
from stages.train.objectives import ObjectiveOutput, PairLogps


# ── the rule, on plain vectors ──────────────────────────────────────────────────────────────
def ogd_coefficient(dot: Tensor, norm_sq: Tensor) -> Tensor:
    """max(0, g_w·g_l) / ‖g_l‖²: how much of g_l is taken out of g_w (0 when ‖g_l‖ = 0: nothing to avoid)."""
    return torch.where(norm_sq > 0, dot.clamp(min=0) / norm_sq.clamp(min=torch.finfo(norm_sq.dtype).tiny), torch.zeros_like(dot))


def ogd_direction(g_w: Tensor, g_l: Tensor) -> Tensor:
    """g_w − max(0, g_w·g_l)/‖g_l‖² · g_l for flat gradient vectors."""
    return g_w - ogd_coefficient(g_w @ g_l, g_l @ g_l) * g_l


# ── over a model's (sharded) gradients ──────────────────────────────────────────────────────
def _local_and_copies(t: Tensor) -> tuple[Tensor, int]:
    """This rank's piece of `t` and how many ranks hold the same piece.

    A DTensor sharded on every mesh dimension (FSDP2's `Shard(0)`) is held once: summing its
    local partials over ranks gives the global sum. A mesh dimension on which it is replicated
    (HSDP), or a plain tensor under torch.distributed (every rank holds all of it), would count
    it that many times: the caller divides by the count."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        copies = math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())
        return t.to_local(), copies
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return t, world


def global_dot(xs: list[Tensor | None], ys: list[Tensor | None]) -> Tensor:
    """Σ_params ⟨x, y⟩ over the whole parameter vector, identical on every rank (float64).
    `None` stands for a zero gradient (a parameter the pass did not reach)."""
    total = torch.zeros((), dtype=torch.float64)
    device = None
    for x, y in zip(xs, ys):
        if x is None or y is None:
            continue
        (lx, copies), (ly, _) = _local_and_copies(x), _local_and_copies(y)
        total = total.to(lx.device) + torch.dot(lx.reshape(-1).double(), ly.reshape(-1).double()) / copies
        device = lx.device
    if dist.is_available() and dist.is_initialized():
        total = total.to(device) if device is not None else total
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def side_logps(model, batch: Batch, side: str) -> Tensor:
    """logp(y) of one side's B sequences ([B]), in the rows (and padded width) of the joint batch:
    the same numbers `policy_logps` gives that side in one forward over all 2B."""
    from stages.train.logps import sequence_logps

    rows = slice(0, batch.num_pairs) if side == "chosen" else slice(batch.num_pairs, None)
    input_ids, attention_mask = batch.input_ids[rows], batch.attention_mask[rows]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return sequence_logps(logits, input_ids, batch.loss_mask[rows])


def split_logps(model, batch: Batch) -> tuple[Tensor, Tensor]:
    """(chosen logps, rejected logps) from one forward per side, as `ogd_step` computes them: the
    reference pass of an OGD run uses it, so that in bf16 step 1's logged DPO loss is ln 2 exactly
    (one forward over 2B rows and two over B round differently)."""
    return side_logps(model, batch, "chosen"), side_logps(model, batch, "rejected")


def ogd_step(model, batches: list[Batch], refs: list[tuple[Tensor | None, Tensor | None]], objective: Callable,
             scale: float) -> tuple[list[ObjectiveOutput], dict[str, float]]:  # fmt: skip
    """Leave g (above) in the trainable parameters' `.grad` for this worker's micro-batches, and
    return the configured objective's per-pair outputs (logged for comparison, not trained on) and
    the rule's numbers.

    `scale` is the worker's pairs per step: each micro-batch backpropagates Σ NLL / scale, so the
    accumulated gradient is the mean over the worker's share, and FSDP2's reduce-scatter averages
    it over workers into the global batch mean. Two forward/backward passes per micro-batch, one
    per side (each over B sequences where a plain step runs one over 2B): about the compute of a
    plain step."""
    params = [p for p in model.parameters() if p.requires_grad]
    chosen = [_backward_nll(model, batch, "chosen", scale) for batch in batches]
    g_w = [p.grad for p in params]  # kept aside: the one extra gradient copy
    for p in params:
        p.grad = None
    rejected = [_backward_nll(model, batch, "rejected", scale) for batch in batches]
    g_l = [p.grad for p in params]
    dot, norm_l_sq, norm_w_sq = global_dot(g_w, g_l), global_dot(g_l, g_l), global_dot(g_w, g_w)
    coefficient = ogd_coefficient(dot, norm_l_sq)
    c = float(coefficient)
    with torch.no_grad():
        for p, w, l in zip(params, g_w, g_l):
            if l is None:
                p.grad = w
            elif w is None:
                p.grad = l.mul_(-c)
            else:
                p.grad = l.mul_(-c).add_(w)  # g_w − c·g_l, in g_l's place
    outputs = []
    for batch, logp_c, logp_r, (ref_c, ref_r) in zip(batches, chosen, rejected, refs):
        counts = batch.loss_mask[:, 1:].sum(-1)
        cast = (lambda t: None if t is None else t.to(logp_c.dtype))  # fmt: skip
        outputs.append(objective(PairLogps(logp_c, logp_r, counts[: batch.num_pairs], counts[batch.num_pairs :],
                                           cast(ref_c), cast(ref_r))))  # fmt: skip
    norm_l = math.sqrt(float(norm_l_sq))
    stats = {
        "ogd/dot": float(dot),  # g_w·g_l
        "ogd/coefficient": c,  # max(0, g_w·g_l)/‖g_l‖²
        "ogd/projected": float(c > 0),  # 1 when the projection fired
        "ogd/grad_norm_chosen": math.sqrt(float(norm_w_sq)),  # ‖g_w‖
        "ogd/grad_norm_rejected": norm_l,  # ‖g_l‖
        # the two terms of the update, under the names every method's diagnostics use:
        "grad_norm/chosen": math.sqrt(float(norm_w_sq)),
        "grad_norm/rejected": c * norm_l,
    }
    return outputs, stats


def _backward_nll(model, batch: Batch, side: str, scale: float) -> Tensor:
    logps = side_logps(model, batch, side)
    (-logps.sum() / scale).backward()
    return logps.detach()
