"""`python -m pipeline toy`: the 3D-properties toy model (seed 003 §3.2, Figs. 2–3), written out.

The math is `stages/evaluate/toy.py`; this edge writes `DIR/curves.csv` (one row per scenario,
method and step), `DIR/claims.json` (each of the paper's claims, whether it holds here, and the
numbers behind it), one PNG per figure and `DIR/toy.md` (the claims table and every choice).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.plots import _pyplot, _save
from stages.evaluate.toy import SCENARIOS, ToyConfig, choices, claims, run_toy

COLOURS = {"chosen": "tab:green", "rejected": "tab:red", "unseen": "tab:purple", "outside": "tab:grey",
           "dpo": "tab:blue", "flex_dpo": "tab:orange", "dpo_sft": "tab:green", "rm": "tab:brown"}  # fmt: skip
SCENARIO_NAMES = {1: "S1: chosen high, rejected high", 2: "S2: chosen low, rejected high",
                  3: "S3: chosen high, rejected low", 4: "S4: chosen low, rejected low"}  # fmt: skip


def write_toy(out: Path, seed: int = 0, cfg: ToyConfig = ToyConfig()) -> dict[str, dict]:
    """Run every scenario × method, write curves.csv, claims.json, the figures and toy.md; return the claims."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = run_toy(cfg, seed)
    found = claims(curves, cfg.rel_tol)
    curves.to_csv(out / "curves.csv", index=False)
    (out / "claims.json").write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")
    plot_scenarios(curves, out / "toy_dpo_scenarios.png")
    plot_regularisers(curves, out / "toy_regularisers.png")
    plot_rm(curves, out / "toy_rm.png")
    (out / "toy.md").write_text(toy_markdown(found, cfg, seed))
    return found


def _fmt(value) -> str:
    if isinstance(value, dict):  # {scenario: number}
        return "[" + ", ".join(f"S{k} {_fmt(v)}" for k, v in value.items()) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "never" if value is None else str(value)


def claims_table(claims: dict[str, dict]) -> str:
    """The claims as a markdown table: claim | holds | numbers (the test itself under the name)."""
    lines = ["| claim | holds | numbers |", "|---|---|---|"]
    for name, c in claims.items():
        numbers = "; ".join(f"{k} {_fmt(v)}" for k, v in c.items() if k not in ("claim", "holds"))
        test = f"<br>{c['claim']}" if "claim" in c else ""
        lines.append(f"| `{name}`{test} | {'yes' if c['holds'] else '**no**'} | {numbers} |")
    return "\n".join(lines) + "\n"


def toy_markdown(claims: dict[str, dict], cfg: ToyConfig, seed: int) -> str:
    rows = "\n".join(f"| `{name}` | {value:g} | {why} |" for name, value, why in choices(cfg))
    return f"""# The toy model (3D-properties §3.2, Figures 2–3)

4 one-hot prompts → 3-layer MLP → softmax over 10 responses; responses 1–4 chosen (i optimal for
prompt i), 5–8 rejected, 9–10 unseen. SFT fits a hand-set distribution per scenario; then DPO,
Flex-DPO, DPO+SFT (the training code's objectives) and a Bradley–Terry reward model train on all
(prompt, chosen, rejected) pairs, full batch. Seed {seed}. Probabilities are averaged over the 4
prompts; `outside` = mass off the prompt's own chosen and rejected responses; the reward model's
columns are its implied policy π_ref·exp(r/β)/Z.

## Claims

{claims_table(claims)}
## Choices (the seed gives none of them; none was tuned to make a claim hold)

| choice | value | why |
|---|---|---|
{rows}

Figures: `toy_dpo_scenarios.png` (DPO, each scenario: chosen, rejected, unseen, outside),
`toy_regularisers.png` (DPO vs Flex-DPO vs DPO+SFT), `toy_rm.png` (DPO vs the reward model's
implied policy).
"""


def _panels(plt, rows: int = 1):
    fig, axes = plt.subplots(rows, len(SCENARIOS), figsize=(4 * len(SCENARIOS), 3.2 * rows), sharex=True, squeeze=False)
    for ax, s in zip(axes[0], SCENARIOS):
        ax.set_title(SCENARIO_NAMES[s], fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    return fig, axes


def _run(curves: pd.DataFrame, scenario: int, method: str) -> pd.DataFrame:
    return curves[(curves.scenario == scenario) & (curves.method == method)].sort_values("step")


def plot_scenarios(curves: pd.DataFrame, path: Path) -> Path:
    """Fig. 2/3's view: DPO's chosen, rejected, unseen and outside mass per scenario."""
    plt = _pyplot()
    fig, axes = _panels(plt)
    for ax, s in zip(axes[0], SCENARIOS):
        df = _run(curves, s, "dpo")
        for col in ("chosen", "rejected", "unseen", "outside"):
            ax.plot(df.step, df[col], label=col, color=COLOURS[col], linestyle=":" if col == "outside" else "-")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("probability (DPO)")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def plot_regularisers(curves: pd.DataFrame, path: Path) -> Path:
    """DPO, Flex-DPO and DPO+SFT: chosen (top) and rejected (bottom, log scale) per scenario."""
    plt = _pyplot()
    fig, axes = _panels(plt, rows=2)
    for j, s in enumerate(SCENARIOS):
        for m in ("dpo", "flex_dpo", "dpo_sft"):
            df = _run(curves, s, m)
            axes[0][j].plot(df.step, df.chosen, label=m, color=COLOURS[m])
            axes[1][j].plot(df.step, df.rejected.clip(lower=1e-12), label=m, color=COLOURS[m])
        axes[0][j].set_ylim(0, 1)
        axes[1][j].set_yscale("log")
        axes[1][j].set_ylim(1e-12, 1)
    axes[0][0].set_ylabel("chosen")
    axes[1][0].set_ylabel("rejected")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def plot_rm(curves: pd.DataFrame, path: Path) -> Path:
    """DPO's policy against the reward model's implied policy: chosen, rejected, unseen."""
    plt = _pyplot()
    fig, axes = _panels(plt)
    styles = {"chosen": "-", "rejected": "--", "unseen": ":"}
    for ax, s in zip(axes[0], SCENARIOS):
        for m in ("dpo", "rm"):
            df = _run(curves, s, m)
            for col, ls in styles.items():
                ax.plot(df.step, df[col], color=COLOURS[m], linestyle=ls, label=f"{m} {col}")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("probability")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)

