"""Unit tests for stages.judge.rubric: the shipped rubric against the paper, rubric checks, messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.errors import UserError
from stages.judge.rubric import (
    FORMAT_INSTRUCTIONS,
    JSON_SCHEMA,
    NO_REFERENCE,
    check_rubric,
    judge_messages,
    load_rubric,
    render_reference,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "rubrics" / "math_1to5.txt"
PAPER_NAME = "003_6e4346ee6126f20e.txt"  # the 3D-properties paper (Appendix C, score-criteria table)
PAPER = next((p for p in (REPO / "shared" / "research" / PAPER_NAME, REPO.parent / "shared" / "research" / PAPER_NAME) if p.exists()), None)

# The five levels as the paper writes them (copied from its score-criteria table), for checkouts
# without the research folder; test_copied_levels_match_the_paper pins this copy to the paper.
LEVELS = {
    5: "Full-score answer, requiring a correct response with the correct process, considering all possibilities, and being comprehensive.",
    4: "For complex questions, the answer is correct but lacks the process; for simple questions, the answer is correct but accompanied by a very redundant and verbose reasoning process.",
    3: "The answer is incorrect, but most of the process is correct, or the answer is correct, but there are obvious errors in the process.",
    2: "The answer is incorrect, and most of the process is incorrect.",
    1: "The answer and the entire process and thought process are incorrect, or the answer doesn\u2019t process to final result.",
}  # fmt: skip


def paper_levels() -> dict[int, str]:
    if PAPER is None:
        pytest.skip(f"research file {PAPER_NAME} not in this checkout")
    rows = re.findall(r"^([1-5]) points? \| ([^|\n]+?) \|$", PAPER.read_text(encoding="utf-8"), re.M)
    assert len(rows) == 5, rows
    return {int(n): text for n, text in rows}


def test_shipped_rubric_carries_the_papers_five_levels_verbatim():
    rubric = SHIPPED.read_text(encoding="utf-8")
    for n, text in paper_levels().items():
        assert f"{n} point{'s' if n > 1 else ''}: {text}" in rubric


def test_copied_levels_match_the_paper():
    assert paper_levels() == LEVELS


def test_shipped_rubric_carries_the_copied_levels_in_order():
    rubric = SHIPPED.read_text(encoding="utf-8")
    positions = [rubric.index(LEVELS[n]) for n in (5, 4, 3, 2, 1)]
    assert positions == sorted(positions)


def test_shipped_rubric_loads_and_leaves_output_format_to_code():
    rubric = load_rubric(str(SHIPPED))
    assert {"{question}", "{response}", "{reference}"} <= set(re.findall(r"\{\w+\}", rubric))
    assert "Score:" not in rubric and "JSON" not in rubric


def test_missing_response_names_field_file_and_fix(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("Question: {question}\nReference: {reference}\n")
    with pytest.raises(UserError) as info:
        load_rubric(str(path), field="judge.rubric")
    msg = str(info.value)
    assert f"judge.rubric ({path})" in msg
    assert "{response}" in msg and "where the judged answer should appear" in msg
    assert "missing placeholder {question}" not in msg  # only the missing one is named


def test_missing_both_required_names_both():
    with pytest.raises(UserError) as info:
        check_rubric("Judge this.", "judge.rubric (r.txt)")
    msg = str(info.value)
    assert msg.startswith("judge.rubric (r.txt): ")
    assert "missing placeholder {question}" in msg and "missing placeholder {response}" in msg


def test_unknown_placeholder_is_named_with_the_allowed_ones():
    with pytest.raises(UserError) as info:
        check_rubric("{question}\n{response}\n{answer}", "judge.rubric (r.txt)")
    msg = str(info.value)
    assert "unknown placeholder {answer}" in msg
    assert "{question}" in msg and "{response}" in msg and "{reference}" in msg
    assert "doubled" in msg


def test_literal_json_braces_must_be_doubled():
    with pytest.raises(UserError, match=r'unknown placeholder \{"score": 4\}'):
        check_rubric('{question} {response} Reply like {"score": 4}', "r")
    check_rubric('{question} {response} Reply like {{"score": 4}}', "r")


@pytest.mark.parametrize("placeholder", ["{response!r}", "{response:>10}", "{response.text}", "{response[0]}"])
def test_placeholder_with_conversion_spec_or_attribute_is_refused(placeholder):
    with pytest.raises(UserError) as info:
        check_rubric(f"{{question}} {placeholder}", "judge.rubric (r.txt)")
    assert placeholder in str(info.value) and "plainly as {response}" in str(info.value)


@pytest.mark.parametrize("positional", ["{}", "{0}"])
def test_positional_placeholder_is_unknown(positional):
    with pytest.raises(UserError, match="unknown placeholder"):
        check_rubric(f"{{question}} {{response}} {positional}", "r")


@pytest.mark.parametrize("text", ["{question} {response} {", "{question} {response} }", "{question {response}"])
def test_malformed_braces_are_refused(text):
    with pytest.raises(UserError) as info:
        check_rubric(text, "judge.rubric (r.txt)")
    assert "judge.rubric (r.txt)" in str(info.value) and "not a valid template" in str(info.value)


def test_reference_is_optional():
    check_rubric("Q: {question}\nA: {response}", "r")


def test_load_rubric_missing_or_empty_file_names_field_and_path(tmp_path):
    with pytest.raises(UserError, match=r"judge\.rubric \(.*nope\.txt\): no such file"):
        load_rubric(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match=r"judge\.rubric \(.*empty\.txt\): the rubric file is empty"):
        load_rubric(str(empty))
    with pytest.raises(UserError, match="cannot read"):
        load_rubric(str(tmp_path))  # a folder


def test_render_reference_shows_the_parts_that_exist():
    assert render_reference("Add them: 2+2=4.", "4") == "Reference solution:\nAdd them: 2+2=4.\n\nReference answer: 4"
    assert render_reference("Add them.", None) == "Reference solution:\nAdd them."
    assert render_reference(float("nan"), "4") == "Reference answer: 4"
    assert render_reference(None, 12) == "Reference answer: 12"


@pytest.mark.parametrize("solution, answer", [(None, None), (float("nan"), float("nan")), ("", "  "), (None, float("nan"))])
def test_render_reference_without_any_says_so(solution, answer):
    assert render_reference(solution, answer) == NO_REFERENCE


def test_render_reference_accepts_pandas_missing_values():
    pd = pytest.importorskip("pandas")
    assert render_reference(pd.NA, None) == NO_REFERENCE
    row = pd.DataFrame({"solution": [None], "answer": ["7"]}).iloc[0]
    assert render_reference(row["solution"], row["answer"]) == "Reference answer: 7"


def _content(**overrides) -> str:
    kwargs = dict(question="What is 6*7?", response="6*7 = 42. The answer is 42.", solution="6*7=42", answer="42", response_format="text")
    kwargs.update(overrides)
    messages = judge_messages(SHIPPED.read_text(encoding="utf-8"), **kwargs)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    return messages[0]["content"]


def test_judge_messages_show_question_response_and_reference():
    content = _content()
    assert "What is 6*7?" in content and "6*7 = 42. The answer is 42." in content
    assert "Reference solution:\n6*7=42" in content and "Reference answer: 42" in content
    assert NO_REFERENCE not in content
    assert LEVELS[5] in content and "{question}" not in content


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_judge_messages_without_reference_say_none_is_available(missing):
    content = _content(solution=missing, answer=missing)
    assert NO_REFERENCE in content and "Reference answer" not in content


def test_judge_messages_keep_braces_in_question_and_response():
    content = _content(question="Find {x : x > 2}", response="The set {3, 4}")
    assert "Find {x : x > 2}" in content and "The set {3, 4}" in content


def test_judge_messages_end_with_the_format_instruction_after_a_blank_line():
    text, js = _content(response_format="text"), _content(response_format="json_schema")
    assert text.endswith("\n\n" + FORMAT_INSTRUCTIONS["text"])
    assert js.endswith("\n\n" + FORMAT_INSTRUCTIONS["json_schema"])
    assert text != js
    assert "Score: N" in FORMAT_INSTRUCTIONS["text"] and '"score"' in FORMAT_INSTRUCTIONS["json_schema"]


def test_judge_messages_are_deterministic_and_depend_on_their_inputs():
    assert _content() == _content()
    assert _content(response="43") != _content(response="44")


def test_judge_messages_refuse_an_unchecked_bad_rubric_and_unknown_format():
    with pytest.raises(UserError, match=r"missing placeholder \{response\}"):
        judge_messages("{question}", question="q", response="r", solution=None, answer=None, response_format="text")
    with pytest.raises(ValueError, match="response_format"):
        _content(response_format="yaml")


def test_json_schema_is_the_openai_response_format():
    schema = JSON_SCHEMA["json_schema"]["schema"]
    assert JSON_SCHEMA["type"] == "json_schema" and JSON_SCHEMA["json_schema"]["strict"] is True
    assert schema["properties"]["score"] == {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    assert schema["required"] == ["reasoning", "score"] and schema["additionalProperties"] is False
    assert json.loads(json.dumps(JSON_SCHEMA)) == JSON_SCHEMA
