"""`python -m pipeline compare-judges`: argument and config errors end in one message before any
work (no Ray), and the row matching of two judged tables, on hand-made scores."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.compare import compare_frames, judge_names, load_judge
from pipeline.config import OpenAIJudge, VerifierJudge
from pipeline.errors import UserError
from stages.judge.agreement import agreement

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def _judge_file(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _compare(tmp_path: Path, *judges: Path, extra: tuple[str, ...] = ()) -> int:
    args = ["compare-judges", TINY, "--run-dir", str(tmp_path / "run"), *extra]
    for judge in judges:
        args += ["--judge", str(judge)]
    return main(args)


def test_one_judge_file_is_an_argparse_error(tmp_path, capsys):
    only = _judge_file(tmp_path, "verifier.yaml", "type: verifier\n")
    with pytest.raises(SystemExit) as stop:
        _compare(tmp_path, only)
    assert stop.value.code == 2
    assert "give exactly two --judge files (A and B), got 1" in capsys.readouterr().err


def test_no_judge_file_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _compare(tmp_path)
    assert stop.value.code == 2
    assert "the following arguments are required: --judge" in capsys.readouterr().err


def test_a_limit_below_one_is_an_argparse_error(tmp_path, capsys):
    judge = _judge_file(tmp_path, "verifier.yaml", "type: verifier\n")
    with pytest.raises(SystemExit):
        _compare(tmp_path, judge, judge, extra=("--limit", "0"))
    assert "--limit: must be at least 1, got 0" in capsys.readouterr().err


def test_missing_candidates_name_the_sample_stage_to_run_first(tmp_path, capsys):
    a = _judge_file(tmp_path, "verifier.yaml", "type: verifier\n")
    b = _judge_file(tmp_path, "gpt4o.yaml", "type: openai\nmodel: gpt-4o\n")
    assert _compare(tmp_path, a, b) == 2
    err = capsys.readouterr().err
    assert f"round-0/sample/policy, which is not finished: run `python -m pipeline stage sample {TINY} --part policy` first" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists(), "nothing is written before the inputs check out"


def test_a_round_the_config_does_not_have_is_refused(tmp_path, capsys):
    a = _judge_file(tmp_path, "verifier.yaml", "type: verifier\n")
    assert _compare(tmp_path, a, a, extra=("--round", "3")) == 2
    assert "--round 3: this config has rounds 0..0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("type: openai\nmodel: gpt-4o\nmodell: gpt-4\n", "  modell: unknown key; allowed here: api_key_env, "),
        ("type: gpt\nmodel: gpt-4o\n", "  type: unknown type 'gpt'; allowed: 'verifier', 'openai', 'reward_model'"),
        ("type: openai\n", "  model: required key is missing"),
        ("model: gpt-4o\n", "type: say which judge with a `type:` key; allowed: verifier, openai, reward_model"),
        ("type: openai\nmodel: gpt-4o\ntemperature: hot\n", "  temperature: "),
        ("- type: openai\n", "(top level): a judge block is a mapping of keys"),
        ("type: [openai\n", "not valid YAML"),
        # a whole run config: its judge block counts, and the key is named as in that file
        ("name: x\njudge:\n  type: openai\n  model: gpt-4o\n  rubrik: r.txt\n", "  judge.rubrik: unknown key"),
        ("judge: verifier\n", "judge: a judge block is a mapping of keys like `type: openai`, got str"),
    ],
)
def test_a_bad_judge_file_is_named_with_its_key(tmp_path, capsys, text, expected):
    good = _judge_file(tmp_path, "verifier.yaml", "type: verifier\n")
    bad = _judge_file(tmp_path, "bad.yaml", text)
    assert _compare(tmp_path, good, bad) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err, err
    assert "Traceback" not in err


def test_a_missing_judge_file_is_named(tmp_path, capsys):
    good = _judge_file(tmp_path, "verifier.yaml", "type: verifier\n")
    assert _compare(tmp_path, good, tmp_path / "nope.yaml") == 2
    assert f"judge file not found: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err


def test_a_judge_file_is_a_bare_block_or_a_run_configs_judge(tmp_path):
    bare = _judge_file(tmp_path, "a.yaml", "type: openai\nmodel: gpt-4o-mini\nconcurrency: 8\n")
    whole = _judge_file(tmp_path, "b.yaml", "name: other\nsampler: {n: 2}\njudge: {type: verifier, batch_size: 3}\n")
    assert load_judge(bare) == OpenAIJudge(model="gpt-4o-mini", concurrency=8)
    assert load_judge(whole) == VerifierJudge(batch_size=3)


def test_judges_are_named_by_their_file_stems_made_distinct():
    assert judge_names(["cfg/verifier.yaml", "gpt4o.yml"]) == ("verifier", "gpt4o")
    assert judge_names(["a/judge.yaml", "b/judge.yaml"]) == ("judge-1", "judge-2")
    assert judge_names(["my judge (v2).yaml", "x.yaml"]) == ("my_judge_v2_", "x")


def _judged(rows: list[tuple[str, int, float | None]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(p, c, s, "ok" if s is not None else "unparseable: ?") for p, c, s in rows],
        columns=["prompt_id", "candidate_id", "score", "score_reason"],
    )


def test_compare_frames_matches_rows_by_prompt_and_candidate_not_by_position():
    # B's rows come in another order; matched by key the pairs are (5,4) (3,3) (1,1) (2,None) (4,4) (None,5)
    a = _judged([("p", 0, 5), ("p", 1, 3), ("p", 2, 1), ("q", 0, 2), ("q", 1, 4), ("q", 2, None)])
    b = _judged([("q", 2, 5), ("q", 1, 4), ("q", 0, None), ("p", 2, 1), ("p", 1, 3), ("p", 0, 4)])
    table, result = compare_frames(a, b, ("verifier", "gpt4o"))

    assert list(table.columns) == ["prompt_id", "candidate_id", "score_verifier", "score_gpt4o",
                                   "reason_verifier", "reason_gpt4o"]  # fmt: skip
    assert list(zip(table.prompt_id, table.candidate_id)) == [("p", 0), ("p", 1), ("p", 2), ("q", 0), ("q", 1), ("q", 2)]
    assert table.score_verifier.tolist() == [5, 3, 1, 2, 4, pd.NA]
    assert table.score_gpt4o.tolist() == [4, 3, 1, pd.NA, 4, 5]
    assert str(table.score_verifier.dtype) == "Int64"
    assert table.reason_gpt4o.tolist()[3] == "unparseable: ?"
    # 4 rows both scored: (5,4) (3,3) (1,1) (4,4); 2 excluded, one unscored by each judge
    assert (result["n"], result["n_excluded"], result["unscored_a"], result["unscored_b"]) == (4, 2, 1, 1)
    assert result["exact"] == 0.75
    confusion = [[0] * 5 for _ in range(5)]
    for x, y in ((5, 4), (3, 3), (1, 1), (4, 4)):
        confusion[x - 1][y - 1] += 1
    assert result["confusion"] == confusion
    assert result["mean_a"] == pytest.approx(13 / 4) and result["mean_b"] == pytest.approx(12 / 4)
    assert result == agreement([5, 3, 1, 4], [4, 3, 1, 4]) | {"n_excluded": 2, "unscored_a": 1, "unscored_b": 1}


def test_compare_frames_refuses_judges_that_scored_different_candidates():
    a = _judged([("p", 0, 5), ("p", 1, 3), ("p", 2, 1)])
    b = _judged([("p", 0, 5), ("p", 1, 3)])
    with pytest.raises(UserError, match=r"1 rows scored by 'A' only, e.g. \(p, 2\); 'B' dropped them"):
        compare_frames(a, b, ("A", "B"))
    with pytest.raises(UserError, match=r"judge 'B': 2 rows share a \(prompt_id, candidate_id\), e.g. \(p, 1\)"):
        compare_frames(a, _judged([("p", 0, 5), ("p", 1, 3), ("p", 1, 2), ("p", 2, 1)]), ("A", "B"))


def test_a_comparison_folder_holds_scores_agreement_and_heatmap_and_a_rerun_keeps_the_old_one(tmp_path):
    from pipeline.compare import write_comparison

    a = _judged([("p", 0, 5), ("p", 1, 3), ("q", 0, None)])
    b = _judged([("p", 0, 4), ("p", 1, 3), ("q", 0, 2)])
    table, result = compare_frames(a, b, ("verifier", "gpt4o"))
    out = tmp_path / "compare-judges" / "verifier-vs-gpt4o"
    setup = {"judges": {}, "round": 0, "limit": 2, "sample": "s", "sample_key": "k"}
    write_comparison(out, table, result, ("verifier", "gpt4o"), setup)

    back = pd.read_parquet(out / "scores.parquet")
    pd.testing.assert_frame_equal(back, table)
    saved = json.loads((out / "agreement.json").read_text())
    assert saved == {"a": "verifier", "b": "gpt4o", **setup, "prompts": 2, **agreement(back.score_verifier, back.score_gpt4o)}
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    write_comparison(out, table, result, ("verifier", "gpt4o"), setup | {"limit": 1})
    assert [p.name.split(".old-")[0] for p in out.parent.iterdir() if p.name.startswith(".")] == [".verifier-vs-gpt4o"]
