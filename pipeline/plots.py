"""The report's figures: pure functions from the report's tables to PNG files.

Each takes what `pipeline.report` built (its eval rows, `RunData`, a confusion matrix) and a folder
or path, draws with matplotlib's file-only Agg backend, and returns the PNG's path, or None where
there is nothing to draw yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.rundata import RunData

# logps/* vary with each batch's pairs; rewards/* = β·(logp − ref_logp) show the drift from the
# reference on the same pairs, where a drastic drop of the rejected side is easiest to see.
TRAIN_CURVES = (
    ("logps/chosen", "logps/rejected"),
    ("rewards/chosen", "rewards/rejected"),
    ("loss",),
    ("rewards/margins", "rewards/accuracies"),
)
# The 3D-properties as they happen (seed 003 Figure 10), for any method: the per-token log-probs
# (length-free), the objective's |∂L/∂logp(y±)| per pair, and the parameter-gradient norms of the
# chosen and rejected terms (every `train.diagnostics_every` steps).
DIAGNOSTIC_CURVES = (
    ("logps/chosen_per_token", "logps/rejected_per_token"),
    ("grads/chosen_logps", "grads/rejected_logps"),
    ("grad_norm/chosen", "grad_norm/rejected"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _value(d: dict | None, key: str) -> float:
    v = (d or {}).get(key)
    return float("nan") if v is None else v


def _error_bars(rows: list[dict[str, Any]], key: str, values: list[float]) -> list[list[float]] | None:
    """matplotlib's yerr (below, above) from each summary's 95% interval (`<key>_ci`); 0 where none."""
    cis = [(r["summary"] or {}).get(f"{key}_ci") for r in rows]
    if not any(cis):
        return None
    # clipped at 0: a percentile interval need not contain its estimate exactly
    return [[max(0.0, v - ci[0]) if ci else 0.0 for v, ci in zip(values, cis)],
            [max(0.0, ci[1] - v) if ci else 0.0 for v, ci in zip(values, cis)]]  # fmt: skip


def plot_scores(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Grouped bars (5 points, 4&5 points) per evaluated row with their 95% intervals; every other
    round shaded."""
    rows = [row for row in rows if row["summary"]]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 3.8))
    xs, width = range(len(rows)), 0.38
    for shift, key in ((-width / 2, "5_points"), (width / 2, "4&5_points")):
        values = [_value(r["summary"], key) for r in rows]
        ax.bar([x + shift for x in xs], values, width, label=key.replace("_", " "), yerr=_error_bars(rows, key, values),
               error_kw={"elinewidth": 0.8, "capsize": 2})  # fmt: skip
    ax.set_xticks(list(xs), [f"round {r['round']}\n{r['part']}" for r in rows], fontsize=8)
    for i, round_ in enumerate(sorted({r["round"] for r in rows})):
        if i % 2:
            at = [x for x, r in zip(xs, rows) if r["round"] == round_]
            ax.axvspan(min(at) - 0.5, max(at) + 0.5, color="0.92", zorder=0)
    ax.set_ylabel("share of held-out prompts")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out judge scores (95% intervals): each round's policy, then its variants")
    return _save(fig, out / "eval_scores.png")


def plot_logps(cfg: RunConfig, data: RunData, out: Path) -> Path | None:
    """Per scenario: before vs after bars of chosen and rejected per-token logps, per (round, variant)."""
    from pipeline.tables import scenario_name

    key = "logps_per_token/"
    by_scenario: dict[int, list[tuple[str, dict, dict]]] = {}
    for r in data.rounds:
        for name, tc in cfg.trains().items():
            s = data.evals.get((r, name)) or {}
            if s.get("before") and s.get("after"):
                by_scenario.setdefault(tc.scenario, []).append((f"r{r}/{name}", s["before"], s["after"]))
    if not by_scenario:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(by_scenario), figsize=(4.8 * len(by_scenario), 3.8), squeeze=False)
    for ax, (k, entries) in zip(axes[0], sorted(by_scenario.items())):
        labels = [f"{label}\n{side}" for label, _, _ in entries for side in ("chosen", "rejected")]
        before = [_value(b, key + side) for _, b, _ in entries for side in ("chosen", "rejected")]
        after = [_value(a, key + side) for _, _, a in entries for side in ("chosen", "rejected")]
        xs, width = range(len(labels)), 0.38
        ax.bar([x - width / 2 for x in xs], before, width, label="before (round's policy)", color="0.6")
        ax.bar([x + width / 2 for x in xs], after, width, label="after (checkpoint)", color="tab:blue")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"scenario {scenario_name(k)}")
        ax.set_ylabel("mean log-prob per token")
        ax.legend(fontsize=7)
    return _save(fig, out / "logps.png")


def plot_training(data: RunData, out: Path, curves: tuple[tuple[str, ...], ...] = TRAIN_CURVES,
                  name: str = "train_curves.png") -> Path | None:  # fmt: skip
    """One line per (round, variant) and metric; colour = (round, variant), line style = metric.
    Steps without a metric (the gradient norms between diagnostic steps) are skipped, not zero."""
    if not data.metrics or not any(key in m for keys in curves for key in keys for ms in data.metrics.values() for m in ms):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, keys in zip(axes[0], curves):
        for colour, ((r, variant), metrics) in enumerate(data.metrics.items()):
            for style, key in zip(("-", "--"), keys):
                points = [(m.get("step", i), m[key]) for i, m in enumerate(metrics) if m.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{colour % 10}", marker="o", ms=3,
                            label=f"{key} (r{r}/{variant})")  # fmt: skip
            for m in metrics:  # where the train guard fired (stages/train/guard.py)
                if m.get("guard"):
                    ax.axvline(m["step"], color=f"C{colour % 10}", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_title(" vs ".join(keys))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel can be empty (no diagnostic step yet)
            ax.legend(fontsize=7)
    return _save(fig, out / name)


def plot_he_change(geometry: dict[str, list[dict]], out: Path) -> Path | None:
    """Per model (label → evaluate's geometry rows), the relative change of hyperspherical energy
    per decoder layer: the mean over the layer's matrices, signed, one line per model."""
    if not geometry:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    for colour, (label, rows) in enumerate(geometry.items()):
        layers = sorted({row["layer"] for row in rows})
        change = [sum(r["he_relative_change"] for r in rows if r["layer"] == k) / sum(1 for r in rows if r["layer"] == k)
                  for k in layers]  # fmt: skip
        ax.plot(layers, change, "-o", ms=3, color=f"C{colour % 10}", label=label)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("(HE after − HE before) / HE before")
    ax.set_title("hyperspherical energy change per layer (mean over its matrices)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "he_change.png")


def plot_forgetting(accuracy: dict[str, dict[str, float]], out: Path) -> Path | None:
    """Grouped bars: accuracy per forgetting task (x), one bar per model (label → {task: accuracy})."""
    if not accuracy:
        return None
    plt = _pyplot()
    tasks = list(dict.fromkeys(t for acc in accuracy.values() for t in acc))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) * max(1, len(accuracy)) ** 0.5 + 2), 3.6))
    width = 0.8 / len(accuracy)
    for i, (label, acc) in enumerate(accuracy.items()):
        xs = [k + (i - (len(accuracy) - 1) / 2) * width for k in range(len(tasks))]
        ax.bar(xs, [acc.get(t, float("nan")) for t in tasks], width, label=label, color=f"C{i % 10}")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("forgetting tasks (not trained on)")
    ax.legend(fontsize=7)
    return _save(fig, out / "forgetting.png")


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
