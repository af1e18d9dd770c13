"""OGD's and RoPO's train step against DPO's, measured in the same run on the same batches.

    .venv/bin/python bench/ogd_ropo_step.py [--pairs 40] [--batch-size 8] [--warmup-steps 1] [--threads 2]

Three sides, each in its own subprocess (so each has its own memory high-water mark), all on the
building blocks of `stages/train/loop.py` as `train_loop` uses them, single-process FSDP2 (gloo;
NCCL on cuda), the trainer's precision policy (`--dtype`, default bf16 over fp32 master weights):
- `dpo`:  full weights, `step_loss → backward` (the objective's loss), AdamW;
- `ogd`:  full weights, `ogd_step` (two backward passes, one per side, one extra gradient copy,
          the global dot product and norm, the projection), RMSprop (the paper's);
- `ropo`: RoPO on `--ropo-modules` (frozen weights, rotations and magnitudes trained), DPO's
          `step_loss`, AdamW over the trainable parameters only.
Then `clip → optimizer.step → zero_grad → global_means`, as every step.

Counted per side: s/step over the steps after `--warmup-steps` (collate and copy excluded, as in
`bench/train_step_vs_trl.py`); peak memory during training (CPU: VmHWM reset before step 1; cuda:
`max_memory_allocated` reset before step 1); optimiser state bytes after the last step (every
tensor in `optimizer.state`); one gradient copy's bytes (the trainable parameters' fp32 size).

Targets (issue 10), printed as ratios against DPO: OGD step ≤ 2.2× DPO's, OGD peak ≤ DPO's +
one gradient copy; RoPO step ≤ 1.1× DPO's, RoPO optimiser state ≤ 1% of DPO's.
On a GPU: `--device cuda --shape qwen2.5-0.5b --tokenizer .gpu/tokenizer --seq-len 512`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MARK = "RESULT "


def run_side(args, model_path: str) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    import bench.train_step_vs_trl as base
    from pipeline.config import RoPOParameterisation, TrainConfig
    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import _clip, batch_schedule, epoch_order, global_means, load_policy, make_optimizer, reference_logps, step_loss
    from stages.train.objectives import dpo
    from stages.train.ogd import ogd_step, split_logps

    torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    cuda = device.type == "cuda"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        ropo = RoPOParameterisation(modules=args.ropo_modules.split(","), stages=2) if args.side == "ropo" else None
        cfg = TrainConfig(num_workers=1, batch_size=args.batch_size, lr=1e-6, dtype=args.dtype,
                          optimizer="rmsprop" if args.side == "ogd" else "adamw")  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = base.build_rows(args.pairs, tokenizer if args.seq_len else None, args.seq_len)
        pairs = [tokenize_pair(tokenizer, row, args.seq_len or 384) for row in rows]
        model = load_policy(model_path, cfg.dtype, device, parameterisation=ropo)
        ref_chosen, ref_rejected = reference_logps(model, pairs, pad_id, cfg.batch_size, device, epoch_order(len(pairs), 0, 0),
                                                   forward=split_logps if args.side == "ogd" else None)  # as train_loop
        optimizer = make_optimizer(model, cfg)
        objective = lambda lp: dpo(lp, beta=0.1)  # noqa: E731
        trainable = [p for p in model.parameters() if p.requires_grad]
        gradient_copy = sum(p.numel() * 4 for p in trainable)  # fp32 master gradients
        model.train()
        hwm = base._reset_hwm()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds, losses = [], []
        for indices in batch_schedule(len(pairs), cfg.batch_size, 1, 0, None):
            batch = collate([pairs[i] for i in indices], pad_id).to(device)
            refs = (ref_chosen[indices], ref_rejected[indices])
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            if args.side == "ogd":
                outputs, _ = ogd_step(model, [batch], [refs], objective, scale=len(indices))
            else:
                loss, out = step_loss(model, batch, *refs, objective)
                loss.backward()
                outputs = [out]
            _clip(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = global_means(outputs, len(indices))
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            losses.append(metrics["loss"])
        measured = seconds[args.warmup_steps :]
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        peak = (torch.cuda.max_memory_allocated() if cuda else (base._hwm_gib() * 2**30 if hwm else None))
        return {"side": args.side, "device": args.device, "dtype": cfg.dtype, "steps_measured": len(measured),
                "s_per_step": round(sum(measured) / len(measured), 4), "step_seconds": [round(x, 3) for x in seconds],
                "first_step_loss": round(losses[0], 6), "last_step_loss": round(losses[-1], 6),
                "train_peak_gib": None if peak is None else round(peak / 2**30, 3),
                "optimizer_state_bytes": state, "gradient_copy_bytes": gradient_copy,
                "trainable": sum(p.numel() for p in trainable)}  # fmt: skip
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--shape", help="a randomly initialised model of this shape (bench/train_step_vs_trl.py SHAPES)")
    parser.add_argument("--tokenizer", help="tokenizer folder for --shape")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--pairs", type=int, default=40, help="pairs; steps = pairs // batch-size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, help="fill every pair to this many tokens (bench/train_step_vs_trl.py)")
    parser.add_argument("--ropo-modules", default="q_proj,v_proj")
    parser.add_argument("--sides", default="dpo,ogd,ropo")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child: one side
        print(MARK + json.dumps(run_side(args, args.model_dir)), flush=True)
        return 0
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.shape:
        import tempfile

        import bench.train_step_vs_trl as base

        model_dir = tempfile.mkdtemp(prefix="ogd-ropo-bench-")
        base.build_shape(argparse.Namespace(shape=args.shape, tokenizer=args.tokenizer, model=args.model, seed=0), model_dir)
    else:
        from pipeline.models import resolve_model

        model_dir = str(resolve_model(args.model))
    results = {}
    for side in args.sides.split(","):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side, "--model-dir", model_dir],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if proc.returncode or not lines:
            sys.stdout.write(proc.stdout)
            print(f"{side} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[side] = json.loads(lines[-1][len(MARK) :])
        print(json.dumps(results[side]), flush=True)
    dpo = results.get("dpo")
    summary = {}
    if dpo and "ogd" in results:
        ogd = results["ogd"]
        summary["ogd_step_ratio"] = round(ogd["s_per_step"] / dpo["s_per_step"], 3)
        if ogd["train_peak_gib"] is not None and dpo["train_peak_gib"] is not None:
            summary["ogd_peak_minus_dpo_gib"] = round(ogd["train_peak_gib"] - dpo["train_peak_gib"], 3)
            summary["one_gradient_copy_gib"] = round(ogd["gradient_copy_bytes"] / 2**30, 3)
    if dpo and "ropo" in results:
        ropo = results["ropo"]
        summary["ropo_step_ratio"] = round(ropo["s_per_step"] / dpo["s_per_step"], 3)
        summary["ropo_optimizer_state_ratio"] = round(ropo["optimizer_state_bytes"] / dpo["optimizer_state_bytes"], 6)
        summary["ropo_trainable"] = ropo["trainable"]
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
