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
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.artifacts import Location, atomic_write_text, join, location, upload
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.plots import plot_confusion  # noqa: F401  (re-exported: pipeline/compare.py imports it from here)
from pipeline.plots import DIAGNOSTIC_CURVES, plot_logps, plot_scores, plot_training
from pipeline.html import write_html
from pipeline.report_evaluation import (delta_cell, diagnostics_section, diversity_section, forgetting_rows,
                                        forgetting_section, headline_set, paired_delta, sets_section, toy_section, verdict_lines)
from pipeline.report_methods import held_out_section, image, ogd_section, ropo_section
from pipeline.rundata import POLICY, RunData, load_run, local_run_dir
from pipeline.tables import count as _count
from pipeline.tables import interval, markdown_table, method_label, scenario_name, sides
from pipeline.tables import num as _num
from pipeline.tables import usd as _usd


# train keys that say which data and how it runs, not how it learns: not listed as hyper-parameters
# (the update rule and parameterisation are in the method's label)
_NOT_HYPER = ("scenario", "method", "update", "parameterisation", "num_workers", "use_gpu")


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
               "Δ 4&5 vs the round's policy (paired)"]  # fmt: skip
EVAL_NOTE = ("Greedy answers to the headline held-out set, judged 1-5: 5 points is the share scoring 5, 4&5 points the "
             "share scoring 4 or 5 (answers the judge could not score left out), each with its 95% bootstrap interval "
             "[low, high] over the prompts; Δ in percentage points against the round's policy on the same prompts, "
             "with its paired 95% interval: a difference whose interval includes 0 is not distinguishable from noise. "
             "\"-\": not evaluated yet.")  # fmt: skip


def _point_delta(summary: dict | None, base: dict | None) -> dict | None:
    """The difference of the summaries' shares, without an interval (answers not on disk)."""
    if not summary or not base or summary.get("4&5_points") is None or base.get("4&5_points") is None:
        return None
    return {"diff": summary["4&5_points"] - base["4&5_points"], "low": None, "high": None, "prompts": None}


def eval_rows(cfg: RunConfig, data: RunData) -> list[dict[str, Any]]:
    """Table 2's rows: each round's policy, then its policy variants' checkpoints in config order,
    with their summary (None where not evaluated) and the paired Δ 4&5 points against the round's
    policy on the headline set (None where either has no answers)."""
    rows, name = [], headline_set(cfg)
    for r in data.rounds:
        base = data.evals.get((r, POLICY))
        rows.append({"round": r, "part": POLICY, "model": policy_label(cfg, r), "scenario": None, "method": None,
                     "summary": base, "paired": None})  # fmt: skip
        for variant, tc in cfg.policy_trains().items():
            summary = data.evals.get((r, variant))
            paired = paired_delta(data.answers.get((r, POLICY)), data.answers.get((r, variant)), name, "4&5_points",
                                  cfg.evaluate.bootstrap) or _point_delta(summary, base)  # fmt: skip
            rows.append({"round": r, "part": variant, "model": f"round-{r}/{variant}", "scenario": tc.scenario,
                         "method": method_label(tc), "summary": summary, "paired": paired})  # fmt: skip
    return rows


def eval_table(rows: list[dict[str, Any]]) -> list[str]:
    body = []
    for row in rows:
        s, own = row["summary"] or {}, row["part"] == POLICY  # the round's policy: no scenario, method, Δ
        body.append([str(row["round"]), row["model"], "" if own else scenario_name(row["scenario"]),
                     "" if own else row["method"], interval(s.get("5_points"), s.get("5_points_ci")),
                     interval(s.get("4&5_points"), s.get("4&5_points_ci")), _num(s.get("mean_score"), ".2f"),
                     _num(s.get("response_tokens"), ".0f"), "" if own else delta_cell(row["paired"])])  # fmt: skip
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
    """The held-out table (markdown) and whether each checkpoint's difference is real, printed at
    the end of a run."""
    data = load_run(local_run_dir(run_dir), cfg)
    if not data.rounds:
        return "(no round has started yet)"
    rows = eval_rows(cfg, data)
    return "\n".join([*eval_table(rows), "", EVAL_NOTE, "", *verdict_lines(rows)]).rstrip()


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
        if image.is_file():  # copied beside report.md: the page inlines only its own folder's images
            copy = report_dir / f"confusion-{path.parent.name}.png"
            shutil.copyfile(image, copy)
            parts += [f"![{names[0]} vs {names[1]}]({copy.name})", ""]
    return parts


# What the report never reads: an object-store run dir is copied down without them.
def run_body(cfg: RunConfig, run_dir: Path, out: Path) -> list[str]:
    """Every section of one run's report below its header, plots written into `out`."""
    data = load_run(run_dir, cfg)
    rows = eval_rows(cfg, data)
    return ["## Held-out evaluation (greedy, judged 1-5)", "", *eval_table(rows), "", EVAL_NOTE, "",
            *verdict_lines(rows), *unscored_note(rows), *image(plot_scores(rows, out), "held-out scores"),
            *sets_section(cfg, data), *forgetting_section(cfg, data, out),
            *onpolicy_section(cfg, data), *image(plot_logps(cfg, data, out), "log-probs before and after training"),
            *diagnostics_section(cfg, data), *diversity_section(cfg, data, out),
            *methods_section(cfg, rows), *ogd_section(cfg, data, out), *ropo_section(cfg, data, out),
            *held_out_section(cfg, data, out), *data_section(cfg, data),
            "## Training", "", *image(plot_training(data, out), "training curves"), *training_lines(data), "",
            "3D diagnostics (seed 003 Figure 10): per-token log-probs, |∂L/∂logp| per pair, and the parameter-gradient "
            "norms of the chosen and rejected terms.", "",
            *image(plot_training(data, out, DIAGNOSTIC_CURVES, "diagnostics.png"), "3D diagnostics"),
            *agreement_section(run_dir, out), *toy_section(run_dir, out)]  # fmt: skip


def _publish(out: Path, parts: list[str]) -> Path:
    """report.md and its self-contained index.html (every image inline), each written atomically."""
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts) + "\n")
    write_html(report)
    return report


def write_report(cfg: RunConfig, run_dir: Location) -> Location:
    """report/report.md, report/index.html and the plots, from the finished stage folders; for an
    object-store run dir written on a local copy and uploaded to RUN_DIR/report/."""
    remote = location(run_dir)
    run_dir = local_run_dir(remote)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    _publish(out, [*header(cfg), "", *run_body(cfg, run_dir, out)])
    upload(out, join(remote, "report"))  # (nothing to do for a local run dir)
    return join(remote, "report", "report.md")


def load_run_config(run_dir: Location) -> RunConfig:
    """The config a run was started with (`RUN_DIR/config.yaml`, written by `run` and `stage`)."""
    from pipeline.config import load_config

    local = local_run_dir(run_dir)
    if not (local / "config.yaml").is_file():
        raise UserError(f"{run_dir}: no config.yaml; is it a run dir (`python -m pipeline run --run-dir {run_dir} CONFIG`)?")
    return load_config(str(local / "config.yaml"), [])


def write_side_by_side(run_dirs: list[Location], out: Path) -> Path:
    """Several runs in one report (`python -m pipeline report RUN_DIR RUN_DIR ...`): their headline
    tables as one, with the paired intervals and verdicts, their forgetting, then each run's whole
    report under its name (its plots in `out/<run>/`)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [(Path(str(d)).name, load_run_config(d), local_run_dir(d)) for d in run_dirs]
    names = [name for name, _, _ in runs]
    if len(set(names)) < len(names):
        raise UserError(f"report: the run dirs need distinct folder names (their sections are named by them), got {names}")
    table, verdicts, forgetting, bodies = [], [], [], []
    for name, cfg, local in runs:
        data = load_run(local, cfg)
        rows = eval_rows(cfg, data)
        table += [f"| {name} " + line for line in eval_table(rows)[2:]]
        verdicts += [f"- {name}: " + line[2:] for line in verdict_lines(rows) if line]
        forgetting += [f"| {name} | {row['label']} | {_num(row['tax'], '+.1f')} |" for row in forgetting_rows(cfg, data)
                       if row["tax"] is not None]  # fmt: skip
        (out / name).mkdir(exist_ok=True)
        body = run_body(cfg, local, out / name)
        bodies += [f"## Run {name}", "", *header(cfg)[2:], "",
                   *(("#" + line) if line.startswith("#") else re.sub(r"^!\[(.*)\]\((.*)\)$", rf"![\1]({name}/\2)", line)
                     for line in body)]  # fmt: skip
    head = markdown_table(["run", *EVAL_HEADER], [], "lrlllrrrrr")
    parts = [f"# Runs side by side: {', '.join(names)}", "", "## Held-out evaluation", "", *head, *table, "",
             EVAL_NOTE, "", *verdicts, ""]  # fmt: skip
    if forgetting:
        parts += ["## Forgetting (TAX against each run's initial policy)", "", "| run | model | TAX |", "|---|---|---:|",
                  *forgetting, ""]  # fmt: skip
    return _publish(out, parts + bodies)


