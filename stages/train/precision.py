"""One precision policy for the training forward and every forward that must reproduce it.

`train.dtype` names the *compute* dtype. For "bfloat16" training uses FSDP2's
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the master weights and the optimiser
stay fp32, and at each all-gather FSDP2 casts the parameters to bf16, so the whole forward runs
in bf16 — matmuls, norms, residual adds, attention — with the buffers (the rotary `inv_freq`)
left fp32 and the logits coming out bf16. `stages/train/logps.py` then reduces those bf16 logits
in fp32. Gradients are all-reduced in fp32.

Evaluate's log-probs of the "before" model must be the training reference's log-probs, so its
forward has to be *this* forward: an unsharded model whose parameters (not buffers) are cast to
the compute dtype, as FSDP2 casts them. CPU autocast is a different computation — fp32 weights
and residual stream, bf16 only for the inputs of matmuls — and so is `model.to(bf16)`, which also
rounds the rotary frequencies. On the same batches this forward equals FSDP2's bit for bit; the
batches must be the same too, since in bf16 a batch's padded width alone moves a response's logp
(by 0.23 nats on SmolLM2-135M). Measured in tests/stage/test_precision.py.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# A Ray Train worker holds this many CPUs, and Ray starts it with OMP_NUM_THREADS set to it: its
# forwards run on that many intra-op threads. On CPU the thread count changes how a matmul splits
# its reductions, and in bf16 the rounding that follows: SmolLM2-135M's log-probs of the default
# run's pairs moved by up to 1.36 nats on 2 threads against 1. Every forward that must reproduce
# the training reference (evaluate's "before") runs on this many threads too.
TRAIN_WORKER_CPUS = 1


def compute_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of the forward for a `train.dtype` name."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown compute dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def fsdp_policy(dtype: str):
    """FSDP2's mixed precision for `train.dtype`: bf16 parameters in the forward, fp32 reductions;
    fp32 is FSDP2's default policy (no casts)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype(dtype) == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype(dtype), reduce_dtype=torch.float32)


def for_inference(model: nn.Module, dtype: str) -> nn.Module:
    """The unsharded counterpart of `fsdp_policy`: parameters cast to the compute dtype in place,
    buffers left as loaded (FSDP2 casts parameters only), eval mode. Load the model in fp32 first:
    the checkpoint's weights are the fp32 master weights FSDP2 would cast."""
    target = compute_dtype(dtype)
    for param in model.parameters():  # tied weights are one Parameter: cast once
        param.data = param.data.to(target)
    return model.eval()
