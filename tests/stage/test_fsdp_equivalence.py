"""The DPO step on 2 FSDP workers equals the step on 1 worker for the same global batch, and a
step accumulated over micro-batches equals the step on the whole batch; the same for OGD's update
rule and RoPO's parameterisation (below).

Both runs use the real building blocks of `stages/train/loop.py` inside a Ray Train
`TorchTrainer` (gloo, CPU): `load_policy` (FSDP2), `reference_logps`, `step_loss`,
`global_means`. To make policy and reference differ (otherwise the DPO loss is exactly ln 2),
every parameter gets a deterministic perturbation after the reference pass, and the reference
log-probs get per-pair offsets. The single-worker result is also checked against a plain float64
computation in the test process that does not use the FSDP building blocks — which also gives
the chosen and rejected terms' gradient norms (autograd through logp(y+) alone, logp(y−) alone)
that `term_grad_norms` reports from the objective's closed form.

OGD and RoPO run in the same Ray Train launches (`ogd_ropo_part`, on 1 worker with one micro-batch
of 4 and on 2 workers with micro-batches of 1), through the loop's own blocks (`load_policy`,
`ogd_step`, `make_optimizer`, `save_hf_checkpoint`):
- OGD: the projected gradient of the global batch is the same on 1 and 2 workers (accumulation
  and the all-reduced dot product and norm at once) to 1e-6, and equals a float64 single-process
  computation (autograd per side, projection by the unit vector of g_l) sharing no code with
  `ogd_step`;
- RoPO: three SGD steps of DPO on q_proj/v_proj rotations give the same merged weights on 1 and 2
  workers; the exported HF checkpoint is a plain model whose neurons keep their angles;
- OGD × RoPO: the rule projects over the rotation parameters only (the trainable vector).
"""

from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F

# pytest imports this file as a top-level module that Ray's worker processes cannot import:
# ship the worker function (and the constants it uses) by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

GLOBAL_BATCH = 4
BETA = 0.1
MAX_LENGTH = 512
# Per-pair offsets of the reference log-probs: different weights σ(-β·h) per pair, so the way the
# global batch is split over workers matters for the gradient.
REF_CHOSEN_OFFSET = [-0.5, 1.0, -2.0, 0.3]
REF_REJECTED_OFFSET = [0.3, -0.7, 0.1, 1.5]

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Tom has 3 bags of 4 apples. How many apples?"}],
        "chosen": [{"role": "assistant", "content": "3 × 4 = 12 apples. The answer is 12."}],
        "rejected": [{"role": "assistant", "content": "The answer is 7."}],
    },
    {
        "prompt": [{"role": "user", "content": "16 ÷ 2 = ?"}],
        "chosen": [{"role": "assistant", "content": "16 ÷ 2 = 8. The answer is 8."}],
        "rejected": [{"role": "assistant", "content": "Solve it step by step: 16 - 2 = 14, 14 + 2 = 16. The answer is 16."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Finish with a last line of the form 'The answer is N.'"},
            {"role": "user", "content": "How many dollars does Lena make by selling all the boxes at 2 dollars each?"},
        ],
        "chosen": [{"role": "assistant", "content": "8 boxes × 2 = 16 dollars. The answer is 16."}],
        "rejected": [{"role": "assistant", "content": "9"}],
    },
    {
        "prompt": [{"role": "user", "content": "0 1 2 3 4 5 6 7 8 9"}],
        "chosen": [{"role": "assistant", "content": "10"}],
        "rejected": [{"role": "assistant", "content": "the answer is of and to in 5 + 5 = 11, 11 - 1 = 10 ! ?"}],
    },
]


def perturbation(name: str, shape: torch.Size) -> torch.Tensor:
    """A deterministic float32 perturbation of one parameter, a function of its name only."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return 0.02 * torch.randn(shape, generator=gen, dtype=torch.float32)


def fsdp_step_worker(config: dict) -> None:
    """One DPO step on this worker's share of the global batch; rank 0 saves loss, metrics, grads."""
    import ray.train.torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
    from transformers import AutoTokenizer

    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import global_means, load_policy, reference_logps, step_loss, term_grad_norms
    from stages.train.objectives import dpo
    from stages.train.schedule import micro_batches

    rank, world = dist.get_rank(), dist.get_world_size()
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(config["policy"])
    pad_id = tokenizer.pad_token_id
    model = load_policy(config["policy"], "float32", device)
    pairs = [tokenize_pair(tokenizer, row, MAX_LENGTH) for row in config["pairs"]]

    ref_chosen, ref_rejected = reference_logps(model, pairs, pad_id, 1, device)
    # What `train_loop` hands the optimizer: the parameters as registered after the reference pass.
    params_after_reference = list(model.named_parameters())
    ref_chosen = ref_chosen - torch.tensor(REF_CHOSEN_OFFSET, device=ref_chosen.device)
    ref_rejected = ref_rejected - torch.tensor(REF_REJECTED_OFFSET, device=ref_rejected.device)

    with torch.no_grad():
        for name, p in model.named_parameters():
            delta = perturbation(name, p.shape).to(device)
            if isinstance(p, DTensor):
                delta = distribute_tensor(delta, p.device_mesh, p.placements)
            p.add_(delta)

    share = GLOBAL_BATCH // world
    chunks = micro_batches(list(range(GLOBAL_BATCH)), rank, world, config.get("micro") or share)
    batches = [collate([pairs[i] for i in chunk], pad_id).to(device) for chunk in chunks]
    refs = [(ref_chosen[chunk], ref_rejected[chunk]) for chunk in chunks]
    model.train()
    objective = lambda lp: dpo(lp, beta=BETA)  # noqa: E731
    term_norms = term_grad_norms(model, batches, refs, objective, scale=share)
    loss, outs = 0.0, []
    for batch, ref in zip(batches, refs):
        micro_loss, out = step_loss(model, batch, *ref, objective, scale=share)
        micro_loss.backward()
        loss, outs = loss + micro_loss.item(), outs + [out]
    metrics = global_means(outs, GLOBAL_BATCH)

    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            grads[name] = None
            continue
        grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu().clone()
    without_grad = [name for name, p in params_after_reference if p.grad is None]
    if config.get("ogd_ropo"):
        ogd_ropo_part(config, pairs, tokenizer, chunks, share, device)
    if rank == 0:
        torch.save({"world": world, "local_loss": loss, "metrics": metrics, "grads": grads,
                    "without_grad": without_grad, "term_norms": term_norms}, config["result"])  # fmt: skip
    dist.barrier()


def ogd_ropo_part(config: dict, pairs, tokenizer, chunks, share: int, device) -> None:
    """OGD (full weights and RoPO) on this worker's micro-batches, then three RoPO DPO steps and the
    HF export; rank 0 saves the results in `config["ogd_ropo"]`."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from pipeline.config import RoPOParameterisation
    from stages.train.batch import collate
    from stages.train.checkpoint import save_hf_checkpoint
    from stages.train.loop import load_policy, make_optimizer, reference_logps, step_loss
    from stages.train.objectives import dpo
    from stages.train.ogd import ogd_step

    rank, world = dist.get_rank(), dist.get_world_size()
    pad_id = tokenizer.pad_token_id
    batches = [collate([pairs[i] for i in chunk], pad_id).to(device) for chunk in chunks]
    objective = lambda lp: dpo(lp, beta=0.1)  # noqa: E731

    def full(t):
        return None if t is None else (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()

    result = {"world": world}
    ropo = RoPOParameterisation(modules=["q_proj", "v_proj"], stages=2)
    for name, parameterisation in (("full", None), ("ropo", ropo)):
        model = load_policy(config["policy"], "float32", device, parameterisation=parameterisation)
        ref_c, ref_r = reference_logps(model, pairs, pad_id, 1, device)
        model.train()
        outs, stats = ogd_step(model, batches, [(ref_c[c], ref_r[c]) for c in chunks], objective, scale=share)
        result[f"ogd_{name}"] = {"stats": stats, "loss": sum(float(o.losses.sum()) for o in outs),
                                 "grads": {n: full(p.grad) for n, p in model.named_parameters() if p.requires_grad}}  # fmt: skip
        model.zero_grad(set_to_none=True)

    class Cfg:  # make_optimizer's fields
        optimizer, lr, weight_decay = "sgd", 0.5, 0.0

    optimizer = make_optimizer(model, Cfg)  # the RoPO model: angles and magnitudes only
    result["optimised"] = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    for _ in range(3):
        for chunk, batch in zip(chunks, batches):
            loss, _ = step_loss(model, batch, ref_c[chunk], ref_r[chunk], objective, scale=share)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_hf_checkpoint(model, tokenizer, Path(config["ogd_ropo"]) / "checkpoint")
    if rank == 0:
        torch.save(result, Path(config["ogd_ropo"]) / "result.pt")
    dist.barrier()


def _run(tiny_llama: Path, workers: int, tmp_path: Path, micro: int | None = None, ogd_ropo: bool = False) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result = tmp_path / f"result-w{workers}-m{micro}.pt"
    out = tmp_path / f"ogd-ropo-w{workers}-m{micro}"
    out.mkdir()
    trainer = TorchTrainer(
        fsdp_step_worker,
        train_loop_config={"policy": str(tiny_llama), "pairs": PAIRS, "result": str(result), "micro": micro,
                           "ogd_ropo": str(out) if ogd_ropo else None},  # fmt: skip
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=f"fsdp-w{workers}-m{micro}", storage_path=str(tmp_path / "ray-train")),
    )
    trainer.fit()
    loaded = torch.load(result, weights_only=False)
    if ogd_ropo:
        loaded["ogd_ropo"] = {**torch.load(out / "result.pt", weights_only=False), "checkpoint": out / "checkpoint"}
    return loaded


def _plain_float64(tiny_llama: Path) -> dict:
    """The same step without FSDP, Ray or the stage's log-prob code: float64, one sequence at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train.batch import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    pairs = [tokenize_pair(tokenizer, row, MAX_LENGTH) for row in PAIRS]

    def logp(prompt: list[int], response: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + response])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)  # [T, V]
        # token at position t is predicted by the logits at t-1
        return sum(logprobs[len(prompt) + k - 1, tok] for k, tok in enumerate(response))

    with torch.no_grad():
        ref_c = torch.stack([logp(p.prompt, p.chosen) for p in pairs]) - torch.tensor(REF_CHOSEN_OFFSET, dtype=torch.float64)
        ref_r = torch.stack([logp(p.prompt, p.rejected) for p in pairs]) - torch.tensor(REF_REJECTED_OFFSET, dtype=torch.float64)
        for name, p in model.named_parameters():
            p.add_(perturbation(name, p.shape).to(torch.float64))
    pol_c = torch.stack([logp(p.prompt, p.chosen) for p in pairs])
    pol_r = torch.stack([logp(p.prompt, p.rejected) for p in pairs])
    loss = -F.logsigmoid(BETA * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
    params = [p for p in model.parameters()]

    def norm_through(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
        term = -F.logsigmoid(BETA * ((chosen - ref_c) - (rejected - ref_r))).mean()
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float((g**2).sum()) for g in grads if g is not None))

    term_norms = {"grad_norm/chosen": norm_through(pol_c, pol_r.detach()),
                  "grad_norm/rejected": norm_through(pol_c.detach(), pol_r)}  # fmt: skip
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "logps/chosen": pol_c.detach().mean().item(), "logps/rejected": pol_r.detach().mean().item(),
            "grads": grads, "term_norms": term_norms}  # fmt: skip


def test_pairs_have_different_lengths(tiny_llama):
    from transformers import AutoTokenizer

    from stages.train.batch import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = [tokenize_pair(tokenizer, row, MAX_LENGTH) for row in PAIRS]
    lengths = [len(p.prompt) + len(p.chosen) for p in pairs] + [len(p.prompt) + len(p.rejected) for p in pairs]
    assert len(set(lengths)) >= 6, lengths  # padding happens in every batch, both splits


@pytest.fixture(scope="module")
def steps(tiny_llama, ray_local, tmp_path_factory) -> dict[int, dict]:
    """The same step on 1 and on 2 workers, each in a fresh TorchTrainer run."""
    tmp_path = tmp_path_factory.mktemp("fsdp-equivalence")
    return {1: _run(tiny_llama, 1, tmp_path, ogd_ropo=True), 2: _run(tiny_llama, 2, tmp_path)}


@pytest.fixture(scope="module")
def accumulated(tiny_llama, ray_local, tmp_path_factory) -> dict[int, dict]:
    """The same global batch of 4 accumulated over micro-batches: 1 worker × 2 micro-batches of 2,
    and 2 workers × 2 micro-batches of 1."""
    tmp_path = tmp_path_factory.mktemp("accumulation")
    return {1: _run(tiny_llama, 1, tmp_path, micro=2), 2: _run(tiny_llama, 2, tmp_path, micro=1, ogd_ropo=True)}


@pytest.mark.parametrize("workers", [1, 2])
def test_accumulation_matches_one_big_batch(steps, accumulated, workers):
    one, acc = steps[1], accumulated[workers]
    assert acc["world"] == workers
    for key, value in one["metrics"].items():
        assert acc["metrics"][key] == pytest.approx(value, abs=1e-5), key
    if workers == 1:
        assert acc["local_loss"] == pytest.approx(one["local_loss"], abs=1e-6)  # Σ micro losses / share = the mean
    for name, g1 in one["grads"].items():
        diff = float((g1 - acc["grads"][name]).abs().max())
        assert diff <= 1e-5, f"{name}: max |Δgrad| = {diff:.3g}"


def test_two_workers_match_one_worker(steps):
    one, two = steps[1], steps[2]
    assert one["world"] == 1 and two["world"] == 2

    loss1, loss2 = one["metrics"]["loss"], two["metrics"]["loss"]
    assert abs(loss1 - math.log(2)) > 1e-3, "policy == reference: the test would be trivial"
    assert abs(loss1 - one["local_loss"]) < 1e-6  # one worker: its share is the whole batch
    assert loss2 == pytest.approx(loss1, abs=1e-5)
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, abs=1e-5), key

    assert one["grads"].keys() == two["grads"].keys()
    max_diff, max_grad = 0.0, 0.0
    for name, g1 in one["grads"].items():
        g2 = two["grads"][name]
        assert g1 is not None and g2 is not None, f"{name} has no gradient"
        assert g1.shape == g2.shape, name
        diff = float((g1 - g2).abs().max())
        max_diff = max(max_diff, diff)
        max_grad = max(max_grad, float(g1.abs().max()))
        assert diff <= 1e-5, f"{name}: max |Δgrad| = {diff:.3g}"
    assert max_grad > 1e-4, "all gradients are (near) zero: the test would be trivial"
    print(f"\nloss {loss1:.6f} (ln 2 = {math.log(2):.6f}); W=1 vs W=2: |Δloss| = {abs(loss1 - loss2):.3g}, "
          f"max |Δgrad| = {max_diff:.3g} (max |grad| {max_grad:.3g})")  # fmt: skip


def test_one_worker_matches_plain_float64(steps, tiny_llama):
    one = steps[1]
    ref = _plain_float64(tiny_llama)
    assert one["metrics"]["loss"] == pytest.approx(ref["loss"], abs=1e-4)
    assert one["metrics"]["logps/chosen"] == pytest.approx(ref["logps/chosen"], abs=1e-4)
    assert one["metrics"]["logps/rejected"] == pytest.approx(ref["logps/rejected"], abs=1e-4)
    assert ref["grads"].keys() == one["grads"].keys()
    for name, g64 in ref["grads"].items():
        torch.testing.assert_close(one["grads"][name].double(), g64, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("workers", [1, 2])
def test_parameters_after_reference_pass_receive_gradients(steps, workers):
    """`train_loop` builds its optimizer from `model.parameters()` after the reference pass: those
    must be the parameters the step's gradients land on, or the optimizer never updates them."""
    assert steps[workers]["without_grad"] == []


def test_term_grad_norms_match_autograd_through_each_side(steps, accumulated, tiny_llama):
    """`term_grad_norms` (closed-form ∂L/∂logp held fixed, one surrogate backward per side) against
    float64 autograd of the loss through logp(y+) alone and logp(y−) alone; the same on 2 workers
    and with accumulation, since the norms are global."""
    want = _plain_float64(tiny_llama)["term_norms"]
    assert want["grad_norm/chosen"] > 1e-4 and want["grad_norm/rejected"] > 1e-4
    assert abs(want["grad_norm/chosen"] - want["grad_norm/rejected"]) > 1e-3 * want["grad_norm/chosen"]
    for run in (steps[1], steps[2], accumulated[1], accumulated[2]):
        for name, value in want.items():
            assert run["term_norms"][name] == pytest.approx(value, rel=1e-3), (run["world"], name)


# ── OGD and RoPO (see the module docstring) ─────────────────────────────────────────────────
@pytest.fixture(scope="module")
def runs(steps, accumulated) -> dict[int, dict]:
    """1 worker, one micro-batch of 4; 2 workers, micro-batches of 1."""
    return {1: steps[1]["ogd_ropo"], 2: accumulated[2]["ogd_ropo"]}


def _float64_ogd(tiny_llama: Path) -> dict[str, torch.Tensor]:
    """g_w, g_l by autograd in float64, one sequence at a time, and g_w − (g_w·u)u with u = g_l/‖g_l‖."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train.batch import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    pairs = [tokenize_pair(tokenizer, row, MAX_LENGTH) for row in PAIRS]
    names, params = zip(*model.named_parameters())

    def logp(prompt, response):
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0], dim=-1)
        return sum(logprobs[len(prompt) + k - 1, tok] for k, tok in enumerate(response))

    def flat_grad(side: str) -> torch.Tensor:
        nll = -torch.stack([logp(p.prompt, getattr(p, side)) for p in pairs]).mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll, params)])

    g_w, g_l = flat_grad("chosen"), flat_grad("rejected")
    u = g_l / g_l.norm()
    g = g_w - (g_w @ u) * u if g_w @ g_l > 0 else g_w
    out, offset = {}, 0
    for name, p in zip(names, params):
        out[name] = g[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return {"grads": out, "dot": float(g_w @ g_l), "norm_w": float(g_w.norm()), "norm_l": float(g_l.norm())}


def test_ogd_gradient_is_the_same_on_one_and_two_workers(runs):
    one, two = runs[1], runs[2]
    assert (one["world"], two["world"]) == (1, 2)
    for kind in ("ogd_full", "ogd_ropo"):
        a, b = one[kind], two[kind]
        assert a["stats"]["ogd/projected"] == 1.0, f"{kind}: the projection must fire for the test to mean something"
        for key, value in a["stats"].items():
            assert b["stats"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (kind, key)
        assert a["grads"].keys() == b["grads"].keys()
        for name, g in a["grads"].items():
            assert float((g - b["grads"][name]).abs().max()) <= 1e-6, (kind, name)


def test_ogd_gradient_equals_a_float64_single_process_computation(runs, tiny_llama):
    want = _float64_ogd(tiny_llama)
    got = runs[1]["ogd_full"]
    assert got["stats"]["ogd/dot"] == pytest.approx(want["dot"], rel=1e-4)
    assert got["stats"]["ogd/grad_norm_chosen"] == pytest.approx(want["norm_w"], rel=1e-4)
    assert got["stats"]["ogd/grad_norm_rejected"] == pytest.approx(want["norm_l"], rel=1e-4)
    assert got["grads"].keys() == want["grads"].keys()
    for name, g64 in want["grads"].items():
        torch.testing.assert_close(got["grads"][name].double(), g64, atol=1e-5, rtol=1e-3, msg=name)


def test_ogd_under_ropo_projects_over_the_rotations_only(runs):
    grads = runs[1]["ogd_ropo"]["grads"]
    assert grads and all(name.endswith(("angles", "magnitude")) for name in grads)
    assert all(g is not None and float(g.abs().max()) > 0 for g in grads.values())


def test_ropo_steps_match_on_one_and_two_workers_and_export_a_plain_model(runs, tiny_llama):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages.evaluate.geometry import neuron_cosines

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    one, two = (load_file(runs[w]["checkpoint"] / "model.safetensors") for w in (1, 2))
    # 2 layers × (q, v) × (angles: 2 stages × 2 sweeps × 128/2 pairs, magnitudes: 128 outputs)
    assert runs[1]["optimised"] == runs[2]["optimised"] == 2 * 2 * (256 + 128)
    assert one.keys() == two.keys() and not any(k.endswith(("angles", "magnitude")) for k in one)
    AutoModelForCausalLM.from_pretrained(runs[2]["checkpoint"])  # a plain HF folder
    moved = 0
    for key, w in one.items():
        assert float((w - two[key]).abs().max()) <= 1e-7, key  # (seen: 4e-9, where the steps moved them 1e-5 to 2e-3)
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            moved += float((w - base[key]).abs().max()) > 5e-6
            assert float((neuron_cosines(w) - neuron_cosines(base[key])).abs().max()) <= 1e-5, key
        elif key in base:
            assert torch.equal(w, base[key]), f"{key} is frozen under RoPO"
    assert moved == 4, "every adapted layer must have moved"
