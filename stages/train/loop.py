"""The Ray Train worker loop: FSDP2 preference optimisation, read top to bottom.

Every worker runs `train_loop`. The recipe:
1. load the policy, switch its dropout off (so step 1's forward is the reference's) and shard it
   with FSDP2 (`fully_shard` on each decoder layer, then the root) under the precision policy of
   `stages/train/precision.py`;
2. reference pass: before any update the policy *is* the reference, so its log-probs of every
   pair are computed once, under no_grad, in the first epoch's batches, and all-gathered (no
   reference model in memory during training); rank 0 writes them to `reference_logps.parquet`.
   A reference other than the starting policy (round k > 0 with `next_round.ref_model:
   initial`) is loaded the same way for that pass only, then freed;
3. for each global batch of `batch_size` pairs, worker r takes its contiguous share, computes the
   objective's mean over that share and backpropagates; FSDP averages the gradients over
   workers, so the update equals the single-process update on the whole global batch;
4. rank 0 logs TRL-named metrics (global means) to `metrics.jsonl` with a progress bar;
5. the full state dict is gathered to rank 0 and saved as a plain HF folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stages.train.batch import Batch, TokenizedPair, collate, tokenize_pair
from stages.train.logps import sequence_logps
from stages.train.objectives import Objective, ObjectiveOutput, objective_for
from stages.train.precision import fsdp_policy


# ── building blocks (also used by the FSDP equivalence test) ────────────────────────────────
def load_policy(path: str, dtype: str, device: torch.device):
    """The policy with dropout off, FSDP2-sharded under the run's precision policy
    (`stages/train/precision.py`: bf16 means bf16 compute over fp32 master weights)."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    model = disable_dropout(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device))
    mp = fsdp_policy(dtype)
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout probability of `model` in place, and return it; `model.config` untouched.

    The reference log-probs are computed under no_grad in eval mode and the policy's in train
    mode: with dropout the two differ at step 1, which is then not "policy = reference" (loss
    ln 2) but noise, and every later step's h carries that noise. TRL's DPOTrainer sets each
    `nn.Dropout`'s p to 0 (`disable_dropout_in_model`); HF attention often keeps its dropout as a
    float attribute read only `if self.training` (`LlamaAttention.attention_dropout`, passed to
    SDPA as dropout_p), so float attributes named *dropout* are zeroed too. The config keeps the
    user's values, so the saved checkpoint's config.json does as well.
    """
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def policy_logps(model, batch: Batch) -> tuple[Tensor, Tensor]:
    """(chosen logps [B], rejected logps [B]) in one forward over the 2B sequences."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = sequence_logps(logits, batch.input_ids, batch.loss_mask)
    return logps[: batch.num_pairs], logps[batch.num_pairs :]


def reference_batches(order: list[int], micro_batch: int, world: int) -> list[list[int]]:
    """The reference pass's forward batches (pair indices) in global order; batch g runs on rank
    g % world.

    The first epoch's `order` in global batches of `micro_batch × world`, rank r taking the r-th
    contiguous share: the very batches of the first epoch's steps. The tail is padded with
    repeats from the start of `order`: each FSDP forward is a collective every rank must join.
    """
    chunk = micro_batch * world
    padded = [order[i % len(order)] for i in range(math.ceil(len(order) / chunk) * chunk)]
    return [padded[s : s + micro_batch] for s in range(0, len(padded), micro_batch)]


def first_appearances(batches: list[list[int]]) -> dict[int, int]:
    """Pair index → its position in `batches` flattened, at its first appearance.

    In bf16 a pair's log-probs depend on the padded width of the batch it runs in (0.2 nats per
    response on SmolLM2-135M), so a pair repeated in the padded tail has two references; the
    first appearance is in the batch step 1 runs, so that one is the reference.
    """
    first: dict[int, int] = {}
    for position, index in enumerate(i for batch in batches for i in batch):
        first.setdefault(index, position)
    return first


def reference_logps(
    model, pairs: list[TokenizedPair], pad_id: int, micro_batch: int, device, order: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Log-probs of every pair under the initial policy, identical on every rank.

    Pairs run in `reference_batches` of the first epoch's `order`: in bf16 a different padding
    width changes the kernels' rounding, so only identical batches make step 1's policy
    log-probs equal the reference's (loss exactly ln 2).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    order = list(range(len(pairs))) if order is None else list(order)
    batches = reference_batches(order, micro_batch, world)
    chosen, rejected = [], []
    with torch.no_grad():
        for indices in batches[rank::world]:
            c, r = policy_logps(model, collate([pairs[i] for i in indices], pad_id).to(device))
            chosen.append(c.float())
            rejected.append(r.float())
    local = torch.stack([torch.cat(chosen), torch.cat(rejected)])  # [2, micro_batch × batches per rank]
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    # A no_grad forward leaves FSDP2's root parameters (embeddings, final norm) unsharded, as
    # plain tensors; an optimiser built now would hold those and never see their gradients.
    model.reshard()
    k = micro_batch  # batch g is the (g // world)-th of rank g % world
    flat = torch.cat([gathered[g % world][:, (g // world) * k : (g // world + 1) * k] for g in range(len(batches))], dim=1)
    first = first_appearances(batches)
    if len(first) != len(pairs):
        raise ValueError(f"order covers {len(first)} of {len(pairs)} pairs: it must be a permutation of all of them")
    table = torch.empty(2, len(pairs), dtype=local.dtype, device=local.device)
    table[:, torch.tensor(list(first), device=local.device)] = flat[:, torch.tensor(list(first.values()), device=local.device)]
    return table[0], table[1]


def write_reference_logps(path: Path, prompt_ids: list, ref_chosen: Tensor, ref_rejected: Tensor) -> None:
    """One row per pair, in the pairs file's order: the numbers every step's h is measured from,
    kept so evaluate's "before" log-probs can be checked against them."""
    import pandas as pd

    pd.DataFrame({
        "prompt_id": prompt_ids,
        "ref_chosen_logps": ref_chosen.double().cpu().numpy(),
        "ref_rejected_logps": ref_rejected.double().cpu().numpy(),
    }).to_parquet(path, index=False)  # fmt: skip


def step_loss(model, batch: Batch, ref_chosen: Tensor, ref_rejected: Tensor, objective: Objective) -> tuple[Tensor, ObjectiveOutput]:
    """This worker's mean loss over its share of the global batch, and per-pair metrics."""
    chosen, rejected = policy_logps(model, batch)
    out = objective(chosen, rejected, ref_chosen.to(chosen.dtype), ref_rejected.to(chosen.dtype))
    return out.losses.mean(), out


def global_means(out: ObjectiveOutput, global_pairs: int) -> dict[str, float]:
    """Mean of each per-pair metric over the whole global batch (sums all-reduced over ranks)."""
    names = ["loss", *out.metrics]
    local = torch.stack([out.losses.detach().sum(), *(m.sum() for m in out.metrics.values())]).float()
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return {name: float(v) / global_pairs for name, v in zip(names, local)}


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def batch_schedule(num_pairs: int, batch_size: int, epochs: int, seed: int, max_steps: int | None) -> list[list[int]]:
    """Global batches of pair indices, a fresh seeded permutation per epoch, last partial batch dropped."""
    steps: list[list[int]] = []
    for epoch in range(epochs):
        order = epoch_order(num_pairs, seed, epoch)
        steps += [order[i : i + batch_size] for i in range(0, num_pairs - batch_size + 1, batch_size)]
    return steps[:max_steps] if max_steps else steps


def save_hf_checkpoint(model, tokenizer, out_dir: Path) -> None:
    """Gather the full state dict to rank 0 and save a plain HF folder (loads in transformers and vLLM)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(state, assign=True)
        plain.tie_weights()
        plain.generation_config = model.generation_config
        plain.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()


# ── the worker loop ──────────────────────────────────────────────────────────────────────────
def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point. config: policy (path), ref_model (path, default the policy), pairs (parquet), out
    (folder), train (TrainConfig dict), batch_size."""
    import pyarrow.parquet as pq
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from pipeline.config import TrainConfig

    cfg = TrainConfig.model_validate(config["train"])
    rank, world = dist.get_rank(), dist.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    out = Path(config["out"])

    tokenizer = AutoTokenizer.from_pretrained(config["policy"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = pq.read_table(config["pairs"]).to_pylist()
    pairs = [tokenize_pair(tokenizer, row, cfg.max_length) for row in rows]
    objective = objective_for(cfg.method)
    batch_size = config["batch_size"]  # the driver shrinks it when there are fewer pairs
    share = batch_size // world
    first_order = epoch_order(len(pairs), cfg.seed, 0)
    ref_path = config.get("ref_model", config["policy"])
    if ref_path != config["policy"]:
        reference = load_policy(ref_path, cfg.dtype, device)
        ref_chosen, ref_rejected = reference_logps(reference, pairs, pad_id, share, device, first_order)
        del reference
    model = load_policy(config["policy"], cfg.dtype, device)
    if ref_path == config["policy"]:
        ref_chosen, ref_rejected = reference_logps(model, pairs, pad_id, share, device, first_order)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if rank == 0:
        write_reference_logps(out / "reference_logps.parquet", [row["prompt_id"] for row in rows], ref_chosen, ref_rejected)
    schedule = batch_schedule(len(pairs), batch_size, cfg.epochs, cfg.seed, cfg.max_steps)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    bar = _progress(len(schedule)) if rank == 0 else None
    model.train()
    for step, indices in enumerate(schedule):
        mine = indices[rank * share : (rank + 1) * share]
        batch = collate([pairs[i] for i in mine], pad_id).to(device)
        loss, outputs = step_loss(model, batch, ref_chosen[mine], ref_rejected[mine], objective)
        loss.backward()
        grad_norm = _clip(model, cfg.grad_clip)
        lr = warmup.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = global_means(outputs, batch_size)
        if rank == 0:
            record = {"step": step + 1, "epoch": step * batch_size / len(pairs), **metrics,
                      "grad_norm": grad_norm, "lr": lr}  # fmt: skip
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_description(f"train loss={metrics['loss']:.4f} margin={metrics['rewards/margins']:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    save_hf_checkpoint(model, tokenizer, out / "checkpoint")


def _clip(model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(norm)


def _progress(total: int):
    # Ray's remote-aware tqdm draws one clean bar on the driver from inside a worker.
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=total, desc="train")
