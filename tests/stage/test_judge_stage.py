"""The judge stage on real Ray over a hand-written candidates folder whose scores are known.

Every score 1-5 appears, and the truncated rows score differently with and without
`finish_reason == "length"`, so a constant or a judge that ignores the flag fails.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import stages.judge
from pipeline.config import RunConfig
from pipeline.errors import UserError
from stages.sample.candidates import CANDIDATE_COLUMNS

GAIN = (
    "Tom has 5 apples. Tom gets 3 more and then gives 2 to a friend. How many apples does Tom have now?",
    "Tom starts with 5 apples and gets 3 more: 5 + 3 = 8 apples.\n"
    "Tom gives away 2: 8 - 2 = 6 apples.\nThe answer is 6.",
    "6",
)
PERCENT = (
    "Ana has 80 dollars and spends 25% of it on a kite. How many dollars does Ana have left?",
    "25% of 80 is 80 × 25 ÷ 100 = 20 dollars.\nAna has 80 - 20 = 60 dollars left.\nThe answer is 60.",
    "60",
)
ONE_STEP = (
    "Ben has 3 bags with 4 marbles in each bag. How many marbles does Ben have in all?",
    "Ben has 3 bags of 4 marbles: 3 × 4 = 12 marbles.\nThe answer is 12.",
    "12",
)

# (prompt_id, problem, response, finish_reason, expected score, expected extracted answer)
ROWS = [
    ("gain", GAIN, "5 + 3 = 8 apples.\n8 - 2 = 6 apples.\nThe answer is 6.", "stop", 5, "6"),
    ("gain", GAIN, "Tom has 5 apples, gets 3 and gives 2.\nThe answer is 6.", "stop", 4, "6"),
    ("gain", GAIN, "5 + 3 = 8 apples.\n8 - 3 = 5 apples.\nThe answer is 5.", "stop", 3, "5"),
    ("gain", GAIN, "5 + 2 = 7 apples.\nThe answer is 7.", "stop", 2, "7"),
    ("gain", GAIN, "Tom likes apples very much.", "stop", 1, None),
    # cut by max_tokens: the answer line before the cut counts, the cut "= 5" does not (else 3)
    ("gain", GAIN, "5 + 3 = 8 apples.\n8 - 2 = 6 apples.\nThe answer is 6.\nCheck: 6 + 2 = 8 and 8 - 3 = 5",
     "length", 5, "6"),
    # cut mid-working: nothing is stated before the cut line (else 5)
    ("gain", GAIN, "5 + 3 = 8 apples.\n8 - 2 = 6", "length", 1, None),
    ("percent", PERCENT, "Ana has 80 dollars and spends 25%.\nThe answer is 60.", "stop", 4, "60"),
    ("percent", PERCENT, "The answer is 80 - 20", "stop", 4, "60"),
    ("percent", PERCENT, "answer: 80 - 20 = 60\nShe also buys gum: 60 - 5 = 55.", "stop", 3, "55"),
    ("percent", PERCENT, "80 × 25 ÷ 100 = 20 dollars.\n80 - 20 = 60 dollars.\n2.", "stop", 1, None),
    ("one-step", ONE_STEP, "Ben has 12 marbles? No, 3 + 4 = 7.\nThe answer is 7.", "stop", 2, "7"),
    ("one-step", ONE_STEP, "3 × 4 = 12 marbles.\nThe answer is 12.", "stop", 5, "12"),
]


def write_candidates(folder: Path, rows=ROWS) -> pd.DataFrame:
    """A candidates folder shaped like the sample stage's output (CANDIDATE_COLUMNS)."""
    records = []
    counters: dict[str, int] = {}
    for prompt_id, (question, solution, answer), response, finish_reason, _, _ in rows:
        candidate_id = counters[prompt_id] = counters.get(prompt_id, -1) + 1
        n_out = 24 if finish_reason == "length" else 20  # max_tokens 24
        records.append({
            "prompt_id": prompt_id, "candidate_id": candidate_id, "prompt": question,
            "messages": [{"role": "user", "content": question}], "solution": solution, "answer": answer,
            "response": response, "prompt_token_ids": list(range(40)), "response_token_ids": list(range(n_out)),
            "prompt_tokens": 40, "response_tokens": n_out,
            "finish_reason": finish_reason, "sampler": "vllm", "model": "hand-written", "seed": 0,
        })  # fmt: skip
    frame = pd.DataFrame(records, columns=list(CANDIDATE_COLUMNS))
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "candidates-0.parquet", index=False)
    return frame


@pytest.fixture
def cfg() -> RunConfig:
    return RunConfig(judge={"batch_size": 4})  # several batches


def test_judge_gives_each_known_candidate_its_score(cfg, ray_local, tmp_path):
    candidates = write_candidates(tmp_path / "sample")
    out = tmp_path / "judge"
    out.mkdir()

    stats = stages.judge.run(cfg, {"sample": str(tmp_path / "sample")}, out)

    df = pd.read_parquet(out).sort_values(["prompt_id", "candidate_id"]).reset_index(drop=True)
    expected = candidates.assign(
        score=[r[4] for r in ROWS], extracted_answer=[r[5] for r in ROWS]
    ).sort_values(["prompt_id", "candidate_id"]).reset_index(drop=True)
    for got, want in zip(df.itertuples(), expected.itertuples()):
        assert (got.prompt_id, got.candidate_id, got.score, got.extracted_answer) == (
            want.prompt_id, want.candidate_id, want.score, want.extracted_answer), got.response
    assert stats == {"rows": 13, "scored": 13, "unscored": 0, "score_counts": {1: 3, 2: 2, 3: 2, 4: 3, 5: 3},
                     "unscored_reasons": {}}
    # every candidate column is kept, unchanged, next to the judge's own
    assert set(df.columns) == set(CANDIDATE_COLUMNS) | {"score", "score_reason", "extracted_answer", "judge"}
    lists = ["messages", "prompt_token_ids", "response_token_ids"]
    plain = [c for c in CANDIDATE_COLUMNS if c not in lists]
    pd.testing.assert_frame_equal(df[plain], expected[plain], check_dtype=False)
    assert [[dict(m) for m in ms] for ms in df.messages] == list(expected.messages)
    for column in ("prompt_token_ids", "response_token_ids"):
        assert [list(ids) for ids in df[column]] == list(expected[column])
    assert (df.judge == "verifier").all()
    assert set(df.score_reason) == {"correct_with_working", "correct_without_working",
                                    "wrong_answer_mostly_right_process", "wrong_answer", "no_final_answer"}


def test_judge_stops_on_rows_without_an_answer(cfg, ray_local, tmp_path):
    rows = [r if r[0] != "one-step" else (r[0], (*ONE_STEP[:2], None), *r[2:]) for r in ROWS]
    write_candidates(tmp_path / "sample", rows)
    out = tmp_path / "judge"
    out.mkdir()

    with pytest.raises(UserError) as error:
        stages.judge.run(cfg, {"sample": str(tmp_path / "sample")}, out)

    message = str(error.value)
    assert "2 of 13 rows have no reference answer (prompt_id one-step)" in message
    assert "the verifier judge needs a reference answer for every prompt" in message
    assert "data.fields.answer" in message and "or use a judge that needs none" in message
    assert not list(out.iterdir())  # nothing was scored or written
