"""report/report.md: what a run did and how it turned out, from finished stages only.

Reads what the stages wrote (manifests, `metrics.jsonl`, `summary.json`) and never re-runs
anything, so `python -m pipeline report CONFIG` is instant and works on a partial run: what is
not written yet is a "-" in its cells. `load_run` is the only reader of the run folder; tables
and plots are built from the `RunData` it returns.

Sections: the config in brief; held-out evaluation (3D-properties Table 2: each round's policy,
then its variants' checkpoints); how on-policy the data is (Table 1: the training pairs'
log-probs under the round's policy and under each checkpoint); methods (Table 10), OGD beside
DPO and RoPO beside DPO (when the variants train them); held-out preference accuracy; data
(candidates, scores, pairs, an API judge's requests and cost); training curves; judge agreement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.artifacts import Location, atomic_write_text, join, localize, location, read_manifest, stage_dir, upload
from pipeline.config import SCENARIO_SOURCES, RunConfig
from pipeline.plots import plot_confusion  # noqa: F401  (re-exported: pipeline/compare.py imports it from here)
from pipeline.plots import DIAGNOSTIC_CURVES, plot_he_change, plot_logps, plot_scores, plot_training

# evaluate's part for the round's own policy (`round-K/evaluate/policy/`); variants use their names
POLICY = "policy"

# who writes a side of a pair, in the words of the scenario names
SOURCE_NAMES = {"policy": "policy", "reference": "solution", "other": "other model"}

# train keys that say which data and how it runs, not how it learns: not listed as hyper-parameters
# (the update rule and parameterisation are in the method's label)
_NOT_HYPER = ("scenario", "method", "update", "parameterisation", "num_workers", "use_gpu")


def method_label(train: Any) -> str:
    """What trains a variant, in a few letters: the objective (`dpo`), or `ogd` for the OGD update
    rule (its objective is only logged), with `+ ropo` when RoPO is the parameterisation."""
    label = "ogd" if train.update.type == "ogd" else train.method.type
    return f"{label} + ropo" if train.parameterisation.type == "ropo" else label


# ── reading the run folder: the only reads ───────────────────────────────────────────────────
@dataclass
class RunData:
    """What the finished parts of the config's rounds wrote; a key is absent where nothing was."""

    rounds: list[int]
    sample: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, source) → manifest stats
    judge: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, source) → manifest stats
    pairs: dict[int, dict] = field(default_factory=dict)  # round → manifest stats
    metrics: dict[tuple[int, str], list[dict]] = field(default_factory=dict)  # (round, variant) → a dict per step
    evals: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, "policy" | variant) → summary.json
    train: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, variant) → train manifest stats
    geometry: dict[tuple[int, str], list[dict]] = field(default_factory=dict)  # (round, variant) → a row per matrix


def _rounds(run_dir: Path, rounds: int) -> list[int]:
    """The config's rounds that have a folder: a round dropped from the config (`rounds` lowered)
    may still be on disk, but it is not part of this run."""
    return [r for r in range(rounds) if (Path(run_dir) / f"round-{r}").is_dir()]


def _stats(folder: Path) -> dict | None:
    manifest = read_manifest(folder)
    return None if manifest is None else manifest.get("stats") or {}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _metrics(train_dir: Path) -> list[dict[str, Any]] | None:
    path = train_dir / "metrics.jsonl"
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return steps or None


def _put(into: dict, key: Any, value: Any) -> None:
    if value is not None:
        into[key] = value


def load_run(run_dir: Path, cfg: RunConfig) -> RunData:
    """Every manifest, metrics file and evaluation summary of the config's sources and variants."""
    run_dir = Path(run_dir)
    data = RunData(rounds=_rounds(run_dir, cfg.rounds))
    for r in data.rounds:
        for source in cfg.sources():
            _put(data.sample, (r, source), _stats(stage_dir(run_dir, r, "sample") / source))
            _put(data.judge, (r, source), _stats(stage_dir(run_dir, r, "judge") / source))
        _put(data.pairs, r, _stats(stage_dir(run_dir, r, "pairs")))
        for part in (POLICY, *cfg.trains()):
            _put(data.evals, (r, part), _json(stage_dir(run_dir, r, "evaluate") / part / "summary.json"))
        for variant in cfg.trains():
            _put(data.metrics, (r, variant), _metrics(stage_dir(run_dir, r, "train") / variant))
            _put(data.train, (r, variant), _stats(stage_dir(run_dir, r, "train") / variant))
            _put(data.geometry, (r, variant), _geometry(stage_dir(run_dir, r, "evaluate") / variant))
    return data


def _geometry(evaluate_dir: Path) -> list[dict] | None:
    """evaluate's hyperspherical energy per matrix (`geometry.parquet`), once the folder is finished."""
    path = evaluate_dir / "geometry.parquet"
    if read_manifest(evaluate_dir) is None or not path.is_file():
        return None
    import pandas as pd

    return pd.read_parquet(path).to_dict("records")


# ── cells ────────────────────────────────────────────────────────────────────────────────────
def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def _pp(share: float | None) -> str:
    """A difference of two shares in percentage points."""
    return "-" if share is None else f"{100 * share:+.1f} pp"


def _usd(cost: float) -> str:
    return f"${cost:,.2f}" if cost >= 1 else f"${cost:.4f}" if cost >= 0.01 else f"${cost:.6f}"


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """`align`: one "l" or "r" per column."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]  # fmt: skip


def sides(k: int) -> str:
    """`solution × policy`: who writes chosen × rejected in scenario k."""
    return " × ".join(SOURCE_NAMES[source] for source in SCENARIO_SOURCES[k])


def scenario_name(k: int) -> str:
    return f"{k}: {sides(k)}"


def policy_label(cfg: RunConfig, round_: int) -> str:
    return "base model" if round_ == 0 else f"round-{round_} policy (= round-{round_ - 1}/{cfg.sample_from()})"


# ── the config in brief ──────────────────────────────────────────────────────────────────────
def _changed(block: BaseModel, skip: tuple[str, ...] = ("type",)) -> list[str]:
    """`key=value` for each field of `block` that differs from its default."""
    out = []
    for name, spec in type(block).model_fields.items():
        value = getattr(block, name)
        if name not in skip and (spec.is_required() or value != spec.get_default(call_default_factory=True)):
            out.append(f"{name}={value}")
    return out


def variant_brief(name: str, train: Any) -> str:
    """`s2: scenario 2 (solution × policy), dpo (beta=0.2, lr=1e-05)`: the non-default hyper-parameters."""
    logged = [f"logs {train.method.type}"] if train.update.type == "ogd" else []
    changed = logged + _changed(train.method) + _changed(train.parameterisation) + _changed(train, skip=_NOT_HYPER)
    hyper = f" ({', '.join(changed)})" if changed else ""
    return f"{name}: scenario {train.scenario} ({sides(train.scenario)}), {method_label(train)}{hyper}"


def _sampler_brief(sampler: Any) -> str:
    n = f", n={sampler.n}" if hasattr(sampler, "n") else ""
    model = getattr(sampler, "model", None)
    return f"`{sampler.type}`{n}" + (f", model `{model}`" if model else "")


def header(cfg: RunConfig) -> list[str]:
    rounds = f"{cfg.rounds}"
    if cfg.rounds > 1:
        ref = "the initial policy" if cfg.next_round.ref_model == "initial" else "the checkpoint it starts from"
        rounds += f" (round k > 0 samples from and trains round k-1's `{cfg.sample_from()}` checkpoint; π_ref: {ref})"
    judge_model = getattr(cfg.judge, "model", None)
    own = "" if getattr(cfg.sampler, "model", None) else " (the round's policy)"
    lines = [f"# Report: {cfg.name}", "", f"- policy: `{cfg.policy}`", f"- rounds: {rounds}",
             f"- sampler: {_sampler_brief(cfg.sampler)}{own}"]  # fmt: skip
    if cfg.other_sampler is not None:
        lines.append(f"- other sampler: {_sampler_brief(cfg.other_sampler)}")
    lines += [f"- judge: `{cfg.judge.type}`" + (f", model `{judge_model}`" if judge_model else ""),
              f"- scenarios: {', '.join(scenario_name(k) for k in cfg.pairs.scenarios)}",
              "- variants: " + "; ".join(variant_brief(name, tc) for name, tc in cfg.trains().items())]  # fmt: skip
    return lines


# ── held-out evaluation (Table 2) ────────────────────────────────────────────────────────────
EVAL_HEADER = ["round", "model", "scenario", "method", "5 points", "4&5 points", "mean score", "answer tokens",
               "Δ 4&5 vs the round's policy"]  # fmt: skip
EVAL_NOTE = ("Greedy answers to the held-out prompts, judged 1-5: 5 points is the share scoring 5, 4&5 points the "
             "share scoring 4 or 5 (answers the judge could not score left out); Δ in percentage points. "
             "\"-\": not evaluated yet.")  # fmt: skip


def _delta(summary: dict | None, base: dict | None) -> float | None:
    if not summary or not base or summary.get("4&5_points") is None or base.get("4&5_points") is None:
        return None
    return summary["4&5_points"] - base["4&5_points"]


def eval_rows(cfg: RunConfig, data: RunData) -> list[dict[str, Any]]:
    """Table 2's rows: each round's policy, then its policy variants' checkpoints in config order,
    with their summary (None where not evaluated) and Δ 4&5 points against the round's policy."""
    rows = []
    for r in data.rounds:
        base = data.evals.get((r, POLICY))
        rows.append({"round": r, "part": POLICY, "model": policy_label(cfg, r), "scenario": None, "method": None,
                     "summary": base, "delta": None})  # fmt: skip
        for name, tc in cfg.policy_trains().items():
            summary = data.evals.get((r, name))
            rows.append({"round": r, "part": name, "model": f"round-{r}/{name}", "scenario": tc.scenario,
                         "method": method_label(tc), "summary": summary, "delta": _delta(summary, base)})  # fmt: skip
    return rows


def eval_table(rows: list[dict[str, Any]]) -> list[str]:
    body = []
    for row in rows:
        s, own = row["summary"] or {}, row["part"] == POLICY  # the round's policy: no scenario, method, Δ
        body.append([str(row["round"]), row["model"], "" if own else scenario_name(row["scenario"]),
                     "" if own else row["method"], _num(s.get("5_points"), ".1%"), _num(s.get("4&5_points"), ".1%"),
                     _num(s.get("mean_score"), ".2f"), _num(s.get("response_tokens"), ".0f"),
                     "" if own else _pp(row["delta"])])  # fmt: skip
    return markdown_table(EVAL_HEADER, body, "rlllrrrrr")


def methods_section(cfg: RunConfig, rows: list[dict[str, Any]]) -> list[str]:
    """The paper's Table 10 (method × 5 points × 4&5 points, base model first), one per round,
    when the run's variants train more than one method."""
    trains = cfg.policy_trains()
    if len({method_label(tc) for tc in trains.values()}) < 2:
        return []
    parts = ["## Methods (Table 10)", "",
             "Each method's checkpoint on the held-out prompts, the round's policy first (hyper-parameters: "
             "the variants line above).", ""]  # fmt: skip
    for r in sorted({row["round"] for row in rows}):
        body = []
        for row in (x for x in rows if x["round"] == r):
            s = row["summary"] or {}
            label = "base model" if row["part"] == POLICY else f"{row['method']} ({row['part']})"
            body.append([label, _num(s.get("5_points"), ".1%"), _num(s.get("4&5_points"), ".1%")])
        parts += ([f"Round {r}:", ""] if len(rows) > len(body) else []) + markdown_table(
            ["method", "5 points", "4&5 points"], body, "lrr") + [""]  # fmt: skip
    return parts


def headline(run_dir: Path, cfg: RunConfig) -> str:
    """The held-out table (markdown), printed at the end of a run."""
    data = load_run(local_run_dir(run_dir), cfg)
    if not data.rounds:
        return "(no round has started yet)"
    return "\n".join([*eval_table(eval_rows(cfg, data)), "", EVAL_NOTE])


def unscored_note(rows: list[dict[str, Any]]) -> list[str]:
    counts = [f"{row['model']} {row['summary']['unscored']}" for row in rows if (row["summary"] or {}).get("unscored")]
    return [f"Held-out answers the judge could not score: {', '.join(counts)}.", ""] if counts else []


# ── how on-policy is the data (Table 1) ──────────────────────────────────────────────────────
ONPOLICY_NOTE = ("Mean log-probability of each variant's training pairs (chosen / rejected) under the round's policy "
                 "(before training) and under the variant's checkpoint (after). Before: lower = further from what the "
                 "policy writes itself, more off-policy (scenario 1's pairs are its own samples). After: how far "
                 "training moved them; the fall of the rejected side is the \"drastic drop\" of 3D-properties, and a "
                 "falling chosen side shows the likelihood of good answers going down with it.")  # fmt: skip


def _before(cfg: RunConfig, data: RunData, round_: int, scenario: int) -> dict | None:
    """The round's policy on scenario k's pairs: the `before` block of the first variant on k that has one."""
    for name, tc in cfg.trains().items():
        before = (data.evals.get((round_, name)) or {}).get("before")
        if tc.scenario == scenario and before:
            return before
    return None


def logp_table(cfg: RunConfig, data: RunData, round_: int, per_token: bool) -> list[str]:
    """One round's Table 1: a column per scenario, a row for the policy and one per variant, whose
    checkpoint fills its own scenario's cell only."""
    prefix, fmt = ("logps_per_token/", ".3f") if per_token else ("logps/", ".1f")

    def cell(side: dict | None) -> str:
        side = side or {}
        chosen, rejected = side.get(prefix + "chosen"), side.get(prefix + "rejected")
        return "-" if chosen is None or rejected is None else f"{chosen:{fmt}} / {rejected:{fmt}}"

    scenarios = cfg.pairs.scenarios
    body = [["round's policy (before training)", *(cell(_before(cfg, data, round_, k)) for k in scenarios)]]
    for name, tc in cfg.policy_trains().items():
        after = (data.evals.get((round_, name)) or {}).get("after")
        body.append([f"after training ({name})", *(cell(after) if k == tc.scenario else "" for k in scenarios)])
    return markdown_table(["model", *(scenario_name(k) for k in scenarios)], body, "l" + "r" * len(scenarios))


def onpolicy_section(cfg: RunConfig, data: RunData) -> list[str]:
    parts = ["## How on-policy is the data?", "", ONPOLICY_NOTE, ""]
    for r in data.rounds:
        parts += [f"Round {r}, {policy_label(cfg, r)}: mean log-prob per token, chosen / rejected:", "",
                  *logp_table(cfg, data, r, per_token=True), "", f"Round {r}, mean log-prob per sequence:", "",
                  *logp_table(cfg, data, r, per_token=False), ""]  # fmt: skip
    return parts


# ── data ─────────────────────────────────────────────────────────────────────────────────────
def _score_counts(counts: dict) -> str:
    # a stage returns int keys, a manifest read back has str keys
    return " / ".join(str(counts.get(str(k), counts.get(k, 0))) for k in range(1, 6)) if counts else "-"


def candidates_table(cfg: RunConfig, data: RunData) -> list[str]:
    body = []
    for r in data.rounds:
        for source in cfg.sources():
            sample, judge = data.sample.get((r, source), {}), data.judge.get((r, source), {})
            scored = f"{judge['scored']} / {judge['unscored']}" if "scored" in judge and "unscored" in judge else "-"
            body.append([str(r), source, _count(sample.get("model")), _count(sample.get("prompts")),
                         _count(judge.get("rows")), scored, _score_counts(judge.get("score_counts", {}))])  # fmt: skip
    header = ["round", "source", "written by", "prompts", "candidates", "scored / unscored", "score counts (1..5)"]
    return markdown_table(header, body, "rllrrrl")


def pairs_table(cfg: RunConfig, data: RunData) -> list[str]:
    body = []
    for r in data.rounds:
        stats = data.pairs.get(r, {})
        for k in cfg.pairs.scenarios:
            s = stats.get(f"s{k}", {})
            body.append([str(r), scenario_name(k), _count(stats.get("prompts")), _count(s.get("pairs")),
                         _count(s.get("dropped_uniform")), _count(s.get("dropped_margin")), _count(s.get("dropped_unscored"))])  # fmt: skip
    header = ["round", "scenario", "prompts", "pairs", "dropped (uniform: no contrast)", "dropped (below min_margin)",
              "dropped (unscored)"]  # fmt: skip
    return markdown_table(header, body, "rlrrrrr")


def unscored_reasons(data: RunData) -> list[str]:
    """`round 0 policy: http 500 after 6 tries 2, unparseable 1`, most frequent first."""
    out = []
    for (r, source), judge in data.judge.items():
        if judge.get("unscored_reasons"):
            kinds = sorted(judge["unscored_reasons"].items(), key=lambda kv: (-kv[1], kv[0]))
            out.append(f"round {r} {source}: " + ", ".join(f"{kind} {n}" for kind, n in kinds))
    return out


def requests_table(data: RunData) -> list[str]:
    body = []
    for (r, source), judge in data.judge.items():
        if "requests" in judge:
            cost = judge.get("cost_usd")
            counts = [_count(judge.get(key)) for key in ("retried", "cache_hits", "prompt_tokens", "completion_tokens")]
            body.append([str(r), source, str(judge["requests"]), *counts,
                         "no prices configured" if cost is None else _usd(cost)])  # fmt: skip
    header = ["round", "source", "requests", "retried rows", "cache hits", "prompt tokens", "completion tokens", "estimated cost"]
    return markdown_table(header, body, "rlrrrrrr") if body else []


def data_section(cfg: RunConfig, data: RunData) -> list[str]:
    """Per round and source: candidates, scored/unscored, score counts and who wrote them; per round
    and scenario: pairs and why prompts gave none; then the unscored rows' reasons and an API
    judge's requests, tokens and cost. A manifest written before a key existed shows "-" there."""
    parts = ["## Data", "", "Candidates per round and source:", "", *candidates_table(cfg, data), "",
             "Pairs per round and scenario (a prompt gives one pair or is dropped for one reason):", "",
             *pairs_table(cfg, data), ""]  # fmt: skip
    reasons, requests = unscored_reasons(data), requests_table(data)
    if reasons:
        parts += [f"Unscored candidates by reason (they take no part in pairs): {'; '.join(reasons)}.", ""]
    if requests:
        parts += ["Judge requests (this run's requests only; a cache hit costs none):", "", *requests, ""]
    return parts


# ── training ─────────────────────────────────────────────────────────────────────────────────
def _first_last(metrics: list[dict], key: str, fmt: str) -> str:
    first, last = metrics[0].get(key), metrics[-1].get(key)
    return f"{key} {_num(first, fmt)} → {_num(last, fmt)}"


def training_lines(data: RunData) -> list[str]:
    """One line per trained (round, variant): steps, loss and logps first → last, last accuracy."""
    lines = []
    for (r, variant), m in data.metrics.items():
        lines.append(f"- round {r} / {variant}: {len(m)} steps; {_first_last(m, 'loss', '.4f')}; "
                     f"{_first_last(m, 'logps/chosen', '.1f')}; {_first_last(m, 'logps/rejected', '.1f')}; "
                     f"rewards/accuracies (last step) {_num(m[-1].get('rewards/accuracies'), '.2f')}")  # fmt: skip
        lines += [f"  - **guard fired at step {x['step']}**: {x['guard']}" for x in m if x.get("guard")]
    return lines


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
            *_image(plot_training(data, out, curves, "held_out_accuracy.png"), "held-out preference accuracy")]  # fmt: skip


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
            *_image(plot_training(subset, out, curves, "ogd_vs_dpo.png"), "OGD beside DPO")]  # fmt: skip


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
            *_image(plot_he_change(geometry, out), "hyperspherical energy change per layer")]  # fmt: skip


# ── plots (drawn in pipeline/plots.py) ──────────────────────────────────────────────────────
def _image(path: Path | None, alt: str) -> list[str]:
    return [f"![{alt}]({path.name})", ""] if path else []


# ── judge agreement (`python -m pipeline compare-judges`) ──────────────────────────────────────
def _kappa(value: float | None, result: dict[str, Any]) -> str:
    if value is not None:
        return f"{value:.3f}"
    return "undefined (no row scored by both)" if not result["n"] else "undefined (both judges gave every row one score)"


def agreement_numbers(result: dict[str, Any], names: tuple[str, str], sep: str = "; ") -> str:
    """`agreement()`'s numbers in words, one per `sep`."""
    a, b = names
    exact = "-" if result["exact"] is None else f"{result['exact']:.1%}"
    means = ("-" if result["mean_a"] is None
             else f"{a} {result['mean_a']:.2f}, {b} {result['mean_b']:.2f} (on the {result['n']} rows both scored)")  # fmt: skip
    return sep.join([
        f"scored by both: {result['n']}",
        f"excluded (unscored by either): {result['n_excluded']} ({a}: {result['unscored_a']} unscored, "
        f"{b}: {result['unscored_b']})",
        f"exact agreement: {exact}",
        f"Cohen's κ: {_kappa(result['kappa'], result)}",
        f"quadratic-weighted κ: {_kappa(result['kappa_quadratic'], result)}",
        f"mean score: {means}",
    ])  # fmt: skip


def confusion_markdown(confusion: list[list[int]], labels: list[int], names: tuple[str, str]) -> list[str]:
    lines = [f"| {names[0]} ↓ / {names[1]} → | " + " | ".join(str(x) for x in labels) + " |",
             "|---|" + "---:|" * len(labels)]  # fmt: skip
    lines += [f"| **{label}** | " + " | ".join(str(v) for v in row) + " |" for label, row in zip(labels, confusion)]
    return lines


def agreement_section(run_dir: Path, report_dir: Path) -> list[str]:
    """Every finished `compare-judges/<A>-vs-<B>/agreement.json`, with its matrix and heatmap."""
    found = sorted(p for p in (Path(run_dir) / "compare-judges").glob("*/agreement.json") if not p.parent.name.startswith("."))
    if not found:
        return []
    parts = ["## Judge agreement", "", "Two judges on the same candidates (`python -m pipeline compare-judges`); "
             "κ discounts the agreement their score distributions would give by chance, and the quadratic-weighted "
             "κ counts a 4-vs-5 disagreement as milder than a 1-vs-5 one. Matrix rows: the first judge's score.", ""]  # fmt: skip
    for path in found:
        result = json.loads(path.read_text())
        names = (result["a"], result["b"])
        limit = f", --limit {result['limit']}" if result.get("limit") else ""
        parts += [f"### {names[0]} vs {names[1]}", "",
                  f"Round {result.get('round', 0)}'s candidates ({result.get('prompts', '-')} prompts{limit}): "
                  f"{agreement_numbers(result, names)}.", "",
                  *confusion_markdown(result["confusion"], result["labels"], names), ""]  # fmt: skip
        image = path.parent / "confusion.png"
        if image.is_file():
            parts += [f"![{names[0]} vs {names[1]}]({Path(os.path.relpath(image, report_dir)).as_posix()})", ""]
    return parts


# What the report never reads: an object-store run dir is copied down without them.
NOT_READ = ("checkpoint", ".ray-train", "tensorboard", ".raw")


def local_run_dir(run_dir: Location) -> Path:
    """The run dir as a local folder: itself, or this machine's copy of an object-store run dir
    (only what changed since the last copy is fetched again, and no checkpoint)."""
    return localize(location(run_dir), exclude=NOT_READ)


def write_report(cfg: RunConfig, run_dir: Location) -> Location:
    """report/report.md and its plots, from the finished stage folders; for an object-store run dir
    written on a local copy and uploaded to RUN_DIR/report/."""
    remote = location(run_dir)
    run_dir = local_run_dir(remote)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = load_run(run_dir, cfg)
    rows = eval_rows(cfg, data)
    parts = [*header(cfg), "", "## Held-out evaluation (greedy, judged 1-5)", "", *eval_table(rows), "", EVAL_NOTE, "",
             *unscored_note(rows), *_image(plot_scores(rows, out), "held-out scores"),
             *onpolicy_section(cfg, data), *_image(plot_logps(cfg, data, out), "log-probs before and after training"),
             *methods_section(cfg, rows), *ogd_section(cfg, data, out), *ropo_section(cfg, data, out),
             *held_out_section(cfg, data, out), *data_section(cfg, data),
             "## Training", "", *_image(plot_training(data, out), "training curves"), *training_lines(data), "",
             "3D diagnostics (seed 003 Figure 10): per-token log-probs, |∂L/∂logp| per pair, and the parameter-gradient "
             "norms of the chosen and rejected terms.", "",
             *_image(plot_training(data, out, DIAGNOSTIC_CURVES, "diagnostics.png"), "3D diagnostics"),
             *agreement_section(run_dir, out)]  # fmt: skip
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts) + "\n")
    upload(out, join(remote, "report"))  # (nothing to do for a local run dir)
    return join(remote, "report", "report.md")
