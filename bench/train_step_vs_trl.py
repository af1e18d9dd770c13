"""Our DPO train step vs TRL's `DPOTrainer`: tokens/s, s/step and peak RSS on the same data and model.

    .venv/bin/python bench/train_step_vs_trl.py [--pairs 40] [--batch-size 8] [--warmup-steps 1] [--threads 2]

One run, two sides, each in its own subprocess (so each side's RSS high-water mark is its own):
- ours: the building blocks of `stages/train/loop.py` exactly as `train_loop` uses them, on a
  single-process gloo group: `load_policy` (FSDP2 `fully_shard`, bf16 `MixedPrecisionPolicy` over
  fp32 master weights), `tokenize_pair`, `reference_logps` (once, before training), AdamW, then
  per step `collate → step_loss → backward → clip → optimizer.step → zero_grad → global_means`;
- TRL: `DPOTrainer` with `DPOConfig(use_cpu=True, bf16=True)` (autocast over fp32 weights),
  `precompute_ref_log_probs=True` (reference log-probs computed once before training, no reference
  model kept: the closest match to ours), no gradient checkpointing (TRL's default is on, ours has
  none), `optim="adamw_torch"` (plain `torch.optim.AdamW`, as ours), reporting/logging/saving off.

Both get the same rows (built deterministically from `math_problems`, no sampling), beta 0.1,
sigmoid loss, lr 5e-6, weight decay 0, grad clip 1.0, constant lr, global batch `--batch-size`
pairs without accumulation, max_length 384, the same threads, and the very same batches: the rows
are handed to TRL in our first-epoch order (`epoch_order`) with a sequential sampler, and TRL's
reference precompute uses the training batch size, so both sides' reference pass and training
steps see identical pair groupings.

What is counted:
- tokens: non-padding tokens of every training batch, i.e. `attention_mask.sum()` over the 2B
  rows (prompt+chosen and prompt+rejected per pair), each side from its own tokenized batch;
- time: per optimiser step, from the collated batch in hand to the step's end (forward, backward,
  metrics, clip, optimiser step, lr step, zero_grad). For TRL that is `on_step_begin` →
  `on_step_end` of a TrainerCallback (the dataloader fetch and collate happen before
  `on_step_begin`); for ours the same span around the loop body, collate excluded. Model load,
  tokenization, the reference pass and the first `--warmup-steps` steps are not counted;
- tokens/s = measured tokens / measured seconds;
- peak RSS: `ru_maxrss` of the side's process (whole life: load, reference pass, training), and
  `train_peak_rss_gib`, the high-water mark (VmHWM) reset right before the first training step;
- first-step loss: before any update the policy is the reference, so both must be ln 2; the
  script asserts |loss - ln 2| < 5e-3 (bf16 rounding) on each side.

Prints one JSON line per side (the children) and one combined JSON line (last line of stdout)
with the ratios ours/TRL. bench/RESULTS.md records it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "BENCH_RESULT "
LN2 = math.log(2)
LOSS_TOL = 5e-3  # bf16: the reference and the training forward round differently (bench/RESULTS.md)

FILLERS = [
    "Let me double-check the arithmetic once more.",
    "Rounding the intermediate result keeps the numbers simple.",
    "So the total has to be a little larger than that.",
]


def build_rows(num_pairs: int) -> list[dict]:
    """Conversational TRL rows: chosen = the reference solution; rejected = filler + a wrong final answer."""
    from pipeline.data import math_problems

    rows = []
    for i, problem in enumerate(math_problems(num_pairs, seed=0, split="train")):
        answer = problem["answer"]
        try:
            wrong = str(int(answer) + 1 + i % 7)
        except ValueError:
            wrong = str(float(answer) + 1 + i % 7)
        steps = problem["solution"].split("\n")[:-1]  # drop "The answer is N."
        filler = " ".join(FILLERS[: 1 + i % len(FILLERS)])
        rejected = "\n".join([*steps, filler, f"The answer is {wrong}."])
        rows.append({
            "prompt": [{"role": "user", "content": problem["prompt"]}],
            "chosen": [{"role": "assistant", "content": problem["solution"]}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })  # fmt: skip
    return rows


# ── memory helpers ──────────────────────────────────────────────────────────────────────────
def _ru_maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _hwm_gib() -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    return None


def _summary(side: str, step_tokens: list[int], step_seconds: list[float], losses: list[float], warmup: int,
             hwm_reset: bool, extra: dict) -> dict:  # fmt: skip
    tokens, seconds = sum(step_tokens[warmup:]), sum(step_seconds[warmup:])
    measured = len(step_seconds) - warmup
    return {
        "side": side,
        "steps_measured": measured,
        "warmup_steps": warmup,
        "tokens_measured": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "s_per_step": round(seconds / measured, 3),
        "step_seconds": [round(s, 3) for s in step_seconds],
        "step_tokens": step_tokens,
        "first_step_loss": round(losses[0], 6),
        "losses": [round(x, 6) for x in losses],
        "peak_rss_gib": round(_ru_maxrss_gib(), 3),
        "train_peak_rss_gib": round(_hwm_gib(), 3) if hwm_reset else None,
        **extra,
    }


# ── ours ────────────────────────────────────────────────────────────────────────────────────
def run_ours(args, model_path: str, rows: list[dict]) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from pipeline.config import DPOMethod, TrainConfig
    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import _clip, batch_schedule, epoch_order, global_means, load_policy, reference_logps, step_loss
    from stages.train.objectives import objective_for

    torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        cfg = TrainConfig(method=DPOMethod(beta=args.beta), num_workers=1, batch_size=args.batch_size,
                          lr=args.lr, max_length=args.max_length, dtype=args.dtype, seed=args.seed)  # fmt: skip
        device = torch.device("cpu")
        torch.manual_seed(cfg.seed)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = load_policy(model_path, cfg.dtype, device)
        pairs = [tokenize_pair(tokenizer, row, cfg.max_length) for row in rows]
        objective = objective_for(cfg.method)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        share = cfg.batch_size  # one worker: the whole global batch
        t0 = time.perf_counter()
        ref_chosen, ref_rejected = reference_logps(model, pairs, pad_id, share, device, epoch_order(len(pairs), cfg.seed, 0))
        ref_seconds = time.perf_counter() - t0
        schedule = batch_schedule(len(pairs), cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_steps)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
        model.train()
        hwm_reset = _reset_hwm()
        step_tokens, step_seconds, losses = [], [], []
        for indices in schedule:
            mine = torch.tensor(indices)
            batch = collate([pairs[i] for i in indices], pad_id).to(device)
            start = time.perf_counter()
            loss, outputs = step_loss(model, batch, ref_chosen[mine], ref_rejected[mine], objective)
            loss.backward()
            _clip(model, cfg.grad_clip)
            optimizer.step()
            warmup.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = global_means(outputs, cfg.batch_size)
            step_seconds.append(time.perf_counter() - start)
            step_tokens.append(int(batch.attention_mask.sum()))
            losses.append(metrics["loss"])
        return _summary("ours", step_tokens, step_seconds, losses, args.warmup_steps, hwm_reset,
                        {"ref_pass_s": round(ref_seconds, 2), "threads": torch.get_num_threads()})  # fmt: skip
    finally:
        dist.destroy_process_group()


# ── TRL ─────────────────────────────────────────────────────────────────────────────────────
def run_trl(args, model_path: str, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from stages.train.loop import epoch_order

    torch.set_num_threads(args.threads)
    # Our first epoch's order, read sequentially: the same batches as ours, in the same order.
    ordered = [rows[i] for i in epoch_order(len(rows), args.seed, 0)]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    step_tokens: list[int] = []
    losses: list[float] = []
    step_seconds: list[float] = []
    state = {"hwm_reset": False}

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            state["hwm_reset"] = _reset_hwm()

        def on_step_begin(self, *_, **__):
            state["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_seconds.append(time.perf_counter() - state["start"])

    class CountingDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            step_tokens.append(int(inputs["attention_mask"].sum()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(float(loss))
            return loss

    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=args.dtype == "bfloat16",
            beta=args.beta,
            loss_type=["sigmoid"],
            learning_rate=args.lr,
            weight_decay=0.0,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            num_train_epochs=1,
            max_length=args.max_length,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=args.batch_size,
            gradient_checkpointing=False,
            train_sampling_strategy="sequential",
            dataloader_drop_last=True,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        trainer = CountingDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(ordered),
                                     processing_class=tokenizer, callbacks=[Timer()])  # fmt: skip
        init_seconds = time.perf_counter() - t0  # tokenization + reference precompute
        trainer.train()
    return _summary("trl", step_tokens, step_seconds, losses, args.warmup_steps, state["hwm_reset"],
                    {"init_incl_ref_pass_s": round(init_seconds, 2), "threads": torch.get_num_threads(),
                     "autocast_bf16": bool(config.bf16)})  # fmt: skip


# ── driver ──────────────────────────────────────────────────────────────────────────────────
def child(args) -> None:
    from pipeline.models import resolve_model

    model_path = resolve_model(args.model)
    rows = build_rows(args.pairs)
    result = (run_ours if args.side == "ours" else run_trl)(args, model_path, rows)
    n_steps = args.pairs // args.batch_size
    assert len(result["step_seconds"]) == n_steps, f"{args.side}: {len(result['step_seconds'])} steps, expected {n_steps}"
    assert abs(result["first_step_loss"] - LN2) < LOSS_TOL, (
        f"{args.side}: first-step loss {result['first_step_loss']} is not ln 2 = {LN2:.6f} (policy == reference)"
    )
    print(MARK + json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=40, help="pairs; steps = pairs // batch-size (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch of pairs per optimiser step")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="compute dtype on both sides (fp32 weights either way)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs // args.batch_size <= args.warmup_steps:
        parser.error("need more steps (pairs // batch-size) than --warmup-steps")

    if args.side:
        child(args)
        return 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    results = {}
    for side in ("ours", "trl"):
        cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            sys.stdout.write(proc.stdout)
            print(f"{side} side failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[side] = json.loads(lines[-1][len(MARK):])
        print(json.dumps(results[side]), flush=True)

    ours, trl = results["ours"], results["trl"]
    keep = ("tokens_per_s", "s_per_step", "tokens_measured", "peak_rss_gib", "train_peak_rss_gib", "first_step_loss")
    combined = {
        "pairs": args.pairs, "batch_size": args.batch_size, "steps_measured": ours["steps_measured"],
        "warmup_steps": args.warmup_steps, "threads": args.threads, "dtype": args.dtype, "max_length": args.max_length,
        "ours": {k: ours[k] for k in keep},
        "trl": {k: trl[k] for k in keep},
        "ratio_tokens_per_s": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
        "ratio_peak_rss": round(ours["peak_rss_gib"] / trl["peak_rss_gib"], 3),
    }  # fmt: skip
    if ours["train_peak_rss_gib"] and trl["train_peak_rss_gib"]:
        combined["ratio_train_peak_rss"] = round(ours["train_peak_rss_gib"] / trl["train_peak_rss_gib"], 3)
    print(json.dumps(combined), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
