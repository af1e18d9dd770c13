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
3. for each global batch of `batch_size` pairs, worker r takes its share (`batch_size / workers`
   pairs) in micro-batches (`schedule.micro_batches`), runs the objective
   (`stages/train/objectives.py`, chosen with `train.method.type`) on each and backpropagates the
   sum of its losses over the share: gradient accumulation gives the update of one big batch, and
   FSDP averages the gradients over workers, so the update equals the single-process update on
   the whole global batch; a reference-free method (SimPO, SLiC) skips step 2. The update rule
   `train.update: {type: ogd}` replaces the objective's backward pass by OGD's two
   (`stages/train/ogd.py`: ∇NLL of each side, accumulated, projected once per step over the whole
   parameter vector); the objective is then only logged. The parameterisation
   `train.parameterisation: {type: ropo}` freezes every weight and trains rotations and
   magnitudes of the named layers (`stages/train/ropo.py`), applied in step 1 before sharding;
4. rank 0 logs TRL-named metrics (global means) plus the 3D diagnostics — per-token logps,
   |∂L/∂logp(y±)|, and every `diagnostics_every` steps the chosen and rejected terms' parameter-
   gradient norms (`term_grad_norms`) — and, with `held_out_pairs`, the metrics on pairs never
   trained on (`held_out_metrics`) to `metrics.jsonl` and TensorBoard, with a progress bar;
5. the full state dict is gathered to rank 0 and saved as a plain HF folder (RoPO merged in).

A reward model (`method: {type: reward_model}`) runs the same recipe: its "log-probs" are the
head's rewards (`policy_logps`), its objective Bradley–Terry, and it has no reference pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.artifacts import copy_tree, is_file, is_uri, join, localize, location, read_text, upload, working_copy
from stages.train import NONFINITE, WORKERS
from stages.train.batch import Batch, TokenizedPair, collate, read_tokenized
from stages.train.checkpoint import keep_metrics_up_to, restore_checkpoint, save_checkpoint, save_hf_checkpoint
from stages.train.guard import Guard
from stages.train.logps import sequence_logps
from stages.train.objectives import Objective, ObjectiveOutput, PairLogps, needs_reference, objective_for
from stages.train.ogd import ogd_step, split_logps
from stages.train.precision import fsdp_policy
from stages.train.reward_model import is_reward_model, load_reward_backbone, pair_rewards
from stages.train.ropo import apply_ropo, parameter_counts
from stages.train.schedule import lr_factor, micro_batch_for, micro_batches

log = logging.getLogger("pipeline.train")


# ── building blocks (also used by the FSDP equivalence test) ────────────────────────────────
def load_policy(path: str, dtype: str, device: torch.device, activation_checkpointing: bool = False,
                reward_model_of: Any = None, parameterisation: Any = None):  # fmt: skip
    """The policy with dropout off, FSDP2-sharded under the run's precision policy
    (`stages/train/precision.py`: bf16 means bf16 compute over fp32 master weights).
    Activation checkpointing recomputes each decoder layer's activations in the backward pass:
    memory of one layer's activations instead of all, for about one more forward.
    `reward_model_of` (a tokenizer): the policy's backbone under a new reward head instead
    (`stages/train/reward_model.py`). `parameterisation` (`train.parameterisation`): with
    `type: ropo`, every weight frozen and the named linear layers adapted (`stages/train/ropo.py`)
    before sharding, so FSDP2 shards the frozen weights and the angles alike."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    if reward_model_of is not None:
        model = load_reward_backbone(path, reward_model_of)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if parameterisation is not None and parameterisation.type == "ropo":
        apply_ropo(model, parameterisation.modules, parameterisation.stages)
    model = disable_dropout(model.to(device))
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    """(chosen logps [B], rejected logps [B]) in one forward over the 2B sequences; for a reward
    model its rewards r(x,y±) (`stages/train/reward_model.py`), which every objective-facing
    function here then carries in the log-probs' place.

    Positions count real tokens only (`cumsum(attention_mask) − 1`), so a left-padded sequence is
    scored as it would be alone; with right padding they are 0..n−1, what the model assumes anyway."""
    if is_reward_model(model):
        return pair_rewards(model, batch.input_ids, batch.attention_mask, batch.num_pairs)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids).logits
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
    model, pairs: list[TokenizedPair], pad_id: int, micro_batch: int, device, order: list[int] | None = None,
    forward=None,
) -> tuple[Tensor, Tensor]:
    """Log-probs of every pair under the initial policy, identical on every rank.

    Pairs run in `reference_batches` of the first epoch's `order`: in bf16 a different padding
    width changes the kernels' rounding, so only identical batches make step 1's policy
    log-probs equal the reference's (loss exactly ln 2). For the same reason `forward` (default
    `policy_logps`, one forward over a batch's 2B sequences) is the one the steps use: OGD's
    steps run each side on its own (`ogd.split_logps`), and so does its reference pass.
    """
    forward = forward or policy_logps
    rank, world = dist.get_rank(), dist.get_world_size()
    order = list(range(len(pairs))) if order is None else list(order)
    batches = reference_batches(order, micro_batch, world)
    chosen, rejected = [], []
    with torch.no_grad():
        for indices in batches[rank::world]:
            c, r = forward(model, collate([pairs[i] for i in indices], pad_id).to(device))
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


def response_tokens(batch: Batch) -> tuple[Tensor, Tensor]:
    """|y+|, |y−| per pair: the response tokens `sequence_logps` sums over (for the length-normalised
    objectives: IPO, SimPO, DPO+SFT, and the per-token metrics)."""
    counts = batch.loss_mask[:, 1:].sum(-1)
    return counts[: batch.num_pairs], counts[batch.num_pairs :]


def pair_logps(model, batch: Batch, ref_chosen: Tensor | None, ref_rejected: Tensor | None) -> PairLogps:
    """The objective's input for one batch: one forward over its 2B sequences; `ref_*` None for a
    reference-free method."""
    chosen, rejected = policy_logps(model, batch)
    chosen_tokens, rejected_tokens = response_tokens(batch)
    cast = (lambda t: None if t is None else t.to(chosen.dtype))  # fmt: skip
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, cast(ref_chosen), cast(ref_rejected))


def step_loss(model, batch: Batch, ref_chosen: Tensor | None, ref_rejected: Tensor | None, objective: Objective,
              scale: float | None = None) -> tuple[Tensor, ObjectiveOutput]:  # fmt: skip
    """This worker's loss for one micro-batch, and per-pair metrics: the mean over the batch, or
    the sum divided by `scale` (the worker's pairs per step) when the step accumulates several
    micro-batches, so the accumulated gradient is the mean over the worker's share."""
    out = objective(pair_logps(model, batch, ref_chosen, ref_rejected))
    return (out.losses.mean() if scale is None else out.losses.sum() / scale), out


def term_grad_norms(model, batches: list[Batch], refs: list[tuple[Tensor | None, Tensor | None]],
                    objective: Objective, scale: float) -> dict[str, float]:  # fmt: skip
    """‖∇θ‖ of the chosen and of the rejected term of this step's loss, taken separately (seed 003
    Figure 10: which side drives the update).

    Every objective depends on θ only through c = logp(y+) and r = logp(y−), so
    `∇θ L = Σ_i ∂L/∂c_i ∇θ c_i + Σ_i ∂L/∂r_i ∇θ r_i`; with the closed-form ∂L/∂c_i, ∂L/∂r_i held
    fixed, the surrogate `Σ_i ∂L/∂c_i · c_i` has exactly the chosen term as its gradient. Two extra
    forward/backward passes per diagnostic step, gradients zeroed after: the step itself is
    unchanged. Norms are global (FSDP shards and workers).
    """
    norms = {}
    for side in ("chosen", "rejected"):
        for batch, (ref_chosen, ref_rejected) in zip(batches, refs):
            lp = pair_logps(model, batch, ref_chosen, ref_rejected)
            out = objective(lp)
            weight, logps = (out.dloss_dchosen, lp.chosen) if side == "chosen" else (out.dloss_drejected, lp.rejected)
            ((weight * logps).sum() / scale).backward()
        norms[f"grad_norm/{side}"] = _grad_norm(model)
        model.zero_grad(set_to_none=True)
    return norms


def global_means(out: ObjectiveOutput | list[ObjectiveOutput], global_pairs: int) -> dict[str, float]:
    """Mean of each per-pair metric over the whole global batch (sums over this worker's
    micro-batches, all-reduced over ranks)."""
    outs = out if isinstance(out, list) else [out]
    names = ["loss", *outs[0].metrics]
    local = torch.stack([sum(o.losses.detach().sum() for o in outs),
                         *(sum(o.metrics[n].sum() for o in outs) for n in outs[0].metrics)]).float()  # fmt: skip
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return {name: float(v) / global_pairs for name, v in zip(names, local)}


def held_out_metrics(model, held: list[TokenizedPair], refs: tuple[Tensor | None, Tensor | None], pad_id: int,
                     micro_batch: int, device, objective: Objective) -> dict[str, float]:  # fmt: skip
    """The objective's metrics on pairs never trained on, under TRL's eval_ prefix
    (`eval_loss`, `eval_rewards/accuracies`, ...): the held-out preference accuracy of seed 003
    §5.3 for a policy (implicit reward margin > 0) and a reward model (r+ > r−) alike. One no_grad
    pass in the reference pass's batches (so at step 0 a policy's h is exactly 0), identical on
    every rank."""
    chosen, rejected = reference_logps(model, held, pad_id, micro_batch, device)
    lengths = torch.tensor([[len(p.chosen) for p in held], [len(p.rejected) for p in held]], device=chosen.device)
    out = objective(PairLogps(chosen, rejected, lengths[0], lengths[1], *refs))
    means = {"loss": out.losses, **{k: v for k, v in out.metrics.items() if not k.startswith("grads/")}}
    return {f"eval_{name}": float(v.float().mean()) for name, v in means.items()}


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def batch_schedule(num_pairs: int, batch_size: int, epochs: int, seed: int, max_steps: int | None) -> list[list[int]]:
    """Global batches of pair indices, a fresh seeded permutation per epoch, last partial batch dropped."""
    steps: list[list[int]] = []
    for epoch in range(epochs):
        order = epoch_order(num_pairs, seed, epoch)
        steps += [order[i : i + batch_size] for i in range(0, num_pairs - batch_size + 1, batch_size)]
    return steps[:max_steps] if max_steps else steps


# ── the worker loop ──────────────────────────────────────────────────────────────────────────
def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point. config: policy (path), ref_model (path, default the policy), tokenized (the pairs'
    token ids, `batch.write_tokenized`), out (folder), train (TrainConfig dict), batch_size.

    `policy`, `ref_model`, `tokenized` and `out` may be object-store URIs (a run dir on s3://):
    each worker reads this node's copy of a model (`localize`), rank 0 writes into this node's
    working copy of `out` and uploads it (after each sharded checkpoint, and at the end), so the
    workers may be on any node and rank 0 on another after a restart."""
    import pyarrow.parquet as pq
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from pipeline.config import TrainConfig

    cfg = TrainConfig.model_validate(config["train"])
    rank, world = dist.get_rank(), dist.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    out_loc = location(config["out"])
    out = working_copy(out_loc)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and is_uri(out_loc):  # this node's copy may be another run's: start from what the store holds
        resume_working_copy(out_loc, out, resuming=ray.train.get_checkpoint() is not None)
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())  # where each rank runs: the manifest shows it
    policy_path = str(localize(config["policy"]))

    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenized = read_tokenized(config["tokenized"])  # tokenized once by the driver
    trained = len(tokenized) - cfg.held_out_pairs  # the last `held_out_pairs` are evaluated, never trained on
    pairs, held = tokenized[:trained], tokenized[trained:]
    prompt_ids = pq.read_table(config["tokenized"], columns=["prompt_id"]).column("prompt_id").to_pylist()[:trained]
    objective = objective_for(cfg.method)
    reward_model = cfg.trains_reward_model
    batch_size = config["batch_size"]  # the driver shrinks it when there are fewer pairs
    share = batch_size // world
    micro = micro_batch_for(share, cfg.micro_batch_size)
    first_order = epoch_order(len(pairs), cfg.seed, 0)
    ref_path = config.get("ref_model", config["policy"])
    ref_chosen = ref_rejected = None
    held_refs: tuple[Tensor | None, Tensor | None] = (None, None)
    # OGD never loads a second model: its logged comparison loss is measured from the starting policy.
    if needs_reference(cfg.method) and ref_path != config["policy"] and not cfg.uses_ogd:
        reference = load_policy(str(localize(ref_path)), cfg.dtype, device)
        ref_chosen, ref_rejected = reference_logps(reference, pairs, pad_id, micro, device, first_order)
        if held:
            held_refs = reference_logps(reference, held, pad_id, micro, device)
        del reference
    model = load_policy(policy_path, cfg.dtype, device, cfg.activation_checkpointing,
                        reward_model_of=tokenizer if reward_model else None, parameterisation=cfg.parameterisation)  # fmt: skip
    counts = parameter_counts(model)  # global numbers (a DTensor's numel is its full size); the manifest shows them
    if reward_model:
        pad_id = model.config.pad_token_id  # what its pooling skips (`pipeline/chat.reward_pad_id`)
    if needs_reference(cfg.method) and (ref_path == config["policy"] or cfg.uses_ogd):
        ref_chosen, ref_rejected = reference_logps(model, pairs, pad_id, micro, device, first_order,
                                                   forward=split_logps if cfg.uses_ogd else None)  # fmt: skip
        if held:
            held_refs = reference_logps(model, held, pad_id, micro, device)
    if rank == 0 and ref_chosen is not None:
        write_reference_logps(out / "reference_logps.parquet", prompt_ids, ref_chosen, ref_rejected)
    optimizer = make_optimizer(model, cfg)
    schedule = batch_schedule(len(pairs), batch_size, cfg.epochs, cfg.seed, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, len(schedule), cfg.warmup_steps, cfg.lr_schedule)
    )
    guard = Guard(cfg.guard, cfg.method) if cfg.guard else None
    start = 0  # steps already done: a restart (a worker died, or the stage was killed) goes on from its checkpoint
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            start = restore_checkpoint(Path(path), model, optimizer, scheduler, guard)
        if guard is not None:
            objective = objective_for(guard.method)
        if rank == 0:
            log.warning("train resumes after step %d from its checkpoint", start)
    if rank == 0:
        keep_metrics_up_to(out / "metrics.jsonl", start)
    bar = _progress(len(schedule), start) if rank == 0 else None
    writer = _tensorboard(out, start) if rank == 0 else None
    model.train()

    def refs(indices: list[int]) -> tuple[Tensor | None, Tensor | None]:
        return (None, None) if ref_chosen is None else (ref_chosen[indices], ref_rejected[indices])

    for step, indices in enumerate(schedule):
        if step < start:
            continue
        mine = micro_batches(indices, rank, world, micro)
        batches = [collate([pairs[i] for i in chunk], pad_id).to(device) for chunk in mine]
        diagnostics = {}
        if cfg.uses_ogd:  # the gradient is OGD's; the method's loss is only logged (its terms are OGD's two gradients)
            outputs, diagnostics = ogd_step(model, batches, [refs(c) for c in mine], objective, scale=share)
        else:
            if cfg.diagnostics_every and (step % cfg.diagnostics_every == 0 or step == len(schedule) - 1):
                diagnostics = term_grad_norms(model, batches, [refs(c) for c in mine], objective, scale=share)
            outputs = []
            for chunk, batch in zip(mine, batches):
                loss, out_micro = step_loss(model, batch, *refs(chunk), objective, scale=share)
                loss.backward()
                outputs.append(out_micro)
        grad_norm = _clip(model, cfg.grad_clip)
        metrics = global_means(outputs, batch_size)  # identical on every rank: so is the guard's decision
        if step + 1 == config.get("inject_nan_at_step"):  # fault injection for tests (stages/train/__init__.py)
            metrics["loss"] = float("nan")
        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            # Every rank sees the same global numbers and stops before `optimizer.step`: no update
            # from a non-finite gradient reaches the weights.
            raise FloatingPointError(f"{NONFINITE} at step {step + 1}: loss={metrics['loss']}, grad_norm={grad_norm}")
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        fired = guard.update(metrics, step + 1) if guard else None
        if fired:
            objective = objective_for(guard.method)
        evaluated = {}
        if held and ((step + 1) % cfg.eval_every == 0 or step == len(schedule) - 1):
            evaluated = held_out_metrics(model, held, held_refs, pad_id, micro, device, objective)
        if rank == 0:
            record = {"step": step + 1, "epoch": step * batch_size / len(pairs), **metrics, **diagnostics, **evaluated,
                      "grad_norm": grad_norm, "lr": lr, **({"guard": fired} if fired else {}),
                      **({"restored_from_step": start} if start and step == start else {})}  # fmt: skip
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(f"train/{name}", value, step + 1)
            if fired:
                log.warning("train guard fired at step %d: %s", step + 1, fired)
            bar.set_description(f"train loss={metrics['loss']:.4f} margin={metrics['rewards/margins']:.3f}")
            bar.update(1)
        if str(step + 1) == config.get("kill_rank_at_step", {}).get(str(rank)) and not (out / f".killed-{rank}").exists():
            # Fault injection for tests (stages/train/__init__.py), once: SIGKILL this worker after the
            # controller has registered the checkpoints reported so far (a report still in flight dies with it).
            ray.train.get_all_reported_checkpoints()
            (out / f".killed-{rank}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < len(schedule):
            save_checkpoint(model, optimizer, scheduler, guard, step + 1, metrics)
            if rank == 0:
                writer.flush()
                upload(out, out_loc)  # the metrics so far beside the checkpoint (nothing to do when local)
    if bar is not None:
        bar.close()
        writer.close()
    save_hf_checkpoint(model, tokenizer, out / "checkpoint")
    if rank == 0:
        (out / WORKERS).write_text(json.dumps({"workers": [{"rank": r, "node_id": n} for r, n in enumerate(nodes)],
                                               "parameters": counts}))  # fmt: skip
        upload(out, out_loc)


def resume_working_copy(out_loc: str, out: Path, resuming: bool) -> None:
    """Rank 0's node-local working copy of an object-store stage folder, as the store has it: empty
    at step 0 (what is there is another run's), else the metrics and TensorBoard events uploaded
    with the checkpoint resumed from."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if resuming:
        if is_file(join(out_loc, "metrics.jsonl")):
            (out / "metrics.jsonl").write_text(read_text(join(out_loc, "metrics.jsonl")))
        copy_tree(join(out_loc, "tensorboard"), out / "tensorboard")


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW (DPO's, TRL's default), RMSprop (the OGD paper's, seed 001 §5) or plain SGD, over the
    trainable parameters only (RoPO's angles and magnitudes: its optimiser state is that small)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _tensorboard(out: Path, start: int = 0):
    """TensorBoard event files in the stage folder: `tensorboard --logdir RUN_DIR` finds every
    variant's and round's (they are named by their folders). After a restart, the events of the
    steps being redone are purged."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=str(out / "tensorboard"), flush_secs=10, purge_step=start + 1 if start else None)


def _grad_norm(model) -> float:
    return _clip(model, None)


def _clip(model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(norm)


def _progress(total: int, done: int = 0):
    # Ray's remote-aware tqdm draws one clean bar on the driver from inside a worker.
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="train")
    if done:
        bar.update(done)  # Ray's tqdm has no `initial`
    return bar
