"""The report's evaluation sections (issue 12): what a checkpoint does on held-out prompts, how
sure each number is, what training cost elsewhere, and the 3D-properties diagnostics.

- `paired_delta`: a checkpoint against the round's policy on the same prompts, with the paired
  bootstrap interval of the difference (`stages/evaluate/intervals.py`), and in words whether
  it is distinguishable from noise.
- `sets_section`: every held-out set (in-domain and out-of-domain), answer length included.
- `forgetting_section`: accuracy on the built-in tasks and TAX against the initial policy.
- `diagnostics_section`: Table 1's per-token log-probs before → after with the "unseen" proxy.
- `diversity_section`: distinct-1…4 and the hyperspherical-energy change per layer.
- `toy_section`: the toy model's claims, when `python -m pipeline toy --out RUN_DIR/toy` ran.

Each returns markdown lines (empty when the run has nothing for it) from `RunData` only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.plots import plot_forgetting, plot_he_change
from pipeline.report_methods import image
from pipeline.rundata import POLICY, RunData
from pipeline.tables import interval, markdown_table, method_label, pp_interval
from pipeline.tables import num as _num
from stages.evaluate.intervals import paired_difference, tax, verdict

METRICS = {"5_points": lambda s: s == 5, "4&5_points": lambda s: s >= 4}


def headline_set(cfg: RunConfig) -> str:
    return next(iter(cfg.evaluate.sets))


def paired_delta(base: Any, answers: Any, set_name: str, metric: str, resamples: int) -> dict | None:
    """The checkpoint's share minus the base's on the prompts both answered and the judge scored
    for both, with its paired 95% interval: {diff, low, high, prompts}, or None without answers."""
    if base is None or answers is None:
        return None
    both = base[base["set"] == set_name].merge(answers[answers["set"] == set_name], on="prompt_id", suffixes=("_b", "_n"))
    both = both.dropna(subset=["score_b", "score_n"])
    if both.empty:
        return None
    hit = METRICS[metric]
    diff, low, high = paired_difference(hit(both["score_b"].to_numpy()).astype(float),
                                        hit(both["score_n"].to_numpy()).astype(float), resamples)  # fmt: skip
    return {"diff": diff, "low": low, "high": high, "prompts": len(both)}


def delta_cell(delta: dict | None) -> str:
    return "-" if delta is None else pp_interval(delta["diff"], delta["low"], delta["high"])


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A sentence per checkpoint: is its difference to the round's policy real?"""
    lines = [f"- {row['model']}: 4&5 points {delta_cell(row['paired'])} against the round's policy on "
             f"{row['paired']['prompts']} paired prompts: {verdict(row['paired']['low'], row['paired']['high'])}."
             for row in rows if row.get("paired") and row["paired"]["low"] is not None]  # fmt: skip
    return (lines + [""]) if lines else []


# ── held-out sets and generation length ──────────────────────────────────────────────────────
SETS_NOTE = ("Every held-out set, each model's greedy answers judged 1-5; [low, high] = 95% bootstrap interval over "
             "the set's prompts; Δ = the paired difference to the round's policy on the same prompts; answer tokens "
             "= mean generation length; dropped = held-out prompts left out for equalling a training prompt.")  # fmt: skip


def _eval_parts(cfg: RunConfig, data: RunData) -> list[tuple[int, str, str]]:
    """(round, part, label): each round's policy, then its answering variants."""
    out = []
    for r in data.rounds:
        out.append((r, POLICY, "base model" if r == 0 else f"round-{r} policy"))
        out += [(r, name, f"round-{r}/{name} ({method_label(tc)})") for name, tc in cfg.policy_trains().items()]
    return out


def sets_section(cfg: RunConfig, data: RunData) -> list[str]:
    body = []
    for name in cfg.evaluate.sets:
        for r, part, label in _eval_parts(cfg, data):
            s = ((data.evals.get((r, part)) or {}).get("sets") or {}).get(name)
            if s is None:
                continue
            delta = None if part == POLICY else paired_delta(data.answers.get((r, POLICY)), data.answers.get((r, part)),
                                                              name, "4&5_points", cfg.evaluate.bootstrap)  # fmt: skip
            body.append([name, label, str(s["prompts"]), interval(s["5_points"], s.get("5_points_ci")),
                         interval(s["4&5_points"], s.get("4&5_points_ci")), "" if part == POLICY else delta_cell(delta),
                         interval(s["response_tokens"], s.get("response_tokens_ci"), ".0f"),
                         _num(s.get("distinct_4"), ".3f"), str(s.get("dropped_overlap", "-"))])  # fmt: skip
    if not body:
        return []
    return ["## Held-out sets and answer length", "", SETS_NOTE, "",
            *markdown_table(["set", "model", "prompts", "5 points", "4&5 points", "Δ 4&5 (paired)", "answer tokens",
                             "distinct-4", "dropped"], body, "llrrrrrrr"), ""]  # fmt: skip


# ── forgetting (TAX) ─────────────────────────────────────────────────────────────────────────
FORGETTING_NOTE = ("Forgetting (seed 001 §3): accuracy on small exact-answer tasks no training pair is about "
                   "(`pipeline/tasks.py`), graded by the verifier's rules, [95% interval]. TAX = 100/|T| Σ min(0, "
                   "(T_i(θ) − T_i(θ_SFT)) / T_i(θ_SFT)) against the run's initial policy: 0 = nothing forgotten, "
                   "−100 = everything; tasks the initial policy scores 0 on are left out of it.")  # fmt: skip


def forgetting_rows(cfg: RunConfig, data: RunData) -> list[dict[str, Any]]:
    """Per evaluated model: {label, accuracy: {task: share}, ci, tax} (TAX against round 0's policy)."""
    sft = {t: v["accuracy"] for t, v in ((data.evals.get((0, POLICY)) or {}).get("forgetting") or {}).items()}
    rows = []
    for r, part, label in _eval_parts(cfg, data):
        f = (data.evals.get((r, part)) or {}).get("forgetting")
        if not f:
            continue
        accuracy = {t: v["accuracy"] for t, v in f.items()}
        rows.append({"label": label, "accuracy": accuracy, "ci": {t: v.get("accuracy_ci") for t, v in f.items()},
                     "tax": None if (r, part) == (0, POLICY) else tax(accuracy, sft)})  # fmt: skip
    return rows


def forgetting_section(cfg: RunConfig, data: RunData, out: Path) -> list[str]:
    rows = forgetting_rows(cfg, data)
    if not rows:
        return []
    tasks = list(dict.fromkeys(t for row in rows for t in row["accuracy"]))
    body = [[row["label"], *(interval(row["accuracy"].get(t), row["ci"].get(t)) for t in tasks),
             "" if row["tax"] is None and row is rows[0] else _num(row["tax"], "+.1f")] for row in rows]  # fmt: skip
    return ["## Forgetting (TAX)", "", FORGETTING_NOTE, "",
            *markdown_table(["model", *tasks, "TAX"], body, "l" + "r" * (len(tasks) + 1)), "",
            *image(plot_forgetting({row["label"]: row["accuracy"] for row in rows}, out), "forgetting tasks")]


# ── 3D-properties diagnostics ────────────────────────────────────────────────────────────────
DIAGNOSTICS_NOTE = ("3D-properties (seed 003 §3, Table 1): mean log-prob per token of the trained pairs' chosen and "
                    "rejected responses under the round's policy → under the checkpoint, and of the round's policy's "
                    "own greedy answers to the held-out prompts (\"unseen\": they are in no training pair). A falling "
                    "unseen column is probability mass leaving what the model would say on new prompts, not only "
                    "the rejected responses; the curves of the log-probs and of the chosen and rejected gradient "
                    "norms over the steps are the diagnostics plot under Training.")  # fmt: skip


def _arrow(before: dict, after: dict, key: str) -> str:
    b, a = before.get(key), after.get(key)
    return "-" if b is None or a is None else f"{b:.3f} → {a:.3f} ({a - b:+.3f})"


def diagnostics_section(cfg: RunConfig, data: RunData) -> list[str]:
    body = []
    for (r, part), s in data.evals.items():
        if part == POLICY or "before" not in s:
            continue
        unseen = s.get("unseen") or {}
        body.append([f"round-{r}/{part}", method_label(cfg.trains()[part]) if part in cfg.trains() else "",
                     _arrow(s["before"], s["after"], "logps_per_token/chosen"),
                     _arrow(s["before"], s["after"], "logps_per_token/rejected"),
                     _arrow(unseen.get("before") or {}, unseen.get("after") or {}, "logps_per_token"),
                     str(unseen.get("answers", "-"))])  # fmt: skip
    if not body:
        return []
    return ["## 3D-properties: where the probability mass went", "", DIAGNOSTICS_NOTE, "",
            *markdown_table(["model", "method", "chosen per token", "rejected per token", "unseen per token",
                             "unseen answers"], body, "llrrrr"), ""]  # fmt: skip


# ── diversity and geometry ───────────────────────────────────────────────────────────────────
DIVERSITY_NOTE = ("Distinct-n (seed 000): unique n-grams / all n-grams of the headline set's greedy answers (higher = "
                  "more diverse). Hyperspherical energy (METHODS.md): HE(W) = Σ_{i≠j} 1/‖ŵ_i − ŵ_j‖ over the unit "
                  "neurons of each decoder-layer matrix, computed in row blocks; the plot shows its relative change "
                  "per layer, the mean over the layer's matrices (0: the neurons' angles kept, as RoPO does).")  # fmt: skip


def diversity_section(cfg: RunConfig, data: RunData, out: Path) -> list[str]:
    body = []
    for r, part, label in _eval_parts(cfg, data):
        s = data.evals.get((r, part))
        if s and "distinct_1" in s:
            geometry = s.get("geometry") or {}
            body.append([label, *(_num(s.get(f"distinct_{n}"), ".3f") for n in range(1, 5)),
                         _num(geometry.get("he_mean_abs_relative_change"), ".2e")])  # fmt: skip
    if not body:
        return []
    geometry = {f"r{r}/{n}": rows for (r, n), rows in data.geometry.items()}
    return ["## Diversity and geometry", "", DIVERSITY_NOTE, "",
            *markdown_table(["model", "distinct-1", "distinct-2", "distinct-3", "distinct-4", "HE change, mean abs"],
                            body, "lrrrrr"), "",
            *image(plot_he_change(geometry, out), "hyperspherical energy change per layer")]  # fmt: skip


# ── the toy model ────────────────────────────────────────────────────────────────────────────
def toy_section(run_dir: Path, out: Path) -> list[str]:
    """The toy's claims table and figures, when `python -m pipeline toy --out RUN_DIR/toy` wrote them."""
    toy = Path(run_dir) / "toy"
    claims_file = toy / "claims.json"
    if not claims_file.is_file():
        return []
    from pipeline.toy import claims_table

    parts = ["## The toy model (seed 003 §3.2)", "",
             "4 one-hot prompts → 3-layer MLP → softmax over 10 responses (`python -m pipeline toy`, choices in "
             "`stages/evaluate/toy.py`): each claim of the paper, reproduced or not, with its numbers.", "",
             *claims_table(json.loads(claims_file.read_text())).splitlines()]  # fmt: skip
    for png in sorted(toy.glob("*.png")):
        copy = out / f"toy-{png.name}"
        shutil.copyfile(png, copy)
        parts += ["", f"![toy: {png.stem}]({copy.name})"]
    return parts + [""]

