"""`python -m pipeline run|stage|report|compare-judges|toy`: the whole pipeline, one stage, the report,
two judges side by side on the same candidates, or the paper's toy model (no config, no Ray).

A `UserError` (bad config, missing file, malformed row) ends the command with one message and
exit status 2, no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import UserError

STAGE_NAMES = ("sample", "judge", "pairs", "train", "evaluate")

EPILOG = """\
examples:
  python -m pipeline run configs/default.yaml
  python -m pipeline run configs/tiny.yaml train.lr=1e-5 sampler.n=4 --run-dir runs/try
  python -m pipeline stage judge configs/default.yaml          # one stage, on existing inputs
  python -m pipeline stage train configs/scenarios.yaml --part s2   # one variant's training
  python -m pipeline report runs/default                         # report.md + index.html of one run
  python -m pipeline report runs/a runs/b --out runs/a-vs-b      # several runs side by side
  python -m pipeline compare-judges configs/default.yaml --judge verifier.yaml --judge gpt4o.yaml --limit 20
  python -m pipeline toy --out runs/toy --seed 0               # the paper's toy model (§3.2), ~30 s

Finished stages are skipped when their config and inputs are unchanged, so rerunning a killed
run resumes it. The run directory holds round-K/<stage>/<part>/ folders (sample/policy,
pairs/s1, train/s1, evaluate/s1, ...) and report/report.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Preference optimisation with on-policy data: sample → judge → pairs → train → evaluate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,stage,report,compare-judges,toy}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML run config, e.g. configs/default.yaml")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-5")
        p.add_argument("--run-dir", default=None, metavar="PATH|URI",
                       help="where artifacts go: a folder (shared storage on a cluster) or s3://, gs://, abfs:// (default: runs/<config name>/)")

    run = sub.add_parser("run", help="run every stage of every round, skipping finished ones, then write the report",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(run)
    stage = sub.add_parser("stage", help="run one stage on the existing inputs in the run directory",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage.add_argument("name", choices=STAGE_NAMES, help="the stage to run")
    common(stage)
    stage.add_argument("--round", type=int, default=0, help="which round (default 0)")
    stage.add_argument("--part", default=None, metavar="PART",
                       help="only this part: a source for sample and judge (policy, reference, other), a variant for "
                       "train and evaluate (or `policy`: evaluate the round's policy); default: every part")
    stage.add_argument("--force", action="store_true", help="run even if the stage is up to date")
    report = sub.add_parser(
        "report", help="(re)write report/report.md and report/index.html from the finished stages, of one run or several",
        description="One run: RUN_DIR/report/ (report.md, index.html with every plot inline, the PNGs). Several runs:\n"
        "one report with their tables side by side, in --out. A run dir carries its config (config.yaml);\n"
        "the older form `report CONFIG [overrides] [--run-dir D]` still works.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    report.add_argument("targets", nargs="+", metavar="RUN_DIR", help="run dirs (or: a YAML config and its overrides)")
    report.add_argument("--run-dir", default=None, metavar="PATH|URI", help="with a config: its run dir")
    report.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="several runs: where the side-by-side report goes (default runs/side-by-side)")
    compare = sub.add_parser(
        "compare-judges", help="score one round's candidates with two judges and measure their agreement (κ)",
        description="Score the same candidates (a finished round-K/sample folder) with two judges and write\n"
        "RUN_DIR/compare-judges/<A>-vs-<B>/ (scores.parquet, agreement.json, confusion.png):\n"
        "can the verifier, or a cheaper model, stand in for GPT-4 on this data?",
        epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    common(compare)
    compare.add_argument("--judge", action="append", type=Path, default=[], metavar="FILE", required=True,
                         help="a YAML file with one judge block (type: verifier | openai | reward_model, ...) or a "
                         "run config with a judge: block; give exactly two, A then B (named by their file stems)")  # fmt: skip
    compare.add_argument("--round", type=int, default=0, help="whose candidates (default 0)")
    compare.add_argument("--limit", type=_positive, default=None, metavar="N",
                         help="only the first N prompts' candidates (all of them per prompt), to keep API cost down")
    compare.set_defaults(subparser=compare)
    toy = sub.add_parser("toy", help="the paper's toy model (3D-properties §3.2): curves, claims, figures; no config",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    toy.add_argument("--out", type=Path, default=Path("runs/toy"), metavar="DIR", help="output folder (default runs/toy)")
    toy.add_argument("--seed", type=int, default=0, help="seed of the MLPs' initialisation (default 0)")
    return parser


COMPARE_EPILOG = """\
example:
  python -m pipeline stage sample configs/default.yaml          # the candidates, if not there yet
  printf 'type: verifier\\n' > verifier.yaml
  printf 'type: openai\\nmodel: gpt-4o\\n' > gpt4o.yaml
  python -m pipeline compare-judges configs/default.yaml --judge verifier.yaml --judge gpt4o.yaml --limit 20

Prints the confusion matrix (rows: the first judge's score), exact agreement, Cohen's κ and the
quadratic-weighted κ. `python -m pipeline report` adds every comparison to report/report.md.
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare-judges" and len(args.judge) != 2:
        args.subparser.error(f"give exactly two --judge files (A and B), got {len(args.judge)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "toy":  # no config, no Ray
        from pipeline.toy import claims_table, write_toy

        print(claims_table(write_toy(args.out, seed=args.seed)))
        print(f"toy model: {args.out}")
        return 0
    try:
        if args.command == "report" and not _is_config(args.targets[0]):
            return _report_runs(args.targets, args.out)
        if args.command == "report":
            args.config, args.overrides = args.targets[0], args.targets[1:]
        return _dispatch(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _is_config(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) and not Path(target).is_dir()


def _report_runs(run_dirs: list[str], out: Path | None) -> int:
    """`report RUN_DIR [RUN_DIR ...]`: each run's own config, from its folder."""
    from pipeline.report import headline, load_run_config, write_report, write_side_by_side

    if len(run_dirs) == 1:
        cfg = load_run_config(run_dirs[0])
        print(f"\nreport: {write_report(cfg, run_dirs[0])}\n")
        print(headline(run_dirs[0], cfg))
        return 0
    print(f"report: {write_side_by_side(run_dirs, out or Path('runs/side-by-side'))}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.runner import Runner

    cfg = load_config(args.config, args.overrides)
    from pipeline import quiet

    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        quiet.before_ray_import()  # a local cluster: Ray reads these variables when it is imported
    else:
        quiet.before_joining_cluster()  # `ray job submit`: the cluster is the user's
    run_dir = args.run_dir or Path("runs") / cfg.name
    if args.command == "compare-judges":
        from pipeline.compare import compare_judges, format_comparison

        comparison = compare_judges(cfg, run_dir, args.judge, round_=args.round, limit=args.limit, config_path=args.config)
        print(format_comparison(comparison, config_path=args.config))
        return 0
    runner = Runner(cfg, run_dir, config_path=args.config)
    if args.command == "run":
        report = runner.run_all()
    elif args.command == "stage":
        if not 0 <= args.round < cfg.rounds:
            raise UserError(f"--round {args.round}: this config has rounds 0..{cfg.rounds - 1}")
        runner.preflight((args.name,))
        outs = runner.run_stage(args.name, args.round, force=args.force, part=args.part)
        runner.save_config()  # after the input checks: a refused stage leaves the run's config as it was
        print("\n".join(map(str, outs)))
        return 0
    else:
        from pipeline.report import write_report

        report = write_report(cfg, run_dir)
    from pipeline.report import headline

    print(f"\nreport: {report}\n")
    print(headline(run_dir, cfg))
    return 0
