"""The runner's keys: what re-runs a stage, what counts as a stale input, and the messages.

A stage's key must change with its config blocks, the content of the files they name, its code
and its inputs' keys — and with nothing else. Stage folders are faked with `atomic_dir` and the
key the runner expects, so these tests need no Ray and no model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline.artifacts import atomic_dir
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.runner import Node, Runner


def _model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    if not folder.is_dir():  # once: rewriting it would change its fingerprint
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights-v1")
    return folder


def _prompts(tmp_path: Path, text: str = '{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": "4"}\n') -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    return path


def _cfg(tmp_path: Path, **update) -> RunConfig:
    raw = {"policy": str(_model(tmp_path)),
           "data": {"type": "file", "path": str(_prompts(tmp_path)), "eval_fraction": 0.5,
                    "fields": {"answer": "answer"}}, **update}  # fmt: skip
    return RunConfig.model_validate(raw)


# the part each stage's single-part tests use: the policy's candidates, the default variant s1
_PART = {"sample": "policy", "judge": "policy", "pairs": None, "train": "s1", "evaluate": "s1"}


def _node(stage: str, round_: int = 0, part: str | None = "default") -> Node:
    return Node(stage, round_, _PART[stage] if part == "default" else part)


def _finish(runner: Runner, name: str, round_: int = 0, part: str | None = "default") -> str:
    """A finished folder whose manifest carries the key the runner expects for it now."""
    node = _node(name, round_, part)
    key = runner.expected_key(node)
    with atomic_dir(node.folder(runner.run_dir),
                    {"key": key, "config_hash": runner.config_for(node).hash_of(*runner.blocks(node))}):  # fmt: skip
        pass
    return key


def _key(cfg: RunConfig, tmp_path: Path, stage: str, round_: int = 0, part: str | None = "default") -> str:
    return Runner(cfg, tmp_path / "run").expected_key(_node(stage, round_, part))


def test_a_stage_key_follows_its_config_blocks_and_nothing_else(tmp_path):
    base = _cfg(tmp_path)
    judge = _key(base, tmp_path, "judge")
    assert _key(base.model_copy(update={"train": base.train.model_copy(update={"lr": 1.0})}), tmp_path, "judge") == judge
    # the sampler is upstream of the judge: its change reaches the judge's key through the inputs
    sampler = base.sampler.model_copy(update={"n": 4})
    assert _key(base.model_copy(update={"sampler": sampler}), tmp_path, "judge") != judge
    train = _key(base, tmp_path, "train")
    assert _key(base.model_copy(update={"train": base.train.model_copy(update={"lr": 1.0})}), tmp_path, "train") != train


def test_editing_the_prompt_file_in_place_changes_the_sample_key(tmp_path):
    cfg = _cfg(tmp_path)
    sample, evaluate = _key(cfg, tmp_path, "sample"), _key(cfg, tmp_path, "evaluate")
    assert _key(cfg, tmp_path, "sample") == sample  # deterministic
    _prompts(tmp_path, '{"prompt": "1+1?", "answer": "2"}\n{"prompt": "3+3?", "answer": "6"}\n')
    assert _key(cfg, tmp_path, "sample") != sample
    assert _key(cfg, tmp_path, "evaluate") != evaluate


def test_new_weights_in_the_same_policy_folder_change_every_key(tmp_path):
    cfg = _cfg(tmp_path)
    keys = {name: _key(cfg, tmp_path, name) for name in _PART}
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(b"weights-v2")  # same size: the mtime tells them apart
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert all(_key(cfg, tmp_path, name) != key for name, key in keys.items())


def test_changing_the_judge_code_re_judges(tmp_path, monkeypatch):
    """The code fingerprint reads the modules' source: a different source, a different key."""
    import pipeline.runner as runner_module

    cfg = _cfg(tmp_path)
    judge, pairs = _key(cfg, tmp_path, "judge"), _key(cfg, tmp_path, "pairs")
    sample = _key(cfg, tmp_path, "sample")
    real = runner_module.code_fingerprint
    monkeypatch.setattr(runner_module, "code_fingerprint",
                        lambda modules, dists=(): real(modules, dists) + ("!" if "stages.judge" in modules else ""))
    assert _key(cfg, tmp_path, "judge") != judge
    assert _key(cfg, tmp_path, "pairs") != pairs  # downstream follows
    assert _key(cfg, tmp_path, "sample") == sample  # upstream does not


def test_code_fingerprint_reads_the_source(tmp_path, monkeypatch):
    from pipeline.fingerprint import code_fingerprint

    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "score.py").write_text("def score(x):\n    return 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = code_fingerprint(("mypkg",))
    (pkg / "score.py").write_text("def score(x):\n    return 4\n")
    assert code_fingerprint(("mypkg",)) != first


def test_a_stage_run_alone_refuses_inputs_that_are_stale_for_the_config(tmp_path):
    cfg = _cfg(tmp_path)
    runner = Runner(cfg, tmp_path / "run", config_path="my.yaml")
    with pytest.raises(UserError, match=r"not finished: run `python -m pipeline stage sample my.yaml --part policy` first"):
        runner.inputs(_node("judge"))
    for name in ("sample", "judge", "pairs"):
        _finish(runner, name)
    assert runner.inputs(_node("train"))["pairs"] == str(runner.run_dir / "round-0" / "pairs")
    # an edit of pairs.* after the pairs stage ran: train must not read the old pairs
    edited = cfg.model_copy(update={"pairs": cfg.pairs.model_copy(update={"min_margin": 2.0})})
    stale = Runner(edited, tmp_path / "run", config_path="my.yaml")
    with pytest.raises(UserError) as err:
        stale.inputs(_node("train"))
    message = str(err.value)
    assert "round-0/pairs, which is out of date with the config (its config (pairs) changed)" in message
    assert "`python -m pipeline stage pairs my.yaml`" in message and "`python -m pipeline run my.yaml`" in message
    # an upstream change (the prompt file) makes the whole chain stale, named as such
    _prompts(tmp_path, '{"prompt": "5+5?", "answer": "10"}\n{"prompt": "6+6?", "answer": "12"}\n')
    with pytest.raises(UserError, match="round-0/pairs, which is out of date .*upstream stage it depends on changed"):
        Runner(cfg, tmp_path / "run").inputs(_node("train"))


def test_round_k_samples_from_round_k_minus_1_checkpoint_and_checks_it(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    runner = Runner(cfg, tmp_path / "run")
    assert runner.policy(0)[0] == str((tmp_path / "model").resolve())
    assert runner.policy(1) == (str(runner.run_dir / "round-0" / "train" / "s1" / "checkpoint"), "round-0/s1")
    with pytest.raises(UserError, match=r"round-0/train/s1, which is not finished: run `python -m pipeline stage train"):
        runner.inputs(_node("sample", 1))
    for name in ("sample", "judge", "pairs", "train"):
        _finish(runner, name)
    assert runner.inputs(_node("sample", 1))["policy"].endswith("round-0/train/s1/checkpoint")
    # round 1's keys chain on round 0's train key: a retrained round 0 changes all of round 1
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1.0})})
    assert _key(other, tmp_path, "sample", 1) != _key(cfg, tmp_path, "sample", 1)
    with pytest.raises(UserError, match="round-0/train/s1, which is out of date"):
        Runner(other, tmp_path / "run").inputs(_node("sample", 1))


def test_top_level_seed_is_every_blocks_default_seed():
    cfg = RunConfig.model_validate({"seed": 7, "sampler": {"n": 4}, "pairs": {"seed": 3}})
    assert (cfg.data.seed, cfg.sampler.seed, cfg.train.seed) == (7, 7, 7)
    assert cfg.pairs.seed == 3  # a block's own seed wins
    assert cfg.sampler.n == 4 and cfg.sampler.type == "vllm"
    assert RunConfig().sampler.seed == 0
    # so the seed reaches the keys of the stages that use it
    assert RunConfig.model_validate({"seed": 7}).hash_of("sampler") != RunConfig().hash_of("sampler")


def test_preflight_rejects_an_empty_held_out_split_before_any_work(tmp_path):
    one_row = _cfg(tmp_path).model_copy(update={"data": _cfg(tmp_path).data.model_copy(update={"eval_fraction": 0.0})})
    with pytest.raises(UserError, match=r"held-out \(eval\) split is empty: data.eval_fraction=0.0 of 2 row"):
        Runner(one_row, tmp_path / "run").preflight()
    assert not (tmp_path / "run").exists()


def test_preflight_stops_a_verifier_run_on_prompts_without_answers(tmp_path):
    cfg = _cfg(tmp_path)
    no_answers = cfg.model_copy(update={"data": cfg.data.model_copy(update={"fields": cfg.data.fields.model_copy(update={"answer": None})})})
    with pytest.raises(UserError, match=r"data \(train split\): 1 of 1 rows have no reference answer .*data.fields.answer"):
        Runner(no_answers, tmp_path / "run").preflight()
    Runner(cfg, tmp_path / "run").preflight()  # with answers it passes


def test_a_stage_run_alone_checks_only_what_it_needs(tmp_path):
    cfg = _cfg(tmp_path, judge={"type": "openai", "model": "gpt-4o", "api_key_env": "PIPELINE_TEST_NEVER_SET"})
    runner = Runner(cfg, tmp_path / "run")
    runner.preflight(("sample",))
    runner.preflight(("pairs", "train"))  # no judge, no key needed
    for needs_the_judge in ("judge", "evaluate"):
        with pytest.raises(UserError, match="the environment variable PIPELINE_TEST_NEVER_SET is not set"):
            runner.preflight((needs_the_judge,))
    with pytest.raises(UserError, match="PIPELINE_TEST_NEVER_SET"):
        runner.preflight()  # a whole run checks every stage


# ── sources, variants, rounds ──────────────────────────────────────────────────────────────────
def _four(tmp_path: Path, **update) -> RunConfig:
    return _cfg(tmp_path, pairs={"scenarios": [1, 2, 3, 4]}, other_sampler={"temperature": 1.5}, **update)


def test_sources_and_variants_follow_the_scenarios(tmp_path):
    runner = Runner(_four(tmp_path), tmp_path / "run")
    assert runner.parts("sample") == runner.parts("judge") == ["policy", "reference", "other"]
    assert runner.parts("train") == ["s1", "s2", "s3", "s4"]
    assert runner.parts("evaluate") == ["policy", "s1", "s2", "s3", "s4"]
    assert [d.part for d in runner.deps(Node("pairs", 0))] == ["policy", "reference", "other"]
    assert runner.config_for(Node("train", 0, "s3")).train.scenario == 3
    assert runner.config_for(Node("sample", 0, "other")).sampler.temperature == 1.5
    only_one = Runner(_cfg(tmp_path), tmp_path / "run")
    assert only_one.parts("sample") == ["policy"] and only_one.parts("train") == ["s1"]
    with pytest.raises(UserError, match="stage train has no part 's9'"):
        only_one.nodes(0, "train", "s9")


def test_each_source_and_variant_has_its_own_key(tmp_path):
    """Editing the other sampler re-samples the other model only; a new variant re-trains only itself:
    the judged data is shared by every training."""
    cfg = _four(tmp_path)
    keys = {(s, p): _key(cfg, tmp_path, s, part=p) for s in ("sample", "judge") for p in ("policy", "reference", "other")}
    hotter = cfg.model_copy(update={"other_sampler": cfg.other_sampler.model_copy(update={"temperature": 2.0})})
    changed = {k for k, v in keys.items() if _key(hotter, tmp_path, k[0], part=k[1]) != v}
    assert changed == {("sample", "other"), ("judge", "other")}
    assert _key(hotter, tmp_path, "pairs") != _key(cfg, tmp_path, "pairs")
    # a variant's overrides reach its own train and evaluate keys, and no other part's
    base = {(s, v): _key(cfg, tmp_path, s, part=v) for s in ("train", "evaluate") for v in ("s1", "s2")}
    tuned = cfg.model_copy(update={"variants": {"s1": {"scenario": 1}, "s2": {"scenario": 2, "lr": 1e-4},
                                                 "s3": {"scenario": 3}, "s4": {"scenario": 4}}})
    assert _key(tuned, tmp_path, "train", part="s1") == base[("train", "s1")]
    assert _key(tuned, tmp_path, "evaluate", part="s1") == base[("evaluate", "s1")]
    assert _key(tuned, tmp_path, "train", part="s2") != base[("train", "s2")]
    assert _key(tuned, tmp_path, "evaluate", part="s2") != base[("evaluate", "s2")]
    assert _key(tuned, tmp_path, "pairs") == _key(cfg, tmp_path, "pairs")
    # the round's own evaluation reads no train block
    assert _key(tuned, tmp_path, "evaluate", part="policy") == _key(cfg, tmp_path, "evaluate", part="policy")


def test_the_next_round_samples_from_the_named_variant_and_trains_against_the_chosen_reference(tmp_path):
    cfg = _four(tmp_path, rounds=2)
    runner = Runner(cfg, tmp_path / "run")
    assert runner.policy(1)[1] == "round-0/s1"  # default: the scenario-1 variant
    named = Runner(_four(tmp_path, rounds=2, next_round={"sample_from": "s3"}), tmp_path / "run")
    assert named.policy(1) == (str(named.run_dir / "round-0" / "train" / "s3" / "checkpoint"), "round-0/s3")
    assert named.expected_key(Node("sample", 1, "policy")) != runner.expected_key(Node("sample", 1, "policy"))
    # π_ref of round 1: the checkpoint it starts from (previous) or the run's initial policy
    assert runner.ref_model(1)[0] == runner.policy(1)[0]
    initial = Runner(_four(tmp_path, rounds=2, next_round={"ref_model": "initial"}), tmp_path / "run")
    assert initial.ref_model(1)[0] == initial.policy(0)[0]
    assert initial.ref_model(0) == runner.ref_model(0)
    assert initial.expected_key(Node("train", 1, "s1")) != runner.expected_key(Node("train", 1, "s1"))
    assert initial.expected_key(Node("train", 0, "s1")) == runner.expected_key(Node("train", 0, "s1"))
    with pytest.raises(Exception, match="next_round.sample_from: no variant 'nope'"):
        _four(tmp_path, next_round={"sample_from": "nope"})


def test_scenarios_2_and_4_need_a_solution_for_every_prompt_before_any_work(tmp_path):
    cfg = _cfg(tmp_path, pairs={"scenarios": [1, 2]})  # the prompt file has answers, no solutions
    with pytest.raises(UserError, match=r"prompts.jsonl: 1 of 1 prompt\(s\) have no solution .*data.fields.solution"):
        Runner(cfg, tmp_path / "run").preflight(("sample",))
    assert not (tmp_path / "run").exists()
    Runner(_cfg(tmp_path), tmp_path / "run").preflight(("sample",))  # scenario 1 alone needs none
