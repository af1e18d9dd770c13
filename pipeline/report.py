"""report/report.md: the headline table, data statistics and plots, from finished stages only.

Reads what the stages wrote (manifests, `metrics.jsonl`, `summary.json`) and never re-runs
anything, so `python -m pipeline report CONFIG` is instant and works on a partial run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_text, read_manifest, stage_dir
from pipeline.config import RunConfig

# logps/* vary with each batch's pairs; rewards/* = β·(logp − ref_logp) show the drift from the
# reference on the same pairs, where a drastic drop of the rejected side is easiest to see.
TRAIN_CURVES = (
    ("logps/chosen", "logps/rejected"),
    ("rewards/chosen", "rewards/rejected"),
    ("loss",),
    ("rewards/margins", "rewards/accuracies"),
)


def _rounds(run_dir: Path, rounds: int) -> list[int]:
    """The config's rounds that have a folder: a round dropped from the config (`rounds` lowered)
    may still be on disk, but it is not part of this run."""
    return [r for r in range(rounds) if (Path(run_dir) / f"round-{r}").is_dir()]


def _metrics(train_dir: Path) -> list[dict[str, Any]]:
    path = train_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def headline_rows(run_dir: Path, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for r in _rounds(run_dir, rounds):
        summary_file = stage_dir(run_dir, r, "evaluate") / "summary.json"
        if not summary_file.is_file():
            continue
        for name, s in json.loads(summary_file.read_text()).items():
            if r > 0 and name == "before":
                continue  # the previous round's "after"
            label = "base" if (r == 0 and name == "before") else f"round-{r} checkpoint"
            rows.append({"round": r, **s, "model": label})
    return rows


def headline(run_dir: Path, rounds: int) -> str:
    """The table printed at the end of a run (markdown). Scores are held out; logps are not."""
    rows = headline_rows(run_dir, rounds)
    if not rows:
        return "(no evaluation yet)"
    lines = ["| model | 5 points | 4&5 points | mean score | answer tokens | logps/chosen (train pairs) | logps/rejected (train pairs) |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['5_points']:.1%} | {row['4&5_points']:.1%} | {row['mean_score']:.2f} "
            f"| {row['response_tokens']:.0f} | {row['logps/chosen']:.1f} | {row['logps/rejected']:.1f} |"
        )
    lines += ["", "Scores and answer tokens: greedy answers to the held-out prompts, judged 1-5. "
              "logps: mean log-probability of the round's own training pairs (in-sample, not held out)."]  # fmt: skip
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_training(run_dir: Path, rounds: int, out: Path) -> Path | None:
    plt = _pyplot()
    curves = {r: _metrics(stage_dir(run_dir, r, "train")) for r in _rounds(run_dir, rounds)}
    curves = {r: m for r, m in curves.items() if m}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(TRAIN_CURVES), figsize=(4.5 * len(TRAIN_CURVES), 3.6))
    for ax, keys in zip(axes, TRAIN_CURVES):
        for r, metrics in curves.items():
            steps = [m["step"] for m in metrics]
            for key in keys:
                ax.plot(steps, [m[key] for m in metrics], marker="o", ms=3, label=f"{key} (round {r})")
        ax.set_xlabel("step")
        ax.set_title(" vs ".join(keys))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "train_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(rows: list[dict[str, Any]], out: Path) -> Path | None:
    plt = _pyplot()
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    xs = range(len(rows))
    ax.bar([x - width / 2 for x in xs], [r["5_points"] for r in rows], width, label="5 points")
    ax.bar([x + width / 2 for x in xs], [r["4&5_points"] for r in rows], width, label="4&5 points")
    ax.set_xticks(list(xs), [r["model"] for r in rows], fontsize=8)
    ax.set_ylabel("share of held-out prompts")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out judge scores")
    fig.tight_layout()
    path = out / "eval_scores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def _usd(cost: float) -> str:
    return f"${cost:,.2f}" if cost >= 1 else f"${cost:.4f}" if cost >= 0.01 else f"${cost:.6f}"


def data_section(run_dir: Path, cfg: RunConfig) -> list[str]:
    """Per round: candidates, how many the judge scored, the score counts, the pairs and why prompts
    gave none; then the unscored rows' reasons and, for an API judge, its requests, tokens and cost.
    A manifest written before a key existed shows "-" there."""
    parts = ["## Data", "", "| round | prompts | candidates | scored / unscored | score counts (1..5) | pairs "
             "| dropped (uniform) | dropped (below min_margin) | dropped (unscored) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    reasons, requests = [], []
    for r in _rounds(run_dir, cfg.rounds):
        judge = (read_manifest(stage_dir(run_dir, r, "judge")) or {}).get("stats", {})
        pairs = (read_manifest(stage_dir(run_dir, r, "pairs")) or {}).get("stats", {})
        s1 = pairs.get(f"s{cfg.train.scenario}", {})
        counts = judge.get("score_counts", {})
        scored = f"{judge['scored']} / {judge['unscored']}" if "scored" in judge else "-"
        parts.append(f"| {r} | {_count(pairs.get('prompts'))} | {_count(judge.get('rows'))} | {scored} "
                     f"| {' / '.join(str(counts.get(str(k), counts.get(k, 0))) for k in range(1, 6)) if counts else '-'} "
                     f"| {_count(s1.get('pairs'))} | {_count(s1.get('dropped_uniform'))} | {_count(s1.get('dropped_margin'))} "
                     f"| {_count(s1.get('dropped_unscored'))} |")  # fmt: skip
        if judge.get("unscored_reasons"):
            kinds = sorted(judge["unscored_reasons"].items(), key=lambda kv: (-kv[1], kv[0]))
            reasons.append(f"round {r}: " + ", ".join(f"{kind} {n}" for kind, n in kinds))
        if "requests" in judge:
            cost = judge.get("cost_usd")
            requests.append(f"| {r} | {judge['requests']} | {judge.get('retried', '-')} | {judge.get('cache_hits', '-')} "
                            f"| {judge.get('prompt_tokens', '-')} | {judge.get('completion_tokens', '-')} "
                            f"| {'no prices configured' if cost is None else _usd(cost)} |")  # fmt: skip
    parts.append("")
    if reasons:
        parts += [f"Unscored candidates by reason (they take no part in pairs): {'; '.join(reasons)}.", ""]
    if requests:
        parts += ["Judge requests (this run's requests only; a cache hit costs none):", "",
                  "| round | requests | retried rows | cache hits | prompt tokens | completion tokens | estimated cost |",
                  "|---|---:|---:|---:|---:|---:|---:|", *requests, ""]  # fmt: skip
    return parts


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


def plot_confusion(confusion: Any, labels: list[int], names: tuple[str, str], path: Path) -> Path:
    """A heatmap of the confusion matrix with the count in each cell; rows = judge A's score."""
    import numpy as np

    plt = _pyplot()
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    ticks = list(range(len(labels)))
    ax.set_xticks(ticks, [str(x) for x in labels])
    ax.set_yticks(ticks, [str(x) for x in labels])
    ax.set_xlabel(f"{names[1]} score")
    ax.set_ylabel(f"{names[0]} score")
    for i, j in np.ndindex(cm.shape):
        dark = cm.max() > 0 and cm[i, j] > cm.max() / 2
        ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set_title(f"{names[0]} vs {names[1]} (n = {int(cm.sum())})")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def write_report(cfg: RunConfig, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = headline_rows(run_dir, cfg.rounds)
    curves, scores = plot_training(run_dir, cfg.rounds, out), plot_scores(rows, out)
    parts = [f"# Report: {cfg.name}", "",
             f"Policy `{cfg.policy}`, method `{cfg.train.method.type}` "
             f"({', '.join(f'{k}={v}' for k, v in cfg.train.method.model_dump().items() if k != 'type')}), "
             f"{cfg.rounds} round(s), sampler `{cfg.sampler.type}` n={cfg.sampler.n}, judge `{cfg.judge.type}`.", "",
             "## Held-out evaluation (greedy, judged 1-5)", "", headline(run_dir, cfg.rounds), ""]  # fmt: skip
    if scores:
        parts += [f"![held-out scores]({scores.name})", ""]
    parts += data_section(run_dir, cfg)
    parts += ["", "## Training", ""]
    if curves:
        parts += [f"![training curves]({curves.name})", ""]
    for r in _rounds(run_dir, cfg.rounds):
        metrics = _metrics(stage_dir(run_dir, r, "train"))
        if metrics:
            first, last = metrics[0], metrics[-1]
            parts.append(f"- round {r}: {len(metrics)} steps; loss {first['loss']:.4f} → {last['loss']:.4f}; "
                         f"logps/chosen {first['logps/chosen']:.1f} → {last['logps/chosen']:.1f}; "
                         f"logps/rejected {first['logps/rejected']:.1f} → {last['logps/rejected']:.1f}; "
                         f"rewards/accuracies (last step) {last['rewards/accuracies']:.2f}")  # fmt: skip
    parts += ["", *agreement_section(run_dir, out)]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts) + "\n")
    return report
