"""Where our train step's time goes on a GPU: the step of `bench/train_step_vs_trl.py` ("ours") in
variants that each change one thing, plus a torch.profiler table of the as-is step.

    python3 bench/profile_train_step.py --tokenizer .gpu/tokenizer   # on the device machine (bench/gpu_check.sh)

Variants (same model, batches and precision; s/step = mean of `--steps` − 2 steps after 2 warm-up steps):
- `fsdp`: as `train_loop` runs it (FSDP2 `fully_shard` per layer and root, bf16 MixedPrecisionPolicy,
  `torch.optim.AdamW` defaults, `clip_grad_norm_` on DTensors);
- `fsdp_fused`: the same with `AdamW(fused=True)`;
- `plain_autocast`: no FSDP on one GPU: fp32 weights under `torch.autocast(bfloat16)` (TRL's
  policy), AdamW defaults;
- `plain_autocast_fused`: the same with the fused AdamW;
- `fsdp:<method>` (e.g. `fsdp:simpo`): `fsdp` with another objective (`--methods` adds one per
  method): each objective's step time against DPO's; a reference-free one runs no reference pass.
Prints one JSON line per variant and the profiler's top ops of `fsdp`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--variants", default="fsdp,fsdp_fused,plain_autocast,plain_autocast_fused")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--steps", type=int, default=6, help="steps per variant (the first 2 not counted), cycling over 6 batches")
    parser.add_argument("--methods", default="", help="comma-separated method types, each timed as fsdp:<type>")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (shape tiny)")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bench.train_step_vs_trl as bench
    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import _clip, load_policy, policy_logps, step_loss
    from stages.train.objectives import dpo

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    tmp = tempfile.mkdtemp()
    shape_args = argparse.Namespace(shape=args.shape, tokenizer=args.tokenizer, model=None, seed=0)
    bench.build_shape(shape_args, tmp)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    rows = bench.build_rows(args.pairs, tokenizer, args.seq_len)
    pairs = [tokenize_pair(tokenizer, row, args.seq_len) for row in rows]
    batches = [collate(pairs[i : i + args.batch_size], tokenizer.pad_token_id).to(device)
               for i in range(0, 6 * args.batch_size, args.batch_size)]  # fmt: skip

    if cuda:  # the fused (compiled) log-probs against float64 on the same bf16 logits, values and gradients
        from stages.train.logps import _row_logps, token_logps

        g = torch.Generator(device="cuda").manual_seed(0)
        logits = (4 * torch.randn(4, 300, 151936, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_(True)
        labels = torch.randint(0, 151936, (4, 300), device="cuda", generator=g)
        fused = token_logps(logits, labels)
        fused.sum().backward()
        exact = logits.detach().double().requires_grad_(True)
        want = _row_logps(exact, labels)
        want.sum().backward()
        print(json.dumps({"fused_logps_max_abs_err": float((fused.double() - want).abs().max()),
                          "fused_grad_max_abs_err": float((logits.grad.double() - exact.grad).abs().max())}), flush=True)  # fmt: skip
        del logits, exact, fused, want

    from pipeline.config import TrainConfig
    from stages.train.objectives import needs_reference, objective_for

    variants = args.variants.split(",") + [f"fsdp:{m}" for m in args.methods.split(",") if m]
    for variant in variants:
        method = TrainConfig.model_validate({"method": {"type": variant.split(":")[1]}}).method if ":" in variant else None
        objective = objective_for(method) if method else (lambda lp: dpo(lp, beta=0.1))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if variant.startswith("fsdp"):
            model, autocast = load_policy(tmp, "bfloat16", device), nullcontext
        else:
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
            autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=(variant.endswith("fused") and cuda) or None)
        with torch.no_grad(), autocast():
            refs = [tuple(x.float() for x in policy_logps(model, b)) for b in batches]
        if method and not needs_reference(method):
            refs = [(None, None)] * len(batches)
        times = []
        profiler = None
        for i in range(args.steps):
            batch, ref = batches[i % len(batches)], refs[i % len(batches)]
            if args.profile and variant == "fsdp" and i == 4:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                              torch.profiler.ProfilerActivity.CUDA])  # fmt: skip
                profiler.__enter__()
            sync()
            start = time.perf_counter()
            with autocast():
                loss, _ = step_loss(model, batch, *ref, objective)
            loss.backward()
            _clip(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
            if profiler is not None and i == 5:
                profiler.__exit__(None, None, None)
        steady = times[2:]
        print(json.dumps({"variant": variant, "s_per_step": round(sum(steady) / len(steady), 4),
                          "steps": [round(t, 4) for t in times],
                          "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                          "loss_first": float(loss)}), flush=True)  # fmt: skip
        if profiler is not None:
            print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)
            print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
        del model, optimizer
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
