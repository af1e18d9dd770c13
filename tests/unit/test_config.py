"""Tests for pipeline/config.py: YAML + dotted overrides → RunConfig, and the UserError messages."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from pipeline.config import (
    BuiltinMathData,
    DPOMethod,
    FileData,
    RunConfig,
    VLLMSampler,
    load_config,
)
from pipeline.errors import UserError

RUN_KEYS = ["data", "evaluate", "judge", "name", "next_round", "other_sampler", "pairs", "policy", "ray", "rounds", "sampler", "seed",
            "train", "variants"]
TRAIN_KEYS = [
    "activation_checkpointing", "batch_size", "checkpoint_every", "diagnostics_every", "dtype", "epochs", "eval_every",
    "grad_clip", "guard", "held_out_pairs", "lr", "lr_schedule", "max_failures", "max_length", "max_steps", "method", "micro_batch_size", "num_workers", "optimizer",
    "parameterisation", "placement_strategy", "resources_per_worker",
    "scenario", "seed", "update", "use_gpu", "warmup_steps", "weight_decay",
]  # fmt: skip


@pytest.fixture
def write(tmp_path):
    def _write(text: str, name: str = "exp.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


def _error(path, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def _line_for(message: str, key: str) -> str:
    """The message line that reports `key` (as `  key: ...`)."""
    lines = [ln for ln in message.splitlines() if ln.strip().startswith(f"{key}:")]
    assert lines, f"no line for {key!r} in:\n{message}"
    return lines[0]


# ── loading ──────────────────────────────────────────────────────────────────────────────────
def test_empty_file_gives_defaults_named_after_file(write):
    cfg = load_config(write("", name="my-exp.yaml"))
    assert cfg.name == "my-exp"
    assert cfg == RunConfig(name="my-exp")
    assert isinstance(cfg.data, BuiltinMathData)
    assert isinstance(cfg.sampler, VLLMSampler)
    assert isinstance(cfg.train.method, DPOMethod)
    assert cfg.train.method.beta == 0.1
    assert cfg.sampler.n == 8
    assert cfg.train.lr == 5e-6
    assert cfg.train.batch_size == 8 and cfg.train.num_workers == 2
    assert cfg.pairs.tie_break == "first" and cfg.pairs.min_margin == 1.0


def test_yaml_values_and_explicit_name(write):
    cfg = load_config(write(
        "name: hello\nseed: 3\nsampler:\n  type: vllm\n  n: 4\n  temperature: 0.7\n"
        "train:\n  lr: 2.0e-5\n  method:\n    type: dpo\n    beta: 0.25\n"
    ))  # fmt: skip
    assert cfg.name == "hello" and cfg.seed == 3
    assert cfg.sampler.n == 4 and cfg.sampler.temperature == 0.7
    assert cfg.train.lr == 2e-5
    assert cfg.train.method.beta == 0.25


def test_overrides_parse_types(write):
    path = write("train:\n  lr: 1.0e-6\n")
    cfg = load_config(path, [
        "train.lr=1e-5", "sampler.type=vllm", "sampler.n=4", "train.use_gpu=true", "train.max_steps=7",
        "train.grad_clip=", "pairs.tie_break=random", "rounds=2", "name=over",
    ])  # fmt: skip
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.sampler.n == 4 and isinstance(cfg.sampler.n, int)
    assert cfg.train.use_gpu is True
    assert cfg.train.max_steps == 7
    assert cfg.train.grad_clip is None  # an empty value is null
    assert cfg.pairs.tie_break == "random"
    assert cfg.rounds == 2 and cfg.name == "over"


def test_overrides_switch_union_member(write):
    cfg = load_config(write(""), ["data.type=file", "data.path=x.jsonl", "data.fields.prompt=question"])
    assert isinstance(cfg.data, FileData)
    assert cfg.data.path == "x.jsonl"
    assert cfg.data.fields.prompt == "question"
    assert cfg.data.eval_fraction == 0.1


def test_override_wins_over_yaml(write):
    cfg = load_config(write("seed: 1\ntrain:\n  epochs: 3\n"), ["train.epochs=5"])
    assert cfg.train.epochs == 5 and cfg.seed == 1


@pytest.mark.parametrize("override, attr, value", [
    ("sampler.n=4", ("sampler", "n"), 4),
    ("train.method.beta=0.2", ("train", "method", "beta"), 0.2),
    ("data.num_train=16", ("data", "num_train"), 16),
])  # fmt: skip
def test_override_inside_default_union_member(write, override, attr, value):
    cfg = load_config(write(""), [override])
    node = cfg
    for a in attr:
        node = getattr(node, a)
    assert node == value


# ── errors ───────────────────────────────────────────────────────────────────────────────────
def test_unknown_top_level_key(write):
    path = write("seed: 1\nfoo: 2\n")
    msg = _error(path)
    assert str(path) in msg
    line = _line_for(msg, "foo")
    assert "unknown key" in line
    assert "allowed here: " + ", ".join(RUN_KEYS) in line


def test_unknown_nested_key(write):
    msg = _error(write(""), ["train.lrr=1e-5"])
    line = _line_for(msg, "train.lrr")
    assert "unknown key" in line
    assert "allowed here: " + ", ".join(TRAIN_KEYS) in line


def test_unknown_key_inside_union_member_lists_that_members_keys(write):
    msg = _error(write(""), ["data.type=hf", "data.path=x", "data.num_train=3"])
    line = _line_for(msg, "data.num_train")  # no union tag ("hf") in the key
    allowed = line.split("allowed here: ")[1].split(", ")
    assert allowed == ["eval_fraction", "eval_split", "fields", "limit", "path", "seed", "split", "type"]


def test_unknown_key_in_nested_block_of_union_member(write):
    msg = _error(write(""), ["data.type=file", "data.path=x", "data.fields.promt=q"])
    line = _line_for(msg, "data.fields.promt")
    assert "allowed here: answer, id, prompt, solution" in line


def test_unknown_key_named_like_a_tag_is_named(write):
    msg = _error(write("vllm:\n  n: 2\n"))
    assert "vllm: unknown key" in msg


def test_wrong_type_names_key_and_value(write):
    msg = _error(write(""), ["sampler.type=vllm", "sampler.n=abc"])
    line = _line_for(msg, "sampler.n")  # the union tag is not in the key ("sampler.vllm.n")
    assert "integer" in line and "'abc'" in line
    assert "vllm.n" not in msg


def test_wrong_type_in_yaml_float_field(write):
    msg = _error(write("train:\n  lr: fast\n"))
    assert "'fast'" in _line_for(msg, "train.lr")


def test_several_errors_reported_together(write):
    msg = _error(write(""), ["sampler.type=vllm", "sampler.n=abc", "sampler.top_p=0", "train.epochs=0"])
    for key in ("sampler.n", "sampler.top_p", "train.epochs"):
        _line_for(msg, key)


def test_bad_literal_lists_allowed(write):
    msg = _error(write(""), ["sampler.type=foo"])
    line = _line_for(msg, "sampler.type")
    assert "'foo'" in line and "'vllm'" in line
    msg = _error(write(""), ["train.dtype=float16"])
    line = _line_for(msg, "train.dtype")
    assert "'float32'" in line and "'bfloat16'" in line and "'float16'" in line


def test_batch_size_not_divisible_by_workers(write):
    msg = _error(write("train:\n  batch_size: 6\n  num_workers: 4\n"))
    line = _line_for(msg, "train")
    assert "batch_size (6)" in line and "num_workers (4)" in line
    # divisible passes
    assert load_config(write("train:\n  batch_size: 12\n  num_workers: 4\n")).train.batch_size == 12


def test_missing_required_key(write):
    msg = _error(write(""), ["data.type=file"])
    assert "required key is missing" in _line_for(msg, "data.path")


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope" / "missing.yaml"
    msg = _error(path)
    assert str(path) in msg and "not found" in msg


def test_directory_is_not_a_config(tmp_path):
    assert str(tmp_path) in _error(tmp_path)


def test_invalid_yaml(write):
    path = write("train: [1\n")
    msg = _error(path)
    assert str(path) in msg and "not valid YAML" in msg


def test_top_level_must_be_mapping(write):
    msg = _error(write("- 1\n- 2\n"))
    assert "mapping" in msg and "list" in msg


@pytest.mark.parametrize("bad", ["train.lr", "=3", ""])
def test_malformed_override(write, bad):
    msg = _error(write(""), [bad])
    assert repr(bad) in msg
    assert "dotted.key=value" in msg


def test_override_through_a_value(write):
    msg = _error(write("seed: 1\n"), ["seed.x=1"])
    assert "'seed.x=1'" in msg and "seed is a value" in msg
    # not set in the file: the override makes a block, which validation then rejects by key
    assert "seed:" in _error(write(""), ["seed.x=1"])


def test_error_message_is_one_line_per_problem(write):
    """Readable: a header naming the file, then `  key: message` lines, no pydantic URL noise."""
    path = write("")
    msg = _error(path, ["train.lrr=1", "sampler.type=vllm", "sampler.n=abc"])
    lines = msg.splitlines()
    assert lines[0] == f"{path} with overrides train.lrr=1 sampler.type=vllm sampler.n=abc: invalid config"
    assert all(re.match(r"  [\w.]+: ", ln) for ln in lines[1:]), msg
    assert len(lines) == 3
    assert "errors.pydantic.dev" not in msg


# ── hashes ───────────────────────────────────────────────────────────────────────────────────
def test_hash_of(write):
    path = write("")
    base = load_config(path)
    sampler_changed = load_config(path, ["sampler.type=vllm", "sampler.n=4"])
    train_changed = load_config(path, ["train.lr=1e-4"])
    assert len(base.hash_of("sampler")) == 16
    assert base.hash_of("sampler") == load_config(path).hash_of("sampler")  # stable
    assert sampler_changed.hash_of("sampler") != base.hash_of("sampler")
    assert sampler_changed.hash_of("train") == base.hash_of("train")
    assert train_changed.hash_of("train") != base.hash_of("train")
    assert train_changed.hash_of("sampler", "data") == base.hash_of("sampler", "data")
    assert base.hash_of("data", "sampler") == base.hash_of("sampler", "data")  # order of blocks is irrelevant
    assert base.hash_of("sampler") != base.hash_of("data")
    # a scalar top-level field can be hashed too
    assert load_config(path, ["seed=5"]).hash_of("seed") != base.hash_of("seed")
    # name is not part of any block's hash
    assert load_config(path, ["name=other"]).hash_of("sampler", "train") == base.hash_of("sampler", "train")


# ── judges ───────────────────────────────────────────────────────────────────────────────────
def test_every_shipped_config_loads_and_the_judge_examples_name_their_judge():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    judges = {p.stem: load_config(p).judge for p in sorted((root / "judges").glob("*.yaml"))}
    assert {name: j.type for name, j in judges.items()} == {
        "openai": "openai", "reward_model": "reward_model", "verifier": "verifier", "vllm_server": "openai"}
    assert judges["openai"].api_key_env == "OPENAI_API_KEY" and judges["vllm_server"].api_key_env is None
    for path in root.glob("*.yaml"):
        load_config(path)


def test_operational_judge_keys_leave_the_stage_key_alone_and_the_others_change_it():
    base = RunConfig(judge={"type": "openai", "model": "gpt-4o"})
    same = {"concurrency": 8, "workers": 2, "timeout": 5, "max_retries": 1, "backoff_base": 0.1, "cache_dir": "/x",
            "max_requests_per_minute": 60, "prices": {"prompt_per_million": 1, "completion_per_million": 2}}
    for key, value in same.items():
        changed = RunConfig(judge={"type": "openai", "model": "gpt-4o", key: value})
        assert changed.hash_of("judge") == base.hash_of("judge"), key
    for key, value in {"model": "gpt-4o-mini", "temperature": 0.5, "max_tokens": 64, "response_format": "text",
                       "rubric": "other.txt", "base_url": "http://x/v1"}.items():
        changed = RunConfig(judge={"type": "openai", "model": "gpt-4o"} | {key: value})
        assert changed.hash_of("judge") != base.hash_of("judge"), key


def test_reward_model_thresholds_must_be_four_ascending_rewards(write):
    message = _error(write("judge: {type: reward_model, model: /m, thresholds: [0, 2, 1, 3]}"))
    assert "thresholds must be 4 strictly ascending rewards" in message
    assert "judge" in _error(write("judge: {type: reward_model, model: /m, thresholds: [0, 1]}"))
    assert _line_for(_error(write("judge: {type: openai}")), "judge.model").endswith("required key is missing")


def test_a_reward_model_variant_cannot_be_sampled_from_nor_guarded():
    """A reward model cannot generate: the next round never samples from it, by default or by name."""
    variants = {"rm": {"method": {"type": "reward_model"}}, "dpo": {"method": {"type": "dpo"}}}
    cfg = RunConfig(rounds=2, variants=variants)
    assert cfg.sample_from() == "dpo"  # the first variant on scenario 1 that is a policy
    with pytest.raises(ValidationError, match="next_round.sample_from: rm trains a reward model, which cannot generate"):
        RunConfig(rounds=2, variants=variants, next_round={"sample_from": "rm"})
    with pytest.raises(ValidationError, match="every variant trains a reward model"):
        RunConfig(rounds=2, variants={"rm": {"method": {"type": "reward_model"}}})
    with pytest.raises(ValidationError, match="a reward model has no log-probs to watch"):
        RunConfig(train={"method": {"type": "reward_model"}, "guard": {}})
    assert RunConfig(variants={"rm": {"method": {"type": "reward_model", "center_rewards_coefficient": 0.01}}}).trains()[
        "rm"].method.center_rewards_coefficient == 0.01


# ── update rules and parameterisations ─────────────────────────────────────────────────────────
def test_update_and_parameterisation_default_to_plain_full_and_take_their_keys(write):
    cfg = load_config(write(""))
    assert (cfg.train.update.type, cfg.train.parameterisation.type) == ("plain", "full")
    cfg = load_config(write("train: {update: {type: ogd}, parameterisation: {type: ropo, modules: [q_proj], stages: 3}}"))
    assert cfg.train.uses_ogd and cfg.train.parameterisation.modules == ["q_proj"] and cfg.train.parameterisation.stages == 3
    assert cfg.train.method.type == "dpo"  # under OGD: the loss logged for comparison
    line = _line_for(_error(write("train: {parameterisation: {type: ropo, modulez: [q_proj]}}")), "train.parameterisation.modulez")
    assert "unknown key" in line and "modules" in line and "stages" in line
    assert "ogd" in _error(write("train: {update: {type: sgd}}"))


def test_a_variant_swaps_the_update_rule_and_parameterisation_whole(write):
    text = ("train: {parameterisation: {type: ropo, modules: [v_proj]}}\n"
            "variants: {full: {parameterisation: {type: full}}, ogd: {update: {type: ogd}, optimizer: rmsprop}, "
            "ropo: {parameterisation: {stages: 1}}}")  # fmt: skip
    trains = load_config(write(text)).trains()
    assert trains["full"].parameterisation.type == "full"  # no stray `modules` from the base
    assert trains["ogd"].uses_ogd and trains["ogd"].optimizer == "rmsprop" and trains["ogd"].parameterisation.type == "ropo"
    assert trains["ropo"].parameterisation.modules == ["v_proj"] and trains["ropo"].parameterisation.stages == 1


@pytest.mark.parametrize("train,message", [
    ("{method: {type: reward_model}, update: {type: ogd}}", "reward_model trains a new reward head"),
    ("{method: {type: reward_model}, parameterisation: {type: ropo}}", "reward_model trains a new reward head"),
    ("{update: {type: ogd}, guard: {}}", "under update: ogd the loss is only logged"),
])  # fmt: skip
def test_combinations_that_cannot_work_are_named(write, train, message):
    assert message in _error(write(f"train: {train}"))
