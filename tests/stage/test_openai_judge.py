"""The OpenAI judge against a real OpenAI-protocol server of ours on 127.0.0.1 that injects faults.

The server decides each row's score (`<score=N>` in the row's response) and fails a share of first
tries in every way real endpoints do (429 with Retry-After, 500, stalls past the timeout, a 200
whose body is not JSON, dropped connections), so the tests check that every row comes back once,
with the score of its own reply or with the reason it has none, that the tries the server saw are
the tries the rows report, that a rerun sends nothing for a judged row, that a refused key, an
unknown model or an unreachable server stops with one message, and that the key never shows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import stages.judge
from pipeline.artifacts import MANIFEST
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.runner import Node, Runner
from stages.judge.cache import JudgeCache
from stages.judge.openai import preflight, row_messages
from stages.judge.rubric import load_rubric
from stages.sample.candidates import CANDIDATE_COLUMNS
from tests.conftest import JUDGE_KEY_ENV
from tests.fakes.openai_server import FakeOpenAI, row_key

REPO = Path(__file__).resolve().parents[2]
RUBRIC = str(REPO / "configs" / "rubrics" / "math_1to5.txt")


def candidate_rows(n_prompts: int = 12, per_prompt: int = 4) -> list[dict]:
    """Rows shaped like the sample stage's output; the response carries the score the server gives
    it, and a few rows fail every try (`<fail=500>`) or never give a score (`<reply=unparseable>`)."""
    rows = []
    for p in range(n_prompts):
        for c in range(per_prompt):
            i = p * per_prompt + c
            marker = "<fail=500>" if i in (5, 30) else "<reply=unparseable>" if i in (9, 41) else f"<score={1 + (i * 7) % 5}>"
            response = f"Try {c}: {p} + 1 = {p + c}. The answer is {p + c}. {marker}"
            if (p, c) == (3, 1):
                response = rows[-1]["response"]  # the same reply twice to one prompt: one request
            rows.append({
                "prompt_id": f"p{p:02d}", "candidate_id": c, "prompt": f"What is {p} + 1?",
                "messages": [{"role": "user", "content": f"What is {p} + 1?"}], "solution": f"{p} + 1 = {p + 1}",
                "answer": str(p + 1), "response": response, "prompt_token_ids": [1, 2], "response_token_ids": [3, 4],
                "prompt_tokens": 2, "response_tokens": 2, "finish_reason": "stop", "sampler": "vllm",
                "model": "hand-written", "seed": 0,
            })  # fmt: skip
    return rows


def write_sample(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS)).to_parquet(folder / "candidates-0.parquet", index=False)


def judge_cfg(server: FakeOpenAI, cache_dir: Path, **overrides) -> RunConfig:
    judge = {"type": "openai", "model": server.model, "base_url": server.base_url, "api_key_env": JUDGE_KEY_ENV,
             "rubric": RUBRIC, "cache_dir": str(cache_dir), "concurrency": 8, "max_retries": 2, "timeout": 1.0,
             "backoff_base": 0.02, "backoff_max": 0.1} | overrides  # fmt: skip
    return RunConfig(judge=judge)


def key_of(cfg: RunConfig, row: dict) -> str:
    """The server's key for a row: the hash of the messages the judge sends for it."""
    return row_key(row_messages(cfg.judge, load_rubric(RUBRIC), row)[1])


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI(api_key=os.environ[JUDGE_KEY_ENV], fault_rate=0.3, retry_after="0.05", stall=3.0, seed=1) as s:
        yield s


@pytest.fixture(scope="module")
def first_run(server, ray_local, tmp_path_factory):
    """One judge stage over 48 rows; the server's log and the output."""
    tmp = tmp_path_factory.mktemp("openai-judge")
    rows = candidate_rows()
    write_sample(tmp / "sample", rows)
    cfg = judge_cfg(server, tmp / "cache")
    server.reset()
    out = tmp / "judge"
    out.mkdir()
    stats = stages.judge.run(cfg, {"sample": str(tmp / "sample")}, out)
    return {"tmp": tmp, "rows": rows, "cfg": cfg, "stats": stats, "log": server.requests, "max_in_flight": server.max_in_flight,
            "out": pd.read_parquet(out).sort_values(["prompt_id", "candidate_id"]).reset_index(drop=True)}  # fmt: skip


def test_every_row_comes_back_once_with_its_own_score_or_the_reason_it_has_none(first_run):
    rows, out, log = first_run["rows"], first_run["out"], first_run["log"]
    assert len(out) == len(rows) == 48
    assert not out.duplicated(["prompt_id", "candidate_id"]).any()
    faults = {r.outcome for r in log if r.attempt == 1} - {"ok"}
    assert faults >= {"429", "500", "stall", "garbage", "drop"}, "the server injected every kind of fault"
    by_id = {(r["prompt_id"], r["candidate_id"]): r for r in rows}
    for got in out.itertuples():
        response = by_id[got.prompt_id, got.candidate_id]["response"]
        assert got.response == response
        if "<fail=500>" in response:
            assert pd.isna(got.score) and got.score_reason == "http 500 after 3 tries"
        elif "<reply=unparseable>" in response:
            assert pd.isna(got.score)
            assert got.score_reason == 'unparseable: no score found: "I cannot decide between the two."'
        else:
            assert got.score == int(re.search(r"<score=(\d)>", response).group(1)), got
            assert got.score_reason == "judged" and got.judge_reasoning
    assert first_run["stats"]["scored"] == 44 and first_run["stats"]["unscored"] == 4
    assert first_run["stats"]["unscored_reasons"] == {"http 500 after 3 tries": 2, "unparseable": 2}


def test_the_tries_a_row_reports_are_the_requests_the_server_saw(first_run):
    rows, out, log, cfg = first_run["rows"], first_run["out"], first_run["log"], first_run["cfg"]
    seen: dict[str, int] = {}
    for record in log:
        seen[record.key] = seen.get(record.key, 0) + 1
    keys = {(r["prompt_id"], r["candidate_id"]): key_of(cfg, r) for r in rows}
    assert len(set(keys.values())) == 47  # one reply given twice
    reported: dict[str, int] = {}
    for got in out.itertuples():
        key = keys[got.prompt_id, got.candidate_id]
        reported[key] = reported.get(key, 0) + int(got.judge_tries)
    assert reported == seen  # the duplicate row sent nothing: its twin's request served both
    # nothing is asked again once the server has answered it
    answered_at = {}
    for record in log:
        if record.key in answered_at:
            pytest.fail(f"request for a row already answered (attempt {record.attempt})")
        if record.outcome == "ok":
            answered_at[record.key] = record.attempt
    stats = first_run["stats"]
    assert stats["requests"] == len(log)
    assert stats["retried"] == sum(1 for got in out.itertuples() if got.judge_tries > 1) >= 8
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0 and stats["cost_usd"] is None
    assert first_run["max_in_flight"] >= 4  # requests really are open together (concurrency 8)


def test_a_rerun_sends_requests_only_for_rows_not_judged(first_run, server):
    tmp, cfg = first_run["tmp"], first_run["cfg"]
    server.reset()
    out = tmp / "judge-again"
    out.mkdir()
    stats = stages.judge.run(cfg, {"sample": str(tmp / "sample")}, out)
    again = pd.read_parquet(out).sort_values(["prompt_id", "candidate_id"]).reset_index(drop=True)
    unscored = {key_of(cfg, r) for r in first_run["rows"] if "<fail=" in r["response"] or "<reply=" in r["response"]}
    assert {r.key for r in server.requests} == unscored  # only the rows that got no score are tried again
    assert stats["cache_hits"] == 44 and stats["prompt_tokens"] == 0
    scored = again.score.notna()
    assert again.judge_cached[scored].all() and (again.judge_tries[scored] == 0).all()
    pd.testing.assert_series_equal(again.score, first_run["out"].score)
    pd.testing.assert_series_equal(again.judge_reasoning[scored], first_run["out"].judge_reasoning[scored])


@pytest.fixture
def few(tmp_path):
    write_sample(tmp_path / "sample", candidate_rows(2, 2))
    (tmp_path / "out").mkdir()
    return tmp_path


def test_a_refused_key_stops_with_one_message_after_one_request(server, ray_local, few, monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_WRONG_KEY", "sk-wrong-key-123456")
    server.reset()
    cfg = judge_cfg(server, few / "cache", api_key_env="PIPELINE_TEST_WRONG_KEY")
    with pytest.raises(UserError) as error:
        stages.judge.run(cfg, {"sample": str(few / "sample")}, few / "out")
    assert "http 401" in str(error.value) and "PIPELINE_TEST_WRONG_KEY" in str(error.value)
    assert "sk-wrong-key-123456" not in str(error.value)
    assert len(server.requests) == 1  # not retried, not tried row by row


def test_a_model_the_server_does_not_serve_stops_with_one_message(server, ray_local, few):
    server.reset()
    with pytest.raises(UserError) as error:
        stages.judge.run(judge_cfg(server, few / "cache", model="gpt-9"), {"sample": str(few / "sample")}, few / "out")
    assert "http 404" in str(error.value) and "'gpt-9'" in str(error.value) and "judge.model" in str(error.value)
    assert len(server.requests) == 1


def test_an_unreachable_server_stops_after_the_retries(server, ray_local, few):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = judge_cfg(server, few / "cache", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(UserError) as error:
        stages.judge.run(cfg, {"sample": str(few / "sample")}, few / "out")
    assert f"judge.base_url http://127.0.0.1:{port}/v1: no reply (connection error" in str(error.value)
    assert "after 2 tries" in str(error.value)


def test_preflight_names_a_missing_key_variable_and_a_broken_rubric(server, tmp_path):
    with pytest.raises(UserError, match="the environment variable PIPELINE_TEST_UNSET_KEY is not set"):
        preflight(judge_cfg(server, tmp_path, api_key_env="PIPELINE_TEST_UNSET_KEY").judge, None)
    broken = tmp_path / "rubric.txt"
    broken.write_text("Grade this: {question}\n")
    with pytest.raises(UserError) as error:
        preflight(judge_cfg(server, tmp_path, rubric=str(broken)).judge, None)
    assert "judge.rubric" in str(error.value) and str(broken) in str(error.value) and "{response}" in str(error.value)


# ── through the CLI, in a process of its own: a kill half-way, and the key kept secret ─────────
def _finished_sample(run_dir: Path, config: Path, rows: list[dict]) -> None:
    """A sample folder the runner accepts as finished and up to date for `config`."""
    from pipeline.config import load_config

    node = Node("sample", 0, "policy")
    folder = node.folder(run_dir)
    write_sample(folder, rows)
    key = Runner(load_config(config), run_dir).expected_key(node)
    (folder / MANIFEST).write_text(f'{{"stage": "sample", "round": 0, "key": "{key}"}}')


def _config(path: Path, policy: Path, server: FakeOpenAI, cache: Path, **judge) -> Path:
    block = {"type": "openai", "model": server.model, "base_url": server.base_url, "api_key_env": "JUDGE_SENTINEL_KEY",
             "rubric": RUBRIC, "cache_dir": str(cache), "timeout": 1.0, "backoff_base": 0.02, "backoff_max": 0.1} | judge
    path.write_text(yaml.safe_dump({"policy": str(policy), "judge": block}))
    return path


def _stage_judge(config: Path, run_dir: Path, env: dict) -> list[str]:
    return [sys.executable, "-m", "pipeline", "stage", "judge", str(config), "--run-dir", str(run_dir)]


def test_a_judge_killed_half_way_sends_no_request_twice_for_a_judged_row(tiny_llama, tmp_path):
    key = "sk-kill-test-key-42"
    rows = [r | {"response": r["response"].split("<")[0] + f"<score={1 + i % 5}>"} for i, r in enumerate(candidate_rows(15, 4))]
    with FakeOpenAI(api_key=key, latency=0.5) as server:
        config = _config(tmp_path / "judge.yaml", tiny_llama, server, tmp_path / "cache", concurrency=4)
        _finished_sample(tmp_path / "run", config, rows)
        env = os.environ | {"JUDGE_SENTINEL_KEY": key}
        proc = subprocess.Popen(_stage_judge(config, tmp_path / "run", env), cwd=REPO, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.time() + 300
            while len(server.answered()) < 12:
                assert proc.poll() is None, "the stage ended before it could be killed"
                assert time.time() < deadline
                time.sleep(0.05)
        finally:
            killed_at = time.monotonic()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Ray's workers outlive a killed driver by a few seconds and go on judging (and storing):
        # wait until the server has been quiet for 2 s, i.e. until they are gone.
        while time.monotonic() - max(r.t_start for r in server.requests) < 2:
            time.sleep(0.2)
        answered = server.answered()
        assert len(answered) < len(rows) - 8, "killed too late to test anything"
        from pipeline.config import load_config

        judge = load_config(config).judge
        cache_keys = {}  # the server's key of a row (its messages) → the judge cache's key
        for row in rows:
            cache_key, messages = row_messages(judge, load_rubric(RUBRIC), row)
            cache_keys[row_key(messages)] = cache_key
        in_cache = JudgeCache(str(tmp_path / "cache")).get_many(list(cache_keys.values()))
        stored = {k for k, c in cache_keys.items() if c in in_cache}
        assert stored <= server.answered()  # only replies are stored ...
        # ... as they arrive: of the replies sent before the kill, lost are at most those in flight
        # and those waiting for their write when the cache went with the driver (concurrency 4).
        # Replies after the kill went to orphaned workers whose cache actor may be gone already.
        before_kill = {r.key for r in server.requests if r.outcome == "ok" and r.t_end < killed_at}
        assert len(stored) >= len(before_kill) - 2 * 4

        server.reset()
        done = subprocess.run(_stage_judge(config, tmp_path / "run", env), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        sent = [r.key for r in server.requests]
    assert not set(sent) & stored, "a row judged before the kill was sent again"
    assert sorted(sent) == sorted(set(sent)) and len(sent) == len(rows) - len(stored)
    out = pd.read_parquet(tmp_path / "run" / "round-0" / "judge" / "policy")
    assert len(out) == len(rows) and out.score.notna().all()
    assert out.judge_cached.sum() == len(stored)


def test_the_key_appears_in_no_file_the_run_wrote_and_no_output(tiny_llama, tmp_path):
    key = "sk-SENTINEL-5e1f0d2c9b8a7f6e"
    rows = candidate_rows(3, 4)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's session logs, short for its socket paths
    # a hostile proxy: its 500 and 401 bodies echo the request headers, Authorization included
    with FakeOpenAI(api_key=key, echo_headers=True) as server, FakeOpenAI(api_key="sk-other", echo_headers=True) as refusing:
        env = os.environ | {"JUDGE_SENTINEL_KEY": key, "RAY_TMPDIR": str(ray_tmp)}
        config = _config(tmp_path / "judge.yaml", tiny_llama, server, tmp_path / "cache", max_retries=1)
        _finished_sample(tmp_path / "run", config, rows)
        ok = subprocess.run(_stage_judge(config, tmp_path / "run", env), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
        refused_config = _config(tmp_path / "refused.yaml", tiny_llama, refusing, tmp_path / "cache")
        _finished_sample(tmp_path / "run2", refused_config, rows)
        refused = subprocess.run(_stage_judge(refused_config, tmp_path / "run2", env), cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
        assert any(r.outcome == "500" for r in server.requests)  # the echoing error bodies were sent
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert refused.returncode == 2 and "http 401" in refused.stderr and "Traceback" not in refused.stderr
    judged = pd.read_parquet(tmp_path / "run" / "round-0" / "judge" / "policy")
    assert (judged.score_reason == "http 500 after 2 tries").sum() == 1  # row 5 fails every try
    for text in (ok.stdout, ok.stderr, refused.stdout, refused.stderr):
        assert key not in text
    written = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_socket()]
    assert len(written) > 10
    leaks = [p for p in written if key.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_the_reason_of_an_unscored_row_names_what_went_wrong():
    """The client alone (no Ray) against rows that fail every try in one way each."""
    import asyncio

    from stages.judge.openai import JudgeClient

    with FakeOpenAI(api_key=os.environ[JUDGE_KEY_ENV], stall=3.0, retry_after="0.01") as server:
        judge = judge_cfg(server, Path("/unused"), timeout=0.3, max_retries=1).judge

        async def reasons():
            client = JudgeClient(judge, in_flight=8)
            try:
                kinds = ("429", "500", "stall", "garbage", "drop")
                outcomes = await asyncio.gather(*(client.judge_messages([{"role": "user", "content": f"<fail={k}>"}])
                                                  for k in kinds))  # fmt: skip
                return dict(zip(kinds, (o.reason for o in outcomes)))
            finally:
                await client.close()

        got = asyncio.run(reasons())
    assert got == {
        "429": "http 429 after 2 tries",
        "500": "http 500 after 2 tries",
        "stall": "timeout (0.3 s) after 2 tries",
        "garbage": "malformed reply (JSONDecodeError) after 2 tries",
        "drop": got["drop"],
    }
    assert re.fullmatch(r"connection error \(\w+\) after 2 tries", got["drop"]), got["drop"]
