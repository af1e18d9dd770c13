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
from pipeline.runner import STAGES, Runner


def _model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
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


def _finish(runner: Runner, name: str, round_: int = 0) -> str:
    """A finished folder whose manifest carries the key the runner expects for it now."""
    key = runner.expected_key(STAGES[name], round_)
    with atomic_dir(runner.run_dir / f"round-{round_}" / name,
                    {"key": key, "config_hash": runner.cfg.hash_of(*STAGES[name].config_blocks)}):  # fmt: skip
        pass
    return key


def _key(cfg: RunConfig, tmp_path: Path, stage: str, round_: int = 0) -> str:
    return Runner(cfg, tmp_path / "run").expected_key(STAGES[stage], round_)


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
    keys = {name: _key(cfg, tmp_path, name) for name in STAGES}
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
    with pytest.raises(UserError, match=r"not finished: run `python -m pipeline stage sample my.yaml` first"):
        runner.inputs(STAGES["judge"], 0)
    for name in ("sample", "judge", "pairs"):
        _finish(runner, name)
    assert runner.inputs(STAGES["train"], 0)["pairs"] == str(runner.run_dir / "round-0" / "pairs")
    # an edit of pairs.* after the pairs stage ran: train must not read the old pairs
    edited = cfg.model_copy(update={"pairs": cfg.pairs.model_copy(update={"min_margin": 2.0})})
    stale = Runner(edited, tmp_path / "run", config_path="my.yaml")
    with pytest.raises(UserError) as err:
        stale.inputs(STAGES["train"], 0)
    message = str(err.value)
    assert "round-0/pairs, which is out of date with the config (its config (pairs) changed)" in message
    assert "`python -m pipeline stage pairs my.yaml`" in message and "`python -m pipeline run my.yaml`" in message
    # an upstream change (the prompt file) makes the whole chain stale, named as such
    _prompts(tmp_path, '{"prompt": "5+5?", "answer": "10"}\n{"prompt": "6+6?", "answer": "12"}\n')
    with pytest.raises(UserError, match="round-0/pairs, which is out of date .*upstream stage it depends on changed"):
        Runner(cfg, tmp_path / "run").inputs(STAGES["train"], 0)


def test_round_k_samples_from_round_k_minus_1_checkpoint_and_checks_it(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    runner = Runner(cfg, tmp_path / "run")
    assert runner.policy(0)[0] == str((tmp_path / "model").resolve())
    assert runner.policy(1) == (str(runner.run_dir / "round-0" / "train" / "checkpoint"), "round-0")
    with pytest.raises(UserError, match=r"round-0/train, which is not finished: run `python -m pipeline stage train"):
        runner.inputs(STAGES["sample"], 1)
    for name in ("sample", "judge", "pairs", "train"):
        _finish(runner, name)
    assert runner.inputs(STAGES["sample"], 1)["policy"].endswith("round-0/train/checkpoint")
    # round 1's keys chain on round 0's train key: a retrained round 0 changes all of round 1
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1.0})})
    assert _key(other, tmp_path, "sample", 1) != _key(cfg, tmp_path, "sample", 1)
    with pytest.raises(UserError, match="round-0/train, which is out of date"):
        Runner(other, tmp_path / "run").inputs(STAGES["sample"], 1)


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
