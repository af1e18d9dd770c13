"""The report's sections on how methods train: held-out preference accuracy (seed 003 §5.3), OGD
beside DPO (seed 001) and RoPO beside DPO (seed 000). Each returns markdown lines, empty when the
run trains nothing it is about."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.plots import plot_he_change, plot_training
from pipeline.rundata import POLICY, RunData
from pipeline.tables import markdown_table, method_label
from pipeline.tables import num as _num


def image(path: Path | None, alt: str) -> list[str]:
    """A plot's markdown line (the PNG beside report.md), nothing when there was nothing to draw."""
    return [f"![{alt}]({path.name})", ""] if path else []



def _swing(values: list[float]) -> float | None:
    """Mean |change| between consecutive held-out evaluations: how much a curve fluctuates."""
    steps = [abs(b - a) for a, b in zip(values, values[1:])]
    return sum(steps) / len(steps) if steps else None


def held_out_section(cfg: RunConfig, data: RunData, out: Path) -> list[str]:
    """seed 003 §5.3: preference accuracy on held-out pairs per step, a reward model's beside the
    policies' (implicit-reward) accuracy, when any variant holds pairs out (`train.held_out_pairs`)."""
    key = "eval_rewards/accuracies"
    trains = cfg.trains()
    rows = []
    for (r, variant), m in data.metrics.items():
        curve = [x[key] for x in m if x.get(key) is not None]
        if not curve:
            continue
        tc = trains[variant]
        judged = ((data.evals.get((r, variant)) or {}).get("preference") or {}).get("accuracy")
        rows.append([f"r{r}/{variant}", method_label(tc), str(tc.held_out_pairs), f"{curve[0]:.2f} → {curve[-1]:.2f}",
                     _num(max(curve), ".2f"), _num(_swing(curve), ".3f"), _num(judged, ".2f")])  # fmt: skip
    if not rows:
        return []
    curves = (("eval_rewards/accuracies",),)  # one panel: the methods' losses are on different scales (IPO's ~25)
    return ["## Held-out preference accuracy (seed 003 §5.3)", "",
            "Share of held-out pairs each model orders right after every step: a reward model by its reward "
            "r(x,y+) > r(x,y−), a policy by its implicit reward (DPO: β·h > 0). The paper finds the reward model's "
            "curve steady and DPO's fluctuating; swing = mean |change| between consecutive evaluations. The reward "
            "model's last column is its accuracy read through the reward-model judge by evaluate.", "",
            *markdown_table(["variant", "method", "held-out pairs", "accuracy first → last", "best", "swing",
                             "as a judge"], rows, "llrrrrr"), "",
            *image(plot_training(data, out, curves, "held_out_accuracy.png"), "held-out preference accuracy")]  # fmt: skip


# ── OGD and RoPO beside DPO (seeds 001 and 000) ─────────────────────────────────────────────
def _beside_dpo(trains: dict[str, Any], selected: list[str]) -> list[str]:
    """The `selected` variants, then those they are compared with: plain DPO on full weights on the
    same scenarios' pairs."""
    scenarios = {trains[n].scenario for n in selected}
    dpo = [n for n, tc in trains.items() if tc.scenario in scenarios and tc.method.type == "dpo"
           and tc.update.type == "plain" and tc.parameterisation.type == "full"]  # fmt: skip
    return list(dict.fromkeys(selected + dpo))


def _peak_then_last(curve: list[float]) -> str:
    if not curve:
        return "-"
    peak = max(curve)
    return f"{curve[-1]:+.2f} (peak {peak:+.2f} at step {curve.index(peak) + 1})"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


OGD_NOTE = ("OGD (seed 001) trains on ∇NLL(chosen) projected orthogonal to ∇NLL(rejected) whenever the two "
            "point the same way: the chosen responses' likelihood should rise while the rejected ones' does not "
            "fall with it. It never sees DPO's loss, which is logged beside it (β = 0.1, from the starting policy) "
            "and should still fall (the paper's Figure 6). log-ratio = logp − ref_logp of the step's pairs (0 at "
            "step 1; > 0: more likely than under the starting policy); before → after: mean log-prob per token of "
            "all trained pairs under the round's policy and the checkpoint. \"projected\": share of steps where "
            "g_w·g_l > 0 and the projection fired. DPO on the same pairs, full weights, is beside it; the paper "
            "sees DPO's chosen likelihood fall with longer training: the peak column shows whether it did here. "
            "In the plot, variants that differ only in their number of steps draw the same first steps.")  # fmt: skip


def ogd_section(cfg: RunConfig, data: RunData, out: Path) -> list[str]:
    trains = cfg.policy_trains()
    ogd = [n for n, tc in trains.items() if tc.update.type == "ogd"]
    if not ogd:
        return []
    names = _beside_dpo(trains, ogd)
    body = []
    for r in data.rounds:
        for name in names:
            m = data.metrics.get((r, name)) or []
            s = data.evals.get((r, name)) or {}
            before, after = s.get("before") or {}, s.get("after") or {}
            projected = _mean([x["ogd/projected"] for x in m if "ogd/projected" in x])
            body.append([f"r{r}/{name}", method_label(trains[name]), str(len(m) or "-"),
                         _peak_then_last([x["logratios/chosen"] for x in m if "logratios/chosen" in x]),
                         _num(m[-1].get("logratios/rejected") if m else None, "+.2f"),
                         f"{_num(m[0].get('loss') if m else None, '.4f')} → {_num(m[-1].get('loss') if m else None, '.4f')}",
                         f"{_num(before.get('logps_per_token/chosen'), '.3f')} → {_num(after.get('logps_per_token/chosen'), '.3f')}",
                         f"{_num(before.get('logps_per_token/rejected'), '.3f')} → {_num(after.get('logps_per_token/rejected'), '.3f')}",
                         _num(projected, ".0%")])  # fmt: skip
    curves = (("logratios/chosen",), ("logratios/rejected",), ("loss",))
    subset = RunData(rounds=data.rounds, metrics={k: v for k, v in data.metrics.items() if k[1] in names})
    return ["## OGD beside DPO (seed 001)", "", OGD_NOTE, "",
            *markdown_table(["variant", "method", "steps", "log-ratio chosen, last step", "log-ratio rejected, last",
                             "DPO loss (β 0.1) first → last", "chosen per token before → after",
                             "rejected per token before → after", "projected"], body, "llrrrrrrr"), "",
            *image(plot_training(subset, out, curves, "ogd_vs_dpo.png"), "OGD beside DPO")]  # fmt: skip


ROPO_NOTE = ("RoPO (seed 000) changes a layer only by rotating its inputs and stretching its neurons (W' = diag(m)·W·Rᵀ, "
             "every other weight frozen), so the angles between neurons, and the hyperspherical energy (HE) of every "
             "layer, stay what they were; DPO on full weights moves them. HE change: mean and largest |HE_after − "
             "HE_before| / HE_before over every decoder-layer matrix (`evaluate/<variant>/geometry.parquet`). "
             "Distinct-n: unique n-grams / all n-grams of the held-out answers (higher = more diverse); the "
             "round's policy first.")  # fmt: skip


def ropo_section(cfg: RunConfig, data: RunData, out: Path) -> list[str]:
    trains = cfg.policy_trains()
    ropo = [n for n, tc in trains.items() if tc.parameterisation.type == "ropo"]
    if not ropo:
        return []
    names = _beside_dpo(trains, ropo)

    def distinct_cells(s: dict) -> list[str]:
        return [_num(s.get(f"distinct_{n}"), ".3f") for n in range(1, 5)]

    body = []
    for r in data.rounds:
        body.append([f"r{r}/{POLICY}", "", "", "", "", *distinct_cells(data.evals.get((r, POLICY)) or {})])
        for name in names:
            s = data.evals.get((r, name)) or {}
            geometry = s.get("geometry") or {}
            share = (data.train.get((r, name)) or {}).get("trainable_percent")
            body.append([f"r{r}/{name}", method_label(trains[name]), _num(share, ".4g") + ("%" if share is not None else ""),
                         _num(geometry.get("he_mean_abs_relative_change"), ".2e"),
                         _num(geometry.get("he_max_abs_relative_change"), ".2e"), *distinct_cells(s)])  # fmt: skip
    geometry = {f"r{r}/{n}": rows for (r, n), rows in data.geometry.items() if n in names}
    return ["## RoPO beside DPO (seed 000)", "", ROPO_NOTE, "",
            *markdown_table(["model", "method", "trainable", "HE change, mean", "HE change, max", "distinct-1",
                             "distinct-2", "distinct-3", "distinct-4"], body, "llrrrrrrr"), "",
            *image(plot_he_change(geometry, out), "hyperspherical energy change per layer")]  # fmt: skip

