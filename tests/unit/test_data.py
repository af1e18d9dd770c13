"""Tests for pipeline/data.py: the built-in math generator and the user prompt loaders."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline.config import BuiltinMathData, FieldMap, FileData, HFData, load_config
from pipeline.data import PROMPT_COLUMNS, eval_indices, load_prompts, math_problems, template_problems
from pipeline.errors import UserError

# One phrase per template that only that template's questions contain (checked independently of
# the generator's internals, so a template that silently stops being drawn fails the test).
TEMPLATE_MARKERS = {
    "gain_loss": r"gets \d+ more and then gives \d+",
    "groups": r"bags with \d+ \w+ in each bag",
    "share": r"equally among \d+ friends",
    "percent_left": r"spends \d+% of it",
    "unit_rate": r"At the same price",
    "change": r"\d+-dollar bill",
    "bakery": r"trays of \w+ with",
    "savings": r"every week for",
    "discount": r"\d+% off the total",
    "add": r"and gets \d+ more\. How many",
    "take_away": r"gives \d+ away",
    "double": r"twice as many",
    "sum": r"asks: what is \d+ \+ \d+\?",
    "plus_one": r"finds 1 more",
    "add_small": r"\d+ red \w+ and \d+ blue",
    "sum_small": r"asks: how much is \d+ plus \d+\?",
    "double_small": r"in each hand",
}
# The levels as measured (bench/builtin_levels.py, bench/RESULTS.md); a change here is deliberate.
LEVEL_TEMPLATES = {
    1: {"sum", "add_small", "add", "sum_small", "plus_one", "double"},
    2: {"groups", "take_away", "double_small", "share"},
    3: {"gain_loss", "percent_left", "unit_rate", "change", "discount", "savings", "bakery"},
}
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
STEP = re.compile(r"(\d+(?:\s*[-+×÷]\s*\d+)+)\s*=\s*(-?\d+)")
LAST_LINE = re.compile(r"The answer is (-?\d+)\.")


def _evaluate(expr: str) -> Fraction:
    """× and ÷ before + and -, left to right: an evaluator independent of the generator."""
    tokens = re.findall(r"\d+|[-+×÷]", expr)
    terms: list[Fraction] = [Fraction(int(tokens[0]))]
    signs = [1]
    for op, num in zip(tokens[1::2], tokens[2::2]):
        value = Fraction(int(num))
        if op == "×":
            terms[-1] *= value
        elif op == "÷":
            terms[-1] /= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


# ── generator ────────────────────────────────────────────────────────────────────────────────
def test_generator_is_deterministic_and_seed_dependent():
    assert math_problems(40, 3, "train") == math_problems(40, 3, "train")
    assert [r["prompt"] for r in math_problems(40, 3, "train")] != [r["prompt"] for r in math_problems(40, 4, "train")]


def test_stable_prefixes():
    assert math_problems(50, 1, "eval")[:10] == math_problems(10, 1, "eval")
    assert math_problems(200, 1, "train")[:137] == math_problems(137, 1, "train")


def test_row_shape_and_ids():
    rows = math_problems(30, 7, "eval")
    assert all(tuple(r) == PROMPT_COLUMNS for r in rows)
    assert [r["prompt_id"] for r in rows] == [f"math-eval-s7-{i:05d}" for i in range(30)]
    assert len({r["prompt"] for r in rows}) == 30  # no repeats inside a split


def test_answers_are_integers_matching_the_last_line():
    for r in math_problems(300, 0, "train") + math_problems(300, 0, "eval"):
        assert re.fullmatch(r"-?\d+", r["answer"]), r
        lines = r["solution"].split("\n")
        m = LAST_LINE.fullmatch(lines[-1])
        assert m and m.group(1) == r["answer"], r
        assert len(lines) >= 2
        assert all("=" in line for line in lines[:-1]), r
        assert int(r["answer"]) >= 0


def _template(prompt: str) -> str:
    hits = [name for name, pat in TEMPLATE_MARKERS.items() if re.search(pat, prompt)]
    assert len(hits) == 1, (prompt, hits)
    return hits[0]


def test_every_template_appears_in_200():
    seen = {name: 0 for name in TEMPLATE_MARKERS}
    for r in math_problems(200, 0, "train"):
        seen[_template(r["prompt"])] += 1
    assert len(seen) >= 6 and all(seen.values()), seen


def test_mix_of_easy_and_hard():
    steps = [len(r["solution"].split("\n")) - 1 for r in math_problems(200, 2, "train")]
    assert min(steps) == 1 and max(steps) >= 3
    assert sum(s <= 2 for s in steps) >= 40  # a weak model needs a fair share of easy ones


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_train_and_eval_never_share_a_question(seed):
    train = {r["prompt"] for r in math_problems(3000, seed, "train")}
    evals = {r["prompt"] for r in math_problems(1000, seed, "eval")}
    assert not train & evals


def test_arithmetic_of_every_step_is_correct():
    for r in math_problems(500, 5, "train"):
        lines = r["solution"].split("\n")
        last_result = None
        for line in lines[:-1]:
            matches = STEP.findall(line)
            assert matches, f"step without a computation: {line!r}"
            for expr, result in matches:
                value = _evaluate(expr)
                assert value.denominator == 1, f"inexact division in {line!r}"
                assert value == int(result), f"wrong arithmetic in {line!r}"
                last_result = result
        assert last_result == r["answer"], r


def test_load_prompts_builtin_counts():
    cfg = BuiltinMathData(num_train=12, num_eval=5, seed=9)
    assert load_prompts(cfg, "train") == math_problems(12, 9, "train")
    assert load_prompts(cfg, "eval") == math_problems(5, 9, "eval")


# ── difficulty levels ────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_level_draws_only_and_every_one_of_its_templates(level, split):
    seen = {_template(r["prompt"]) for r in math_problems(150, 0, split, [level])}
    assert seen == LEVEL_TEMPLATES[level]


def test_levels_partition_the_templates():
    assert set.union(*LEVEL_TEMPLATES.values()) == set(TEMPLATE_MARKERS)
    assert sum(map(len, LEVEL_TEMPLATES.values())) == len(TEMPLATE_MARKERS)


def test_two_levels_draw_from_both_and_nothing_else():
    seen = {_template(r["prompt"]) for r in math_problems(200, 1, "train", [1, 3])}
    assert seen == LEVEL_TEMPLATES[1] | LEVEL_TEMPLATES[3]


def test_level_one_is_one_step():
    assert all(len(r["solution"].split("\n")) == 2 for r in math_problems(200, 0, "train", [1]))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_a_level_is_deterministic_prefix_stable_and_without_repeats(level):
    rows = math_problems(300, 4, "train", [level])
    assert rows == math_problems(300, 4, "train", [level])
    assert math_problems(57, 4, "train", [level]) == rows[:57]
    assert len({r["prompt"] for r in rows}) == 300
    assert [r["prompt"] for r in math_problems(300, 5, "train", [level])] != [r["prompt"] for r in rows]


@pytest.mark.parametrize("level", [1, 2, 3])
def test_a_level_keeps_train_and_eval_disjoint(level):
    train = {r["prompt"] for r in math_problems(2000, 0, "train", [level])}
    evals = {r["prompt"] for r in math_problems(1000, 0, "eval", [level])}
    assert not train & evals


def test_order_and_repeats_of_levels_do_not_matter():
    assert math_problems(60, 2, "eval", [3, 1]) == math_problems(60, 2, "eval", [1, 3, 1])


def test_every_level_keeps_worked_solutions_and_answers():
    for level in (1, 2, 3):
        for r in math_problems(100, 3, "eval", [level]):
            assert tuple(r) == PROMPT_COLUMNS
            assert r["solution"].endswith(f"The answer is {r['answer']}.") and "=" in r["solution"]


def test_load_prompts_passes_the_levels():
    cfg = BuiltinMathData(num_train=20, num_eval=6, seed=2, levels=[2])
    assert load_prompts(cfg, "train") == math_problems(20, 2, "train", [2])
    assert load_prompts(cfg, "eval") == math_problems(6, 2, "eval", [2])
    assert {_template(r["prompt"]) for r in load_prompts(cfg, "train")} <= LEVEL_TEMPLATES[2]


@pytest.mark.parametrize("levels, error", [("[]", "at least 1 item"), ("[4]", "Input should be 1, 2 or 3"),
                                           ("[0, 1]", "Input should be 1, 2 or 3"), ("[easy]", "Input should be")])
def test_config_refuses_unknown_or_no_levels(levels, error):
    with pytest.raises(UserError, match=r"data\.levels.*" + re.escape(error)):
        load_config(DEFAULT_CONFIG, [f"data.levels={levels}"])


@pytest.mark.parametrize("levels", [[], [4], [0, 1]])
def test_generator_refuses_unknown_or_no_levels(levels):
    with pytest.raises(ValueError, match=r"levels must be a non-empty subset of \[1, 2, 3\]"):
        math_problems(5, 0, "train", levels)


def test_a_draw_that_runs_out_of_distinct_questions_says_so():
    # `sum` has 12 names x 19 x 19 = 4,332 questions per split
    with pytest.raises(UserError, match=r"ran out of distinct train questions after \d+ of 5000 .*\(data\.num_train"):
        template_problems(["sum"], 5000, 0, "train")


# ── user files ───────────────────────────────────────────────────────────────────────────────
def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MAPPED = FieldMap(prompt="question", id="qid", solution="sol", answer="ans")
ROWS = [{"qid": f"q{i}", "question": f"What is {i} + {i}?", "sol": f"{i} + {i} = {2 * i}", "ans": 2 * i}
        for i in range(20)]


def test_jsonl_with_field_mapping(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", ROWS[:3])
    rows = load_prompts(FileData(path=str(path), fields=MAPPED, eval_fraction=0.0), "train")
    assert rows == [{"prompt_id": f"q{i}", "prompt": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}",
                     "answer": str(2 * i)} for i in range(3)]


def test_jsonl_default_ids_limit_and_blank_lines(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [{"prompt": "a"}, "", {"prompt": "b"}, {"prompt": "c"}])
    rows = load_prompts(FileData(path=str(path), eval_fraction=0.0, limit=2), "train")
    assert rows == [{"prompt_id": "mine-00000", "prompt": "a", "solution": None, "answer": None},
                    {"prompt_id": "mine-00001", "prompt": "b", "solution": None, "answer": None}]


def test_parquet_with_field_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:4]), path)
    rows = load_prompts(FileData(path=str(path), fields=MAPPED, eval_fraction=0.0), "train")
    assert [r["prompt_id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert rows[3] == {"prompt_id": "q3", "prompt": "What is 3 + 3?", "solution": "3 + 3 = 6", "answer": "6"}


def test_eval_fraction_split_is_deterministic_disjoint_and_ordered(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", ROWS)
    cfg = FileData(path=str(path), fields=MAPPED, eval_fraction=0.25, seed=3)
    train, evals = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert len(evals) == math.ceil(0.25 * 20) and len(train) == 15
    order = [r["qid"] for r in ROWS]
    train_ids, eval_ids = [r["prompt_id"] for r in train], [r["prompt_id"] for r in evals]
    assert not set(train_ids) & set(eval_ids) and set(train_ids) | set(eval_ids) == set(order)
    assert train_ids == sorted(train_ids, key=order.index) and eval_ids == sorted(eval_ids, key=order.index)
    assert load_prompts(cfg, "eval") == evals
    other = FileData(path=str(path), fields=MAPPED, eval_fraction=0.25, seed=4)
    assert [r["prompt_id"] for r in load_prompts(other, "eval")] != eval_ids


def test_eval_indices_edge_cases():
    assert eval_indices(2, 0.01, 0) and len(eval_indices(2, 0.01, 0)) == 1
    assert eval_indices(1, 0.5, 0) == [] and eval_indices(10, 0.0, 0) == []
    assert len(eval_indices(10, 0.99, 0)) == 9  # training keeps at least one row


def test_eval_path(tmp_path):
    train_path = _jsonl(tmp_path / "train.jsonl", [{"prompt": "t1"}, {"prompt": "t2"}])
    eval_path = _jsonl(tmp_path / "held.jsonl", [{"prompt": "e1"}])
    cfg = FileData(path=str(train_path), eval_path=str(eval_path), eval_fraction=0.5)
    assert [r["prompt"] for r in load_prompts(cfg, "train")] == ["t1", "t2"]
    assert load_prompts(cfg, "eval") == [{"prompt_id": "held-00000", "prompt": "e1", "solution": None, "answer": None}]


def test_eval_path_id_clash(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train_path = _jsonl(tmp_path / "a" / "p.jsonl", [{"prompt": "t1"}])
    eval_path = _jsonl(tmp_path / "b" / "p.jsonl", [{"prompt": "e1"}])
    with pytest.raises(UserError, match=r"prompt id 'p-00000' is in both .*a/p\.jsonl and .*b/p\.jsonl"):
        load_prompts(FileData(path=str(train_path), eval_path=str(eval_path)), "eval")


# ── user errors ──────────────────────────────────────────────────────────────────────────────
def _load(path, **kw):
    return load_prompts(FileData(path=str(path), **kw), "train")


def test_error_bad_extension(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nhi\n")
    with pytest.raises(UserError, match=re.escape(str(path)) + r".*'\.csv'.*\.jsonl or \.parquet"):
        _load(path)


def test_error_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match="prompt file not found: " + re.escape(str(path))):
        _load(path)


def test_error_malformed_json_line(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, "", '{"prompt": "oops"'])
    with pytest.raises(UserError, match=re.escape(f"{path} line 3: not valid JSON: ")):
        _load(path)


def test_error_json_line_not_an_object(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, "[1, 2]"])
    with pytest.raises(UserError, match=re.escape(f"{path} line 2: expected a JSON object")):
        _load(path)


def test_error_missing_prompt_field(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"question": "x", "a": 1}] * 2 + [{"a": 1, "b": 2}])
    with pytest.raises(UserError, match=re.escape(
            f"{path} line 3: no field 'question' (set data.fields.prompt to the column holding the prompt; "
            "columns here: a, b)")):
        _load(path, fields=FieldMap(prompt="question"))


def test_error_missing_configured_answer_field(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "ans": 1}, {"prompt": "y"}])
    with pytest.raises(UserError, match=re.escape(f"{path} line 2: no field 'ans' (set data.fields.answer")):
        _load(path, fields=FieldMap(answer="ans"))


@pytest.mark.parametrize("bad, what", [("  ", "is empty"), (7, "is a int, not a string"), (None, "is a NoneType")])
def test_error_empty_or_non_string_prompt(tmp_path, bad, what):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": bad}])
    with pytest.raises(UserError, match=re.escape(f"{path} line 2: field 'prompt' {what}")):
        _load(path)


def test_error_duplicate_ids(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2}, {"prompt": "c", "id": 1}])
    with pytest.raises(UserError, match=re.escape(f"{path} line 3: duplicate id '1' in field 'id' (first at line 1)")):
        _load(path, fields=FieldMap(id="id"))


def test_error_empty_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n\n")
    with pytest.raises(UserError, match=re.escape(f"{path}: no rows")):
        _load(path)


def test_error_parquet_missing_field_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "x"}]), path)
    with pytest.raises(UserError, match=re.escape(f"{path} row 1: no field 'prompt'") + r".*columns here: q"):
        _load(path)


# ── HF datasets ──────────────────────────────────────────────────────────────────────────────
def test_hf_saved_dataset_with_mapping(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "gsm"
    Dataset.from_list([{"question": f"Q{i}?", "ans": i} for i in range(5)]).save_to_disk(str(folder))
    cfg = HFData(path=str(folder), fields=FieldMap(prompt="question", answer="ans"), eval_fraction=0.2, seed=1)
    train, evals = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert len(train) == 4 and len(evals) == 1
    assert {r["prompt"] for r in train + evals} == {f"Q{i}?" for i in range(5)}
    assert all(r["answer"] == r["prompt"][1:-1] for r in train + evals)
    assert train[0]["prompt_id"].startswith("gsm-train-")


def test_hf_dataset_dict_with_eval_split_and_missing_split(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]),
                 "test": Dataset.from_list([{"prompt": "c"}])}).save_to_disk(str(folder))
    cfg = HFData(path=str(folder), eval_split="test")
    assert [r["prompt"] for r in load_prompts(cfg, "train")] == ["a", "b"]
    assert [r["prompt"] for r in load_prompts(cfg, "eval")] == ["c"]
    with pytest.raises(UserError, match=r"no split 'validation'; splits here: train, test"):
        load_prompts(HFData(path=str(folder), split="validation"), "train")


def test_hf_plain_dataset_rejects_eval_split(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "plain"
    Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]).save_to_disk(str(folder))
    with pytest.raises(UserError, match=re.escape(f"HF dataset {folder} is one Dataset without splits")):
        load_prompts(HFData(path=str(folder), eval_split="test"), "eval")
