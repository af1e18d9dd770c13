"""`python -m pipeline run|stage|report`: the whole pipeline, one stage, or just the report.

A `UserError` (bad config, missing file, malformed row) ends the command with one message and
exit status 2, no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.errors import UserError

STAGE_NAMES = ("sample", "judge", "pairs", "train", "evaluate")

EPILOG = """\
examples:
  python -m pipeline run configs/default.yaml
  python -m pipeline run configs/tiny.yaml train.lr=1e-5 sampler.n=4 --run-dir runs/try
  python -m pipeline stage judge configs/default.yaml          # one stage, on existing inputs
  python -m pipeline report configs/default.yaml

Finished stages are skipped when their config and inputs are unchanged, so rerunning a killed
run resumes it. The run directory holds round-K/<stage>/ folders and report/report.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Preference optimisation with on-policy data: sample → judge → pairs → train → evaluate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,stage,report}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML run config, e.g. configs/default.yaml")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-5")
        p.add_argument("--run-dir", type=Path, default=None, help="where artifacts go (default: runs/<config name>/)")

    run = sub.add_parser("run", help="run every stage of every round, skipping finished ones, then write the report",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(run)
    stage = sub.add_parser("stage", help="run one stage on the existing inputs in the run directory",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage.add_argument("name", choices=STAGE_NAMES, help="the stage to run")
    common(stage)
    stage.add_argument("--round", type=int, default=0, help="which round (default 0)")
    stage.add_argument("--force", action="store_true", help="run even if the stage is up to date")
    report = sub.add_parser("report", help="(re)write report/report.md from the finished stages")
    common(report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.runner import Runner

    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / cfg.name
    runner = Runner(cfg, run_dir, config_path=args.config)
    if args.command == "run":
        report = runner.run_all()
    elif args.command == "stage":
        if not 0 <= args.round < cfg.rounds:
            raise UserError(f"--round {args.round}: this config has rounds 0..{cfg.rounds - 1}")
        runner.preflight()
        out = runner.run_stage(args.name, args.round, force=args.force)
        runner.save_config()  # after the input checks: a refused stage leaves the run's config as it was
        print(out)
        return 0
    else:
        from pipeline.report import write_report

        report = write_report(cfg, run_dir)
    from pipeline.report import headline

    print(f"\nreport: {report}\n")
    print(headline(run_dir, cfg.rounds))
    return 0
