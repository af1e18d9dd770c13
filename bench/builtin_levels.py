"""How often the policy solves each built-in math template (or level): the data behind `data.levels`.

    .venv/bin/python bench/builtin_levels.py --prompts 24              # one row per template
    .venv/bin/python bench/builtin_levels.py --prompts 24 --levels     # one row per level
        [--config configs/default.yaml] [--templates add,sum] [--split train] [--seed 0] [--save F.parquet]
        [sampler.gpu_memory_utilization=0.1 ...]    # config overrides, as `python -m pipeline run` takes them

For every group (a template of `pipeline.data.TEMPLATES`, or with `--levels` a level of
`pipeline.data.LEVELS`, drawn the way `data.levels: [L]` draws) it takes the first P problems
of the split, samples `sampler.n` candidates per problem with the pipeline's own sample stage
(`stages.sample.vllm.generate`: Ray Data + `ray.data.llm`, on a local Ray cluster) and the
config's policy and sampler settings (n, temperature, top_p, max_tokens, prompt template, engine
seed; read when the bench starts, so pin the ones a comparison depends on with overrides, e.g.
`sampler.temperature=0.8 sampler.max_tokens=160`), all groups in ONE call so the engine starts
once, and scores them with the verifier judge's own code (`stages.judge.verifier.score_frame`,
the rules of `stages/judge/math_rules.py`). The JSON line records the settings used.

Columns of the table (one row per group, then `all`):
- solve rate: share of candidates scoring 5 (correct final answer, working shown);
- 4&5: share scoring 4 or 5 (correct final answer, working shown or not);
- ≥1 correct: share of prompts with at least one candidate scoring 5;
- usable contrast: share of prompts with at least one candidate scoring 5 AND at least one
  scoring 3 or less (wrong or no final answer): the prompts whose best-vs-worst pair contrasts
  a right answer with a wrong one;
- tokens: mean response tokens (EOS included when the policy stopped); cut: share of candidates
  that `max_tokens` cut off.
Prints the markdown table and one JSON line (`BUILTIN_LEVELS_RESULT {...}`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULT_PREFIX = "BUILTIN_LEVELS_RESULT "
ROOT = Path(__file__).resolve().parent.parent


def groups_of(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Group name -> its first P problems, prompt ids made unique across groups."""
    from pipeline.data import LEVELS, TEMPLATES, math_problems, template_problems

    if args.levels:
        drawn = {f"level {lv}": math_problems(args.prompts, args.seed, args.split, [lv]) for lv in sorted(LEVELS)}
    else:
        names = args.templates.split(",") if args.templates else list(TEMPLATES)
        drawn = {t: template_problems([t], args.prompts, args.seed, args.split) for t in names}
    return {g: [{**r, "prompt_id": f"{g.replace(' ', '')}-{i:03d}"} for i, r in enumerate(rows)]
            for g, rows in drawn.items()}


def summarise(scored, n_prompts: int) -> dict:
    per_prompt = scored.groupby("prompt_id")["score"]
    return {
        "prompts": n_prompts,
        "candidates": len(scored),
        "solve_rate": round(float((scored["score"] == 5).mean()), 3),
        "correct_4_or_5": round(float((scored["score"] >= 4).mean()), 3),
        "any_correct": round(float(per_prompt.apply(lambda s: (s == 5).any()).mean()), 3),
        "usable_contrast": round(float(per_prompt.apply(lambda s: (s == 5).any() and (s <= 3).any()).mean()), 3),
        "mean_tokens": round(float(scored["response_tokens"].mean()), 1),
        "cut": round(float((scored["finish_reason"] == "length").mean()), 3),
        "scores": {int(k): int(v) for k, v in scored["score"].value_counts().sort_index().items()},
    }


def table(rows: dict[str, dict], what: str) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"| {what} | prompts | candidates | solve rate (5) | 4&5 | ≥1 correct | usable contrast | tokens | cut |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['prompts']} | {r['candidates']} | {pct(r['solve_rate'])} | "
                     f"{pct(r['correct_4_or_5'])} | {pct(r['any_correct'])} | {pct(r['usable_contrast'])} | "
                     f"{r['mean_tokens']} | {pct(r['cut'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (e.g. a smaller KV cache "
                        "on a machine short of memory: sampler.gpu_memory_utilization=0.1)")
    parser.add_argument("--prompts", type=int, default=24, help="problems per template (or level)")
    parser.add_argument("--levels", action="store_true", help="one row per level instead of per template")
    parser.add_argument("--templates", default=None, help="comma-separated template names (default: all)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--split", default="train", choices=["train", "eval"])
    parser.add_argument("--seed", type=int, default=0, help="the problems' seed (the engine's is the config's)")
    parser.add_argument("--save", default=None, help="also write the scored candidates (with `group`) to this Parquet file")
    args = parser.parse_args()

    import pandas as pd
    import ray

    from pipeline.config import load_config
    from pipeline.models import resolve_model
    from stages.judge.verifier import score_frame
    from stages.sample.vllm import generate

    cfg = load_config(args.config, args.overrides)
    if cfg.sampler.type != "vllm" or cfg.judge.type != "verifier":
        raise SystemExit(f"{args.config}: this bench needs sampler.type vllm and judge.type verifier")
    groups = groups_of(args)
    group_of = {r["prompt_id"]: g for g, rows in groups.items() for r in rows}
    model_path = resolve_model(cfg.policy)
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    with tempfile.TemporaryDirectory(prefix="builtin-levels-") as tmp:
        generate(cfg.sampler, model_path, cfg.policy, [r for rows in groups.values() for r in rows], Path(tmp) / "sample")
        frame = pd.read_parquet(Path(tmp) / "sample")
    wall = time.perf_counter() - start
    ray.shutdown()
    scored = score_frame(frame, cfg.judge)
    scored["group"] = scored["prompt_id"].map(group_of)
    if args.save:
        scored.to_parquet(args.save)
    rows = {g: summarise(scored[scored["group"] == g], len(groups[g])) for g in groups}
    rows["all"] = summarise(scored, len(group_of))
    print(table(rows, "level" if args.levels else "template"))
    s = cfg.sampler
    print(RESULT_PREFIX + json.dumps({
        "config": args.config, "overrides": args.overrides, "policy": cfg.policy, "split": args.split, "seed": args.seed,
        "sampler": {"n": s.n, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                    "seed": s.seed, "dtype": s.dtype},
        "by": "level" if args.levels else "template", "groups": rows, "wall_s": round(wall, 1),
        "cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    main()
