"""The 3D-properties toy model (seed 003 §3.2, Figures 2–3; ../shared/research/METHODS.md "Toy model").

Why: DPO's gradient on logπ(y−) keeps growing in probability space as π(y−) → 0 (see
`stages/train/objectives.py`), so the paper predicts the "3D-properties": the rejected
probability drops drastically, the chosen one rises and then falls (degradation into unlearning),
and the freed mass disperses onto responses no pair mentions. A model small enough to train in
seconds shows whether that happens, and how it depends on where the pairs sit under the policy.

Setup (the paper's, §3.2.1): 4 prompts, one-hot → 3-layer MLP → softmax over 10 responses.
Responses 0–3 are the chosen ones (response i optimal for prompt i), 4–7 the rejected, 8–9
"unseen" (in no pair). Step 1 ("SFT") fits the MLP to a hand-set distribution; step 2 trains on
pairs (optimal chosen, random rejected) from the SFT model, which is also the reference. The four
scenarios differ only in the hand-set distribution (high initial probability = on-policy):
1 chosen high, rejected high; 2 chosen low, rejected high; 3 chosen high, rejected low; 4 both low.

Methods, all through the training code's own objectives on per-response log-probs (log-softmax
of the logits; a response is one "token", so |y±| = 1), full batch over all 16 (prompt, chosen,
rejected) pairs — the expectation of a uniformly random rejected response:
- `dpo`; `flex_dpo` (β+ = β, β− lowered; with β+ ≠ β−, β+·log π(y+) − β−·log π(y−) keeps
  (β+ − β−)·log π(y+), an SFT-like pull on every logit, where DPO's is a difference of two logits);
  `dpo_sft` (DPO + λ·NLL of y+);
- `rm`: a Bradley–Terry reward model (`bradley_terry`) on the same pairs: one-hot prompt ⊕ one-hot
  response → the same 3-layer MLP → a scalar r(x, y), trunk initialised from seed + 1, head at
  zero. An RM is no distribution, so its columns report the policy it implies at the same β,
  π_rm ∝ π_ref·exp(r/β): the optimum of the KL-regularised objective that PPO climbs, and the
  form DPO's policy takes for DPO's implicit reward. With r ≡ 0 at the start, π_rm starts at the
  SFT model, as DPO's policy does.

Bookkeeping, per prompt x_i then averaged over the 4 prompts: `chosen` = π(i|x_i); `rejected` =
mass on responses 4–7 (every one of them is a rejected response of every prompt); `unseen` = mass
on 8–9; `outside` = 1 − chosen − rejected (the other prompts' chosen responses plus the unseen).

The seed does not give learning rate, β, width, steps or the hand-set probabilities. Ours are the
plain choices in `ToyConfig`, each with its reason, fixed before the first run and not tuned to
make a claim hold (one change after it, to the measurement, not the training: `eval_every`).
Claims that do not reproduce are findings (README "The toy model").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.train.objectives import PairLogps, bradley_terry, dpo, dpo_sft, flex_dpo

N_PROMPTS, N_RESPONSES = 4, 10
CHOSEN, REJECTED, UNSEEN = range(0, 4), range(4, 8), range(8, 10)
METHODS = ("dpo", "flex_dpo", "dpo_sft", "rm")
SCENARIOS = {1: ("high", "high"), 2: ("low", "high"), 3: ("high", "low"), 4: ("low", "low")}  # (chosen, rejected)
COLUMNS = ["scenario", "method", "step", "chosen", "rejected", "unseen", "outside"]


def _choice(default: float, why: str):
    return field(default=default, metadata={"why": why})


@dataclass(frozen=True)
class ToyConfig:
    """Every number the seed leaves open, with its reason (`choices()` lists them for toy.md)."""

    hidden: int = _choice(64, "a plain width; 4 one-hot inputs need far less, so SFT can fit any target")
    p_high: float = _choice(0.15, "on-policy: each of a prompt's 5 training responses (1 chosen, 4 rejected) at 0.15")
    p_low: float = _choice(0.02, "off-policy: an order of magnitude lower; the other 5 responses share the rest evenly")
    sft_steps: int = _choice(1000, "SFT: full-batch Adam until the fit is exact (a means to the scenarios, not a claim)")
    sft_lr: float = _choice(1e-2, "SFT's Adam learning rate: a plain value that fits in 1000 steps")
    steps: int = _choice(1000, "preference training: full-batch Adam steps, long enough for π(y−) to approach 0")
    lr: float = _choice(1e-3, "Adam's default learning rate, for every method")
    beta: float = _choice(0.1, "the paper's (and TRL's) default β; Flex-DPO's β+")
    beta_rejected: float = _choice(0.05, "Flex-DPO's β− = β/2: a plain halving, between the paper's best 0.08 and 0.01")
    sft_weight: float = _choice(1.0, "DPO+SFT's λ: the objective's default, the two terms at equal weight")
    eval_every: int = _choice(1, "every step: on a 10-step grid (the first run) DPO and Flex-DPO tied in S3")
    rel_tol: float = _choice(0.05, "'rises', 'falls', 'grows': a change of more than 5% of its reference value")


def choices(cfg: ToyConfig) -> list[tuple[str, float, str]]:
    """(name, value, why) of every field of `cfg`."""
    return [(f.name, getattr(cfg, f.name), f.metadata["why"]) for f in fields(cfg)]


class MLP(nn.Sequential):
    """3 linear layers: [*, d_in] → [*, d_out]."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def make_model(d_in: int, d_out: int, cfg: ToyConfig, seed: int, zero_head: bool = False) -> MLP:
    """An MLP initialised from `seed` alone; the global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MLP(d_in, cfg.hidden, d_out).double()
    if zero_head:
        nn.init.zeros_(model[-1].weight)
        nn.init.zeros_(model[-1].bias)
    return model


def target_distribution(scenario: int, cfg: ToyConfig) -> Tensor:
    """The hand-set SFT distribution [4, 10]: row i gives chosen i and the 4 rejected responses
    `p_high` or `p_low` each (by scenario), and the other 5 responses the rest in equal parts."""
    chosen_level, rejected_level = SCENARIOS[scenario]
    p_c = cfg.p_high if chosen_level == "high" else cfg.p_low
    p_r = cfg.p_high if rejected_level == "high" else cfg.p_low
    rest = (1 - p_c - len(REJECTED) * p_r) / (N_RESPONSES - 1 - len(REJECTED))
    target = torch.full((N_PROMPTS, N_RESPONSES), rest, dtype=torch.float64)
    target[:, list(REJECTED)] = p_r
    target[range(N_PROMPTS), range(N_PROMPTS)] = p_c
    return target


def prompts() -> Tensor:
    return torch.eye(N_PROMPTS, dtype=torch.float64)  # [4, 4], one row per prompt


def pairs() -> tuple[Tensor, Tensor, Tensor]:
    """(prompt, chosen, rejected) indices [16]: the rejected one is uniform over 4–7, and we take
    every (prompt, rejected) pair each step — the full-batch expectation of a random draw."""
    prompt = torch.arange(N_PROMPTS).repeat_interleave(len(REJECTED))
    rejected = torch.tensor(list(REJECTED)).repeat(N_PROMPTS)
    return prompt, prompt.clone(), rejected


def sft_fit(scenario: int, cfg: ToyConfig, seed: int) -> MLP:
    """Step 1: fit the MLP's softmax to `target_distribution` (cross-entropy with soft labels)."""
    model, target, x = make_model(N_PROMPTS, N_RESPONSES, cfg, seed), target_distribution(scenario, cfg), prompts()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.sft_lr)
    for _ in range(cfg.sft_steps):
        loss = -(target * F.log_softmax(model(x), dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def policy_loss(method: str, logits: Tensor, ref_logps: Tensor, cfg: ToyConfig) -> Tensor:
    """The mean loss over all pairs of a policy method, from logits [4, 10] and π_ref's log-probs [4, 10]."""
    prompt, chosen, rejected = pairs()
    logps, ones = F.log_softmax(logits, dim=-1), torch.ones(len(prompt), dtype=torch.float64)
    lp = PairLogps(chosen=logps[prompt, chosen], rejected=logps[prompt, rejected], chosen_tokens=ones, rejected_tokens=ones,
                   ref_chosen=ref_logps[prompt, chosen], ref_rejected=ref_logps[prompt, rejected])  # fmt: skip
    if method == "dpo":
        return dpo(lp, beta=cfg.beta).losses.mean()
    if method == "flex_dpo":
        return flex_dpo(lp, beta_chosen=cfg.beta, beta_rejected=cfg.beta_rejected).losses.mean()
    if method == "dpo_sft":
        return dpo_sft(lp, beta=cfg.beta, sft_weight=cfg.sft_weight).losses.mean()
    raise ValueError(f"no toy policy method {method!r}; choose one of dpo, flex_dpo, dpo_sft")


def rm_inputs() -> Tensor:
    """Every (prompt, response) as one-hot prompt ⊕ one-hot response: [4, 10, 14]."""
    x = torch.eye(N_PROMPTS, dtype=torch.float64)[:, None, :].expand(N_PROMPTS, N_RESPONSES, N_PROMPTS)
    y = torch.eye(N_RESPONSES, dtype=torch.float64)[None].expand(N_PROMPTS, N_RESPONSES, N_RESPONSES)
    return torch.cat([x, y], dim=-1)


def rm_loss(rewards: Tensor) -> Tensor:
    """Bradley–Terry over all pairs, from rewards r(x_i, y) [4, 10]."""
    prompt, chosen, rejected = pairs()
    ones = torch.ones(len(prompt), dtype=torch.float64)
    lp = PairLogps(chosen=rewards[prompt, chosen], rejected=rewards[prompt, rejected],
                   chosen_tokens=ones, rejected_tokens=ones)  # lengths unused by Bradley–Terry
    return bradley_terry(lp).losses.mean()


def mass(probs: Tensor) -> dict[str, float]:
    """chosen / rejected / unseen / outside mass of probs [4, 10], averaged over prompts."""
    chosen = probs[range(N_PROMPTS), range(N_PROMPTS)]
    rejected = probs[:, list(REJECTED)].sum(-1)
    unseen = probs[:, list(UNSEEN)].sum(-1)
    outside = probs.sum(-1) - chosen - rejected
    masses = {"chosen": chosen, "rejected": rejected, "unseen": unseen, "outside": outside}  # [4] each
    return {k: float(v.mean()) for k, v in masses.items()}


def train(method: str, scenario: int, sft: MLP, cfg: ToyConfig, seed: int) -> list[dict]:
    """Step 2: one method from the SFT model; a curve point every `eval_every` steps."""
    x = prompts()
    with torch.no_grad():
        ref_logps = F.log_softmax(sft(x), dim=-1)
    if method == "rm":
        model, inputs = make_model(N_PROMPTS + N_RESPONSES, 1, cfg, seed + 1, zero_head=True), rm_inputs()

        def loss() -> Tensor:
            return rm_loss(model(inputs).squeeze(-1))

        def probs() -> Tensor:  # π_rm ∝ π_ref·exp(r/β)
            return F.softmax(ref_logps + model(inputs).squeeze(-1) / cfg.beta, dim=-1)
    else:
        model = copy.deepcopy(sft)

        def loss() -> Tensor:
            return policy_loss(method, model(x), ref_logps, cfg)

        def probs() -> Tensor:
            return F.softmax(model(x), dim=-1)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rows = []
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                rows.append({"scenario": scenario, "method": method, "step": step, **mass(probs())})
        if step < cfg.steps:
            opt.zero_grad()
            loss().backward()
            opt.step()
    return rows


def run_toy(cfg: ToyConfig = ToyConfig(), seed: int = 0) -> pd.DataFrame:
    """Every scenario × method: the curves, columns `COLUMNS`. The same seed gives the same curves.

    On one thread: at these sizes threads only add start-up and contention (two threads took 10×
    longer than one on a busy 2-core machine), and one thread makes the sums' order fixed."""
    threads, rows = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        for scenario in SCENARIOS:
            sft = sft_fit(scenario, cfg, seed)
            for method in METHODS:
                rows += train(method, scenario, sft, cfg, seed)
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows, columns=COLUMNS)


# ── the claims ───────────────────────────────────────────────────────────────────────────────
def _curves_by_scenario(curves: pd.DataFrame, method: str, column: str) -> dict[int, pd.Series]:
    """{scenario: the column's curve, indexed by step} for one method."""
    df = curves[curves.method == method].sort_values("step")
    return {int(s): g.set_index("step")[column] for s, g in df.groupby("scenario")}


def _sig(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")  # 4 significant digits: keeps 3e-9 from printing as 0


def _show(values: dict[int, float | None]) -> dict[int, float | None]:
    return {s: _sig(v) for s, v in values.items()}


def _halving_step(curve: pd.Series) -> float:
    """The first step at which the curve is below half its start; inf if it never is."""
    below = curve[curve < 0.5 * curve.iloc[0]]
    return float(below.index[0]) if len(below) else float("inf")


def claims(curves: pd.DataFrame, rel_tol: float = ToyConfig.rel_tol) -> dict[str, dict]:
    """The paper's toy-model claims from the curves: {name: {"claim": the test as text, "holds":
    bool, numbers...}}; per-scenario numbers are {scenario: value}. Decided on exact values."""
    dpo_ = {col: _curves_by_scenario(curves, "dpo", col) for col in ("chosen", "rejected", "unseen", "outside")}
    start = {col: {s: float(c.iloc[0]) for s, c in by.items()} for col, by in dpo_.items()}
    final = {col: {s: float(c.iloc[-1]) for s, c in by.items()} for col, by in dpo_.items()}
    out: dict[str, dict] = {}

    c1 = dpo_["chosen"][1]
    c_start, c_peak, c_final = float(c1.iloc[0]), float(c1.max()), float(c1.iloc[-1])
    out["s1_chosen_rises_then_falls"] = {
        "claim": f"scenario 1, DPO: peak chosen > start·(1+{rel_tol}), final < peak·(1−{rel_tol})",
        "holds": c_peak > c_start * (1 + rel_tol) and c_final < c_peak * (1 - rel_tol),
        "start": _sig(c_start), "peak": _sig(c_peak), "peak_step": int(c1.idxmax()), "final": _sig(c_final)}  # fmt: skip

    r0, r1 = start["rejected"], final["rejected"]
    out["rejected_below_1pct"] = {
        "claim": "DPO: final rejected < 1% of its start, every scenario",
        "holds": all(r1[s] < 0.01 * r0[s] for s in r0), "start": _show(r0), "final": _show(r1)}  # fmt: skip

    u0, u1 = start["unseen"], final["unseen"]
    u_peak = {s: float(c.max()) for s, c in dpo_["unseen"].items()}
    out["unseen_grows"] = {
        "claim": f"DPO: final unseen (responses 9–10) > start·(1+{rel_tol}), some scenario",
        "holds": any(u1[s] > u0[s] * (1 + rel_tol) for s in u0), "unseen_start": _show(u0),
        "unseen_peak": _show(u_peak), "unseen_final": _show(u1),
        "outside_start": _show(start["outside"]), "outside_final": _show(final["outside"])}  # fmt: skip

    peaks = {s: float(c.max()) for s, c in dpo_["chosen"].items()}
    out["s1_highest_peak"] = {
        "claim": "DPO: scenario 1's peak chosen > every other scenario's",
        "holds": all(peaks[1] > v for s, v in peaks.items() if s != 1), "peak_chosen": _show(peaks)}  # fmt: skip

    out["s1_least_unseen"] = {
        "claim": "DPO: scenario 1's final unseen < every other scenario's",
        "holds": all(u1[1] < v for s, v in u1.items() if s != 1), "unseen_final": _show(u1)}  # fmt: skip

    h_dpo = {s: _halving_step(c) for s, c in dpo_["rejected"].items()}
    h_flex = {s: _halving_step(c) for s, c in _curves_by_scenario(curves, "flex_dpo", "rejected").items()}
    out["flex_slows_rejected"] = {
        "claim": "rejected takes more steps to halve under Flex-DPO (β− < β+) than DPO, every scenario",
        "holds": all(h_flex[s] > h_dpo[s] for s in h_dpo),
        "halving_step_dpo": _show({s: None if h == float("inf") else h for s, h in h_dpo.items()}),
        "halving_step_flex_dpo": _show({s: None if h == float("inf") else h for s, h in h_flex.items()})}  # fmt: skip

    sft = _curves_by_scenario(curves, "dpo_sft", "chosen")
    s0, smin = {s: float(c.iloc[0]) for s, c in sft.items()}, {s: float(c.min()) for s, c in sft.items()}
    out["sft_keeps_chosen"] = {
        "claim": f"DPO+SFT: chosen never below start·(1−{rel_tol}), every scenario",
        "holds": all(smin[s] >= s0[s] * (1 - rel_tol) for s in s0), "start": _show(s0), "min": _show(smin),
        "final": _show({s: float(c.iloc[-1]) for s, c in sft.items()}), "final_dpo": _show(final["chosen"])}  # fmt: skip
    return out
