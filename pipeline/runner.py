"""The stage graph, rounds and resume.

Each stage is a function `run(cfg, inputs, out_dir) -> stats`. The runner decides whether it
must run: a stage's *key* hashes the config blocks it reads and the keys of its inputs, so a
finished folder whose manifest carries the same key is skipped, and a config change re-runs the
stage and everything downstream of it. Round k > 0 samples from round k-1's checkpoint: that is
what makes the data on-policy.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.artifacts import atomic_dir, atomic_write_text, read_manifest, stage_dir
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.models import resolve_model

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # imported lazily: `python -m pipeline --help` must not import torch or vLLM
    config_blocks: tuple[str, ...]  # the parts of RunConfig the stage reads
    inputs: tuple[str, ...]  # earlier stages of the same round whose folders it reads

    def fn(self) -> Callable[[RunConfig, dict[str, str], Path], dict]:
        return importlib.import_module(self.module).run


STAGES = {
    s.name: s
    for s in (
        Stage("sample", "stages.sample", ("data", "sampler"), ()),
        Stage("judge", "stages.judge", ("judge",), ("sample",)),
        Stage("pairs", "stages.pairs", ("pairs",), ("judge",)),
        Stage("train", "stages.train", ("train",), ("pairs",)),
        Stage("evaluate", "stages.evaluate", ("data", "sampler", "judge", "evaluate"), ("pairs", "train")),
    )
}


def init_ray(cfg: RunConfig) -> None:
    """Join `ray.address` / `RAY_ADDRESS` (a cluster, `ray job submit`), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False)


class Runner:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()  # Ray workers have another cwd

    # ── what each stage reads ───────────────────────────────────────────────────────────────
    def policy(self, round_: int) -> tuple[str, str, str]:
        """(model path, display name, key) of the policy that round `round_` samples from."""
        if round_ == 0:
            return resolve_model(self.cfg.policy), self.cfg.policy, self.cfg.policy
        train = stage_dir(self.run_dir, round_ - 1, "train")
        manifest = read_manifest(train)
        if manifest is None:
            raise UserError(f"round {round_} samples from {train}/checkpoint, which does not exist: run round {round_ - 1} first")
        return str(train / "checkpoint"), f"round-{round_ - 1}", manifest["key"]

    def inputs(self, stage: Stage, round_: int) -> tuple[dict[str, str], dict[str, str]]:
        """(paths the stage reads, keys of those inputs)."""
        path, name, key = self.policy(round_)
        paths, keys = {"policy": path, "policy_name": name}, {"policy": key}
        for dep in stage.inputs:
            folder = stage_dir(self.run_dir, round_, dep)
            manifest = read_manifest(folder)
            if manifest is None:
                raise UserError(f"stage {stage.name!r} needs {folder}, which is not finished: run `stage {dep}` first")
            paths[dep], keys[dep] = str(folder), manifest["key"]
        return paths, keys

    def key(self, stage: Stage, input_keys: dict[str, str]) -> str:
        payload = {"stage": stage.name, "config": self.cfg.hash_of(*stage.config_blocks), "inputs": input_keys}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ── running ─────────────────────────────────────────────────────────────────────────────
    def run_stage(self, name: str, round_: int = 0, force: bool = False) -> Path:
        stage = STAGES[name]
        paths, input_keys = self.inputs(stage, round_)
        out = stage_dir(self.run_dir, round_, name)
        key = self.key(stage, input_keys)
        done = read_manifest(out)
        if done and done.get("key") == key and not force:
            log.info("round %d %s: up to date (%s), skipping", round_, name, out)
            return out
        log.info("round %d %s: running → %s", round_, name, out)
        init_ray(self.cfg)
        start = time.time()
        manifest = {"stage": name, "round": round_, "key": key, "config_hash": self.cfg.hash_of(*stage.config_blocks),
                    "inputs": input_keys}  # fmt: skip
        with atomic_dir(out, manifest) as tmp:
            stats = stage.fn()(self.cfg, paths, tmp)
            manifest["stats"] = stats
            manifest["seconds"] = round(time.time() - start, 1)
        log.info("round %d %s: done in %.0f s: %s", round_, name, time.time() - start, _brief(stats))
        return out

    def preflight(self) -> None:
        """Catch bad input before any work: the model resolves, both prompt splits load."""
        from pipeline.data import load_prompts

        resolve_model(self.cfg.policy)
        for split in ("train", "eval"):
            load_prompts(self.cfg.data, split)

    def run_all(self) -> Path:
        self.preflight()
        self.save_config()
        for round_ in range(self.cfg.rounds):
            for name in STAGES:
                self.run_stage(name, round_)
        from pipeline.report import write_report

        return write_report(self.cfg, self.run_dir)

    def save_config(self) -> None:
        import yaml

        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))


def _brief(stats: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (dict, list)))
