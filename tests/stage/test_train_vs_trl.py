"""Our first training step against TRL 1.16's own trainers, in fp32 on the tiny Llama.

TRL 1.x has no standalone loss function: its losses live inside the trainers. So each case runs
one real step of `trl.DPOTrainer` (`loss_type` "sigmoid", "ipo", "hinge", ["sigmoid", "sft"]) or
of `trl.experimental.cpo.CPOTrainer` (`loss_type="simpo"`, `cpo_alpha=0`) on the same pairs, in
the same order, as one batch, and records what the trainer computed: the loss `compute_loss`
returns, its logged `logps/*` batch means, and per pair the sequence log-probs (a forward hook on
the policy for DPO, `concatenated_forward`'s output for CPO). Our side is the building blocks of
`stages/train/loop.py` as `train_loop` uses them: `load_policy` (FSDP2 on a single-process gloo
group), `reference_logps` (before `model.train()`), `collate`, `step_loss` with
`objective_for(<method config>)`. Loss and log-probs must agree to 1e-5.

Before any update the policy is the reference, so each loss also runs against a *perturbed*
reference (every weight + 0.02·N(0,1), saved as its own checkpoint, used by both sides for the
reference pass: TRL's `precompute_ref_log_probs` with `ref_model=`, ours `reference_logps` of
the loaded reference), where h ≠ 0 and a wrong formula would show. With reference = policy the
exact values are checked as well: DPO ln 2, IPO 1/(4β²) (h̄ = 0), hinge 1.

Deliberate differences, pinned here:
- Tokens. Ours scores a response as the ids the policy emits, which end at EOS (`<|im_end|>`);
  a text response is tokenized and gets that EOS (`stages/train/batch.py`). TRL's DPOTrainer
  tokenizes the rendered conversation, so its completion also holds the "\\n" the chat template
  writes after `<|im_end|>`, a token no sampled response contains; CPOTrainer's
  `add_eos_token_if_needed` then appends one more EOS, since that text no longer ends in EOS.
  `test_tokenization_differs_only_by_the_template_tail` pins both. To compare the losses on equal
  inputs, our side is handed TRL's completion ids as the pairs' sampled ids (`*_token_ids`, the
  path the pipeline's own vLLM pairs take), and the collated batches are checked id for id; on
  the text path, our log-probs equal TRL's minus the "\\n" token's (`test_logps_on_shared_tokens`).
- DPO+SFT. TRL's "sft" term is the token mean of −logπ(y+) over the whole batch,
  Σ_i Σ_t NLL / Σ_i |y+_i|; ours is the per-pair mean per-token NLL, averaged over pairs,
  mean_i(−c_i/|y+_i|): a pair's SFT weight then does not depend on its length or on which batch
  it lands in, and per-pair losses average exactly over a batch split across workers (the loop
  needs per-pair losses, `stages/train/objectives.py`). With chosen lengths that differ the two
  differ; each side is checked against its own formula on the measured log-probs, and the DPO
  parts against each other.
- SimPO. CPOTrainer's `logps/*` are per-token means (`average_log_prob=True` for "simpo"), ours
  are sums with the per-token means logged as `logps/*_per_token`: those are compared.
"""

from __future__ import annotations

import math
import socket
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BETA = 0.1  # DPO, IPO (τ), hinge, DPO+SFT
SFT_WEIGHT = 0.5  # λ of DPO+SFT (TRL: loss_weights=[1, λ])
SIMPO_BETA, SIMPO_GAMMA = 2.0, 0.5
MAX_LENGTH = 512  # nothing is truncated on either side
TOL = 1e-5

# Five pairs, all chosen lengths different (the DPO+SFT token mean then differs from ours) and
# rejected lengths different, so every row of the batch is padded.
ROWS = [
    {
        "prompt": [{"role": "user", "content": "Tom has 3 bags of 4 apples. How many apples?"}],
        "chosen": [{"role": "assistant", "content": "3 × 4 = 12 apples. The answer is 12."}],
        "rejected": [{"role": "assistant", "content": "The answer is 7."}],
    },
    {
        "prompt": [{"role": "user", "content": "16 ÷ 2 = ?"}],
        "chosen": [{"role": "assistant", "content": "The answer is 8."}],
        "rejected": [{"role": "assistant", "content": "Solve it step by step: 16 - 2 = 14. The answer is 14."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Finish with a last line of the form 'The answer is N.'"},
            {"role": "user", "content": "How many dollars does Lena make by selling 8 boxes at 2 dollars each?"},
        ],
        "chosen": [{"role": "assistant", "content": "8 boxes × 2 = 16 dollars.\nThe answer is 16."}],
        "rejected": [{"role": "assistant", "content": "9"}],
    },
    {
        "prompt": [{"role": "user", "content": "0 1 2 3 4 5 6 7 8 9"}],
        "chosen": [{"role": "assistant", "content": "10"}],
        "rejected": [{"role": "assistant", "content": "the answer is of and to in 5 + 5 = 11 !"}],
    },
    {
        "prompt": [{"role": "user", "content": "How many apples? 5 + 7"}],
        "chosen": [{"role": "assistant", "content": "5 + 7 = 12. The answer is 12."}],
        "rejected": [{"role": "assistant", "content": "5 + 7 = 13, 13 - 1 = 12, so 13."}],
    },
]
N = len(ROWS)

# case → (DPOTrainer's loss_type, our `train.method` config)
DPO_CASES = {
    "dpo": (["sigmoid"], {"type": "dpo", "beta": BETA}),
    "ipo": (["ipo"], {"type": "ipo", "beta": BETA}),
    "hinge": (["hinge"], {"type": "slic", "form": "hinge", "beta": BETA}),
    "dpo_sft": (["sigmoid", "sft"], {"type": "dpo_sft", "beta": BETA, "sft_weight": SFT_WEIGHT}),
}
# The loss at h = 0 (reference = policy, no update yet).
AT_POLICY = {"dpo": math.log(2), "ipo": 1 / (4 * BETA**2), "hinge": 1.0}


# ── models ───────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with every weight perturbed (deterministically, by name): a reference that
    differs from the policy, so h ≠ 0 at step 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    path = tmp_path_factory.mktemp("models") / "tiny-llama-perturbed"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


# ── TRL's side ───────────────────────────────────────────────────────────────────────────────
def _common_args(out_dir: str) -> dict:
    """One fp32 step on CPU over the whole dataset as one batch, in dataset order, nothing logged."""
    return dict(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, learning_rate=1e-6, weight_decay=0.0,
        lr_scheduler_type="constant", optim="adamw_torch", per_device_train_batch_size=N,
        gradient_accumulation_steps=1, max_steps=1, max_length=MAX_LENGTH, gradient_checkpointing=False,
        train_sampling_strategy="sequential", report_to="none", logging_strategy="no", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip


def _run_trl_dpo(policy: Path, ref: Path | None, loss_type: list[str], out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    record: dict = {}

    class RecordingDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen = {}

            def hook(module, args, kwargs, output):  # the policy's per-token log-probs, 0 off the completion
                seen["per_token"] = output.log_probs.detach().clone()

            handle = model.register_forward_hook(hook, with_kwargs=True)
            try:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                handle.remove()
            if "loss" not in record:  # the first step
                logps = seen["per_token"].sum(dim=1)  # as `_compute_loss`: sum over the sequence
                record.update(
                    loss=float(loss.detach()), inputs={k: v.detach().clone() for k, v in inputs.items()},
                    per_token=seen["per_token"], chosen=logps[:N], rejected=logps[N:],
                    metrics={k: v[-1] for k, v in self._metrics["train"].items()},
                )  # fmt: skip
            return loss

    config = DPOConfig(
        **_common_args(out_dir), beta=BETA, loss_type=loss_type,
        loss_weights=[1.0, SFT_WEIGHT] if loss_type == ["sigmoid", "sft"] else None,
        precompute_ref_log_probs=True, precompute_ref_batch_size=N, dataloader_drop_last=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    ref_model = None if ref is None else AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    trainer = RecordingDPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=Dataset.from_list(ROWS),
                                  processing_class=AutoTokenizer.from_pretrained(policy))  # fmt: skip
    data = trainer.train_dataset
    record["tokens"] = {k: list(data[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    record["ref_chosen"] = torch.tensor(data["ref_chosen_logps"], dtype=torch.float32)
    record["ref_rejected"] = torch.tensor(data["ref_rejected_logps"], dtype=torch.float32)
    record["train_loss"] = trainer.train().training_loss  # the logged `train_loss` of the one step
    return record


def _run_trl_simpo(policy: Path, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    record: dict = {}

    class RecordingCPOTrainer(CPOTrainer):
        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            if "chosen" not in record:
                record["batch"] = self.concatenated_inputs(batch, padding_value=self.pad_token_id)
                record["chosen"], record["rejected"] = out[0].detach().clone(), out[1].detach().clone()  # per-token means
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if "loss" not in record:
                record["loss"] = float(loss.detach())
                record["metrics"] = {k: v[-1] for k, v in self._stored_metrics["train"].items()}
            return loss

    config = CPOConfig(**_common_args(out_dir), loss_type="simpo", cpo_alpha=0.0, beta=SIMPO_BETA,
                       simpo_gamma=SIMPO_GAMMA, remove_unused_columns=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    trainer = RecordingCPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(ROWS),
                                  processing_class=AutoTokenizer.from_pretrained(policy))  # fmt: skip
    data = trainer.train_dataset
    record["tokens"] = {
        "prompt_ids": list(data["prompt_input_ids"]),
        # the completion: the sequence after the prompt (labels are -100 exactly on the prompt)
        "chosen_ids": [ids[len(p):] for ids, p in zip(data["chosen_input_ids"], data["prompt_input_ids"])],
        "rejected_ids": [ids[len(p):] for ids, p in zip(data["rejected_input_ids"], data["prompt_input_ids"])],
    }
    record["train_loss"] = trainer.train().training_loss
    return record


@pytest.fixture(scope="module")
def trl(tiny_llama, reference, tmp_path_factory):
    """TRL's first step for (case, reference) — reference "policy" or "perturbed" — or ("simpo",
    None); each run once, on demand."""
    runs: dict = {}

    def get(case: str, ref: str | None = None) -> dict:
        if (case, ref) not in runs:
            out_dir = str(tmp_path_factory.mktemp(f"trl-{case}-{ref}"))
            if case == "simpo":
                runs[case, ref] = _run_trl_simpo(tiny_llama, out_dir)
            else:
                ref_path = reference if ref == "perturbed" else None
                runs[case, ref] = _run_trl_dpo(tiny_llama, ref_path, DPO_CASES[case][0], out_dir)
        return runs[case, ref]

    return get


# ── our side ─────────────────────────────────────────────────────────────────────────────────
@contextmanager
def _process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _with_ids(tokens: dict) -> list[dict]:
    """The rows, carrying TRL's completion ids as the pairs' sampled ids."""
    return [{**row, "chosen_token_ids": c, "rejected_token_ids": r}
            for row, c, r in zip(ROWS, tokens["chosen_ids"], tokens["rejected_ids"])]  # fmt: skip


def _ours(policy: Path, reference: Path, rows: list[dict], cases: list[tuple[str, str | None, dict]]) -> dict:
    """Our first step for each (case, ref, method kwargs) on `rows`, as `train_loop` runs it."""
    from pydantic import TypeAdapter
    from transformers import AutoTokenizer

    from pipeline.config import MethodConfig
    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import load_policy, reference_logps, step_loss
    from stages.train.objectives import needs_reference, objective_for

    device = torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    pad_id = tokenizer.pad_token_id
    pairs = [tokenize_pair(tokenizer, row, MAX_LENGTH) for row in rows]
    batch = collate(pairs, pad_id)
    results = {"pairs": pairs, "batch": batch}
    with _process_group():
        model = load_policy(str(policy), "float32", device)
        refs = {None: (None, None)}
        if any(ref == "perturbed" for _, ref, _ in cases):
            ref_model = load_policy(str(reference), "float32", device)
            refs["perturbed"] = reference_logps(ref_model, pairs, pad_id, N, device)
            del ref_model
        if any(ref == "policy" for _, ref, _ in cases):
            refs["policy"] = reference_logps(model, pairs, pad_id, N, device)
        model.train()
        for case, ref, kwargs in cases:
            method = TypeAdapter(MethodConfig).validate_python(kwargs)
            assert needs_reference(method) == (ref is not None)
            ref_c, ref_r = refs[ref]
            loss, out = step_loss(model, batch, ref_c, ref_r, objective_for(method))
            results[case, ref] = {"loss": float(loss.detach()), "out": out, "ref_chosen": ref_c, "ref_rejected": ref_r,
                                  "chosen": out.metrics["logps/chosen"], "rejected": out.metrics["logps/rejected"]}  # fmt: skip
    return results


@pytest.fixture(scope="module")
def ours_dpo(tiny_llama, reference, trl) -> dict:
    """Ours on DPOTrainer's token ids: every DPO case, reference = policy and perturbed."""
    cases = [(case, ref, kwargs) for case, (_, kwargs) in DPO_CASES.items() for ref in ("policy", "perturbed")]
    return _ours(tiny_llama, reference, _with_ids(trl("dpo", "perturbed")["tokens"]), cases)


@pytest.fixture(scope="module")
def ours_simpo(tiny_llama, reference, trl) -> dict:
    """Ours on CPOTrainer's token ids."""
    kwargs = {"type": "simpo", "beta": SIMPO_BETA, "gamma": SIMPO_GAMMA}
    return _ours(tiny_llama, reference, _with_ids(trl("simpo")["tokens"]), [("simpo", None, kwargs)])


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


# ── the tests ────────────────────────────────────────────────────────────────────────────────
def test_tokenization_differs_only_by_the_template_tail(tokenizer, trl):
    """Same prompt ids; TRL's completions are ours plus the chat template's tail (see the module
    docstring): DPOTrainer "\\n" after `<|im_end|>`, CPOTrainer "\\n" and one more EOS."""
    from stages.train.batch import tokenize_pair

    ours = [tokenize_pair(tokenizer, row, MAX_LENGTH) for row in ROWS]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert len(newline) == 1 and all(p.chosen[-1] == eos and p.rejected[-1] == eos for p in ours)
    dpo_tokens, cpo_tokens = trl("dpo", "perturbed")["tokens"], trl("simpo")["tokens"]
    for i, pair in enumerate(ours):
        assert dpo_tokens["prompt_ids"][i] == pair.prompt == cpo_tokens["prompt_ids"][i]
        for side in ("chosen", "rejected"):
            mine = getattr(pair, side)
            assert dpo_tokens[f"{side}_ids"][i] == mine + newline, (i, side)
            assert cpo_tokens[f"{side}_ids"][i] == mine + newline + [eos], (i, side)
    # the rows do differ in length, and after TRL's tail still do
    assert len({len(p.chosen) for p in ours}) == N and len({len(p.rejected) for p in ours}) == N


@pytest.mark.parametrize("ref", ["policy", "perturbed"])
def test_same_batch_and_reference_logps(trl, ours_dpo, ref):
    """Given TRL's ids, our collated batch is TRL's batch, and our reference pass gives TRL's
    precomputed reference log-probs."""
    run = trl("dpo", ref)
    inputs, batch = run["inputs"], ours_dpo["batch"]
    assert torch.equal(inputs["input_ids"], batch.input_ids)
    assert torch.equal(inputs["attention_mask"], batch.attention_mask)
    assert torch.equal(inputs["completion_mask"], batch.loss_mask)
    mine = ours_dpo["dpo", ref]
    assert _max_diff(run["ref_chosen"], mine["ref_chosen"]) < TOL
    assert _max_diff(run["ref_rejected"], mine["ref_rejected"]) < TOL
    if ref == "perturbed":  # the reference does differ from the policy: h ≠ 0
        assert _max_diff(mine["ref_chosen"], mine["chosen"]) > 1e-2


@pytest.mark.parametrize("ref", ["policy", "perturbed"])
@pytest.mark.parametrize("case", list(DPO_CASES))
def test_first_step_matches_dpo_trainer(trl, ours_dpo, case, ref):
    """First-step loss, per-pair log-probs and TRL's logged `logps/*` means, to 1e-5 — except the
    DPO+SFT loss, which differs on purpose (`test_dpo_sft_difference_is_the_token_mean`)."""
    run, mine = trl(case, ref), ours_dpo[case, ref]
    assert _max_diff(run["chosen"], mine["chosen"]) < TOL
    assert _max_diff(run["rejected"], mine["rejected"]) < TOL
    assert abs(run["metrics"]["logps/chosen"] - float(mine["chosen"].mean())) < TOL
    assert abs(run["metrics"]["logps/rejected"] - float(mine["rejected"].mean())) < TOL
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(run["metrics"][name] - float(mine["out"].metrics[name].mean())) < TOL, name
    assert abs(run["train_loss"] - run["loss"]) < TOL  # returned = logged
    if case != "dpo_sft":
        assert abs(run["loss"] - mine["loss"]) < TOL
    if ref == "policy" and case in AT_POLICY:  # h = 0: the exact value
        assert abs(run["loss"] - AT_POLICY[case]) < TOL and abs(mine["loss"] - AT_POLICY[case]) < TOL


def test_losses_are_not_trivial(ours_dpo):
    """Against the perturbed reference every loss is away from its h = 0 value, so the matches
    above would catch a wrong formula."""
    for case, at_zero in AT_POLICY.items():
        assert abs(ours_dpo[case, "perturbed"]["loss"] - at_zero) > 1e-3, case
    out = ours_dpo["hinge", "perturbed"]["out"]
    assert (out.metrics["rewards/margins"] != 0).all()


@pytest.mark.parametrize("ref", ["policy", "perturbed"])
def test_dpo_sft_difference_is_the_token_mean(trl, ours_dpo, ref):
    """TRL: DPO + λ·Σ_i(−c_i)/Σ_i|y+_i| (batch token mean); ours: DPO + λ·mean_i(−c_i/|y+_i|).
    Each side equals its own formula on the measured log-probs, the DPO parts agree, and with
    these chosen lengths the two losses differ."""
    run, mine, dpo = trl("dpo_sft", ref), ours_dpo["dpo_sft", ref], ours_dpo["dpo", ref]
    lengths = run["inputs"]["completion_mask"][:N].sum(-1).double()
    assert len(set(lengths.tolist())) == N
    chosen = run["chosen"].double()
    trl_sft = float(-chosen.sum() / lengths.sum())
    our_sft = float((-chosen / lengths).mean())
    dpo_part = float(-F.logsigmoid(BETA * ((chosen - run["ref_chosen"].double())
                                           - (run["rejected"].double() - run["ref_rejected"].double()))).mean())  # fmt: skip
    assert abs(run["loss"] - (dpo_part + SFT_WEIGHT * trl_sft)) < TOL
    assert abs(mine["loss"] - (dpo_part + SFT_WEIGHT * our_sft)) < TOL
    assert abs((run["loss"] - SFT_WEIGHT * trl_sft) - (mine["loss"] - SFT_WEIGHT * our_sft)) < TOL
    assert abs(mine["loss"] - dpo["loss"] - SFT_WEIGHT * our_sft) < TOL  # our DPO part is our DPO loss
    assert abs(run["loss"] - mine["loss"]) > 100 * TOL


def test_logps_on_shared_tokens(tokenizer, trl, reference, tiny_llama):
    """On our own text tokenization (no template tail), our log-probs are TRL's minus the log-prob
    of the trailing "\\n" token: the only tokens the two sides score differently."""
    run = trl("dpo", "perturbed")
    per_token, mask = run["per_token"], run["inputs"]["completion_mask"][:, 1:]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # index of each row's last completion token
    without_tail = per_token.sum(1) - per_token[torch.arange(2 * N), last]
    mine = _ours(tiny_llama, reference, ROWS, [("dpo", "perturbed", DPO_CASES["dpo"][1])])["dpo", "perturbed"]
    assert _max_diff(without_tail[:N], mine["chosen"]) < TOL
    assert _max_diff(without_tail[N:], mine["rejected"]) < TOL


def test_first_step_matches_cpo_trainer_simpo(trl, ours_simpo):
    """SimPO: CPOTrainer(loss_type="simpo", cpo_alpha=0) on the same ids: same batch, loss, and
    per-token mean log-probs (CPO's `logps/*`) to 1e-5."""
    run, mine = trl("simpo"), ours_simpo["simpo", None]
    batch = ours_simpo["batch"]
    assert torch.equal(run["batch"]["concatenated_input_ids"], batch.input_ids)
    assert torch.equal(run["batch"]["concatenated_attention_mask"], batch.attention_mask)
    assert torch.equal((run["batch"]["concatenated_labels"] != -100).long(), batch.loss_mask)
    out = mine["out"]
    assert _max_diff(run["chosen"], out.metrics["logps/chosen_per_token"]) < TOL
    assert _max_diff(run["rejected"], out.metrics["logps/rejected_per_token"]) < TOL
    assert abs(run["metrics"]["logps/chosen"] - float(out.metrics["logps/chosen_per_token"].mean())) < TOL
    assert abs(run["metrics"]["logps/rejected"] - float(out.metrics["logps/rejected_per_token"].mean())) < TOL
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(run["metrics"][name] - float(out.metrics[name].mean())) < TOL, name
    assert abs(run["train_loss"] - run["loss"]) < TOL  # returned = logged
    assert abs(run["loss"] - mine["loss"]) < TOL
    # and the exact formula, so a shared mistake would not pass: −log σ(β·(c̄ − r̄) − γ)
    z = SIMPO_BETA * (run["chosen"].double() - run["rejected"].double()) - SIMPO_GAMMA
    assert abs(run["loss"] - float(-F.logsigmoid(z).mean())) < TOL


# ── the reward model against TRL's RewardTrainer ─────────────────────────────────────────────
@pytest.fixture(scope="module")
def reward_init(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama's backbone under a seeded one-output head, saved: both sides start from it."""
    from transformers import AutoTokenizer

    from stages.train.reward_model import load_reward_backbone

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    model = load_reward_backbone(str(tiny_llama), tokenizer)
    with torch.no_grad():  # a head that tells the pairs apart: std 0.02 gives rewards of ~1e-3
        model.score.weight.mul_(50)
    path = tmp_path_factory.mktemp("models") / "tiny-llama-rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run_trl_reward(model_path: Path, alpha: float | None, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    record: dict = {}

    class RecordingRewardTrainer(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if "loss" not in record:
                rewards = outputs.logits[:, 0].detach().clone()
                record.update(loss=float(loss.detach()), input_ids=inputs["input_ids"].clone(),
                              chosen=rewards[:N], rejected=rewards[N:],
                              metrics={k: v[-1] for k, v in self._metrics["train"].items()})  # fmt: skip
            return (loss, outputs) if return_outputs else loss

    config = RewardConfig(**_common_args(out_dir), center_rewards_coefficient=alpha, remove_unused_columns=False)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32)
    trainer = RecordingRewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(ROWS),
                                     processing_class=AutoTokenizer.from_pretrained(model_path))  # fmt: skip
    trainer.train()
    return record


@pytest.mark.parametrize("alpha", [None, 0.05])
def test_reward_model_step_matches_reward_trainer(reward_init, tmp_path, alpha):
    """One step of TRL 1.16's RewardTrainer and ours (`method: {type: reward_model}`, as
    `train_loop` runs it: `load_policy(reward_model_of=...)`, `tokenize_reward_pair`, `collate`,
    `step_loss`) on the same pairs from the same head: same token ids, same rewards, same loss."""
    from transformers import AutoTokenizer

    from pipeline.config import RewardModelMethod
    from stages.train.batch import collate, tokenize_reward_pair
    from stages.train.loop import load_policy, step_loss
    from stages.train.objectives import objective_for

    trl_step = _run_trl_reward(reward_init, alpha, str(tmp_path / "trl"))
    tokenizer = AutoTokenizer.from_pretrained(reward_init)
    with _process_group():
        model = load_policy(str(reward_init), "float32", torch.device("cpu"), reward_model_of=tokenizer)
        batch = collate([tokenize_reward_pair(tokenizer, row, MAX_LENGTH) for row in ROWS], model.config.pad_token_id)
        model.train()
        loss, out = step_loss(model, batch, None, None, objective_for(RewardModelMethod(center_rewards_coefficient=alpha)))
    width = trl_step["input_ids"].shape[1]
    assert batch.input_ids.shape[1] == width and torch.equal(batch.input_ids, trl_step["input_ids"])
    assert _max_diff(out.metrics["rewards/chosen"], trl_step["chosen"]) < TOL
    assert _max_diff(out.metrics["rewards/rejected"], trl_step["rejected"]) < TOL
    assert abs(float(loss.detach()) - trl_step["loss"]) < TOL
    assert float(out.metrics["accuracy"].mean()) == pytest.approx(trl_step["metrics"]["accuracy"], abs=1e-6)
    assert float(out.metrics["margin"].mean()) == pytest.approx(trl_step["metrics"]["margin"], abs=TOL)
    assert _max_diff(trl_step["chosen"], trl_step["rejected"]) > 1e-3  # the head tells pairs apart: not ln 2 by luck
