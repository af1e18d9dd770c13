"""Unit tests for stages.judge.parse: one 1-5 score out of a judge's reply, or a refusal saying why."""

from __future__ import annotations

import pickle

import pytest

from stages.judge.parse import (
    Judgement,
    Unparseable,
    describe_unparseable,
    parse_json,
    parse_judgement,
    parse_text,
)

GPT4_MARKDOWN = """\
### Evaluation

**Correctness of the final answer:** The response concludes that $x = 12$, which matches the
reference answer.

**Process:**
1. Step 1 sets up $3x + 4 = 40$ correctly.
2. Step 2 subtracts 4 from both sides: $3x = 36$.
3. Step 3 computes 12 by dividing by 3.

All steps are correct and the reasoning is complete; no cases are missed.

**Score: 5**"""

GPT4_HEADING = """\
## Analysis
The answer (7) is correct, but the response gives no working at all for a multi-step problem,
so per the rubric (4 points: correct answer, process missing) it cannot get 5.

## Score
4"""

TEXT_TABLE = [
    # (id, reply, expected score)
    ("plain", "Score: 4", 4),
    ("bold label", "The reasoning is sound.\n\n**Score**: 4/5", 4),
    ("out of 5", "Mostly correct but verbose.\nScore: 4 out of 5", 4),
    ("final score", "The answer is wrong and so is most of the process.\nFinal score: 2", 2),
    ("equals", "score = 3", 3),
    ("mt-bench brackets", "The response is correct and complete.\nRating: [[5]]", 5),
    ("mt-bench brackets alone", "Explanation: wrong answer, partly right process. [[3]]", 3),
    ("claude bold", "The final answer is incorrect and the approach is mostly wrong.\n\n**Score: 2**", 2),
    ("markdown heading", GPT4_HEADING, 4),
    ("gpt-4 markdown with other numbers", GPT4_MARKDOWN, 5),
    ("numbers before the label", "Step 3 computes 12, step 4 gets 48 of 50 cases.\nScore: 5", 5),
    ("rubric range in label", "Score (1-5): 3", 3),
    ("bold label own line", "Good work overall.\n\n**Final Score:**\n\n**4**", 4),
    ("same score twice", "Score: 3\n\nThe answer is wrong but most steps hold.\nScore: 3", 3),
    ("same score label and brackets", "Rating: [[4]]\nScore: 4/5", 4),
    ("label beats last line", "Score: 2\n\nNote: a 5 needs every case.\n5", 2),
    ("lone last line", "The process is right and complete.\n4", 4),
    ("lone last line with period", "The process is right and complete.\n4.", 4),
    ("lone bold last line", "The process is right and complete.\n\n**4**", 4),
    ("lone fraction last line", "Correct but verbose.\n4/5", 4),
    ("lone points last line", "Wrong answer, wrong method.\n1 point", 1),
    ("json in text mode", 'Here is my verdict: {"reasoning": "fine", "score": 4}', 4),
    ("prose only", "I would give this response a score of 3.", 3),
    ("prose ignored when labelled", "A score of 5 would need all cases.\nScore: 4", 4),
]

TEXT_REFUSALS = [
    # (id, reply, why)
    ("two different", "Score: 3\n\nOn reflection the process is fine.\nScore: 4", "two different scores (3 and 4)"),
    ("three different", "Score: 3\nScore: 4\nRating: [[5]]", "3 different scores (3, 4 and 5)"),
    ("bracket vs label", "[[2]]\nScore: 4", "two different scores (2 and 4)"),
    ("undecided", "I cannot decide between 3 and 4", "no score found"),
    ("number mid-sentence", "The answer is 4 and the process is fine", "no score found"),
    ("score word only", "Score: the response is mostly right.", "no score found"),
    ("list under a score heading", "## Score:\n1. The answer is right", "no score found"),
    ("range", "Score: 4-5", "score range 4-5, not one score"),
    ("or", "Score: 3 or 4", "score range 3-4, not one score"),
    ("zero", "Score: 0", "score 0 is outside 1-5"),
    ("six", "Final score: 6", "score 6 is outside 1-5"),
    ("seven", "**Score: 7**", "score 7 is outside 1-5"),
    ("ten", "Rating: [[10]]", "score 10 is outside 1-5"),
    ("ten-point scale", "Score: 8/10", "score 8/10 is not on the 1-5 scale"),
    ("half point", "Score: 4.5", "score 4.5 is not a whole number"),
    ("half point last line", "Between good and great.\n4.5", "score 4.5 is not a whole number"),
    ("lone last line out of range", "Nothing here is right.\n0", "score 0 is outside 1-5"),
    ("empty", "", "empty reply"),
    ("whitespace", "  \n\t ", "empty reply"),
]


@pytest.mark.parametrize("reply, score", [c[1:] for c in TEXT_TABLE], ids=[c[0] for c in TEXT_TABLE])
def test_parse_text_reads_the_one_stated_score(reply, score):
    judgement = parse_text(reply)
    assert judgement == Judgement(score=score, reasoning=reply.strip())


@pytest.mark.parametrize("reply, why", [c[1:] for c in TEXT_REFUSALS], ids=[c[0] for c in TEXT_REFUSALS])
def test_parse_text_refuses_ambiguous_or_out_of_range_replies(reply, why):
    with pytest.raises(Unparseable) as info:
        parse_text(reply)
    assert info.value.why == why


JSON_TABLE = [
    ("strict", '{"reasoning": "Correct and complete.", "score": 5}', 5, "Correct and complete."),
    ("order and spaces", '\n  { "score" : 2 , "reasoning" : "Wrong answer." }  \n', 2, "Wrong answer."),
    ("json fence", '```json\n{"reasoning": "Correct, verbose.", "score": 4}\n```', 4, "Correct, verbose."),
    ("bare fence", '```\n{"reasoning": "ok", "score": 3}\n```', 3, "ok"),
    ("score as string", '{"reasoning": "ok", "score": "4"}', 4, "ok"),
    ("score as float", '{"reasoning": "ok", "score": 4.0}', 4, "ok"),
    ("missing reasoning", '{"score": 1}', 1, ""),
    ("extra keys", '{"reasoning": "r", "score": 3, "confidence": 0.9}', 3, "r"),
]

JSON_REFUSALS = [
    ("half", '{"reasoning": "r", "score": 4.5}', "score 4.5 is not a whole number"),
    ("bool", '{"reasoning": "r", "score": true}', "JSON without an integer score"),
    ("word", '{"reasoning": "r", "score": "four"}', "JSON without an integer score"),
    ("null", '{"reasoning": "r", "score": null}', "JSON without an integer score"),
    ("missing", '{"reasoning": "r"}', "JSON without an integer score"),
    ("six", '{"reasoning": "r", "score": 6}', "score 6 is outside 1-5"),
    ("zero string", '{"reasoning": "r", "score": "0"}', "score 0 is outside 1-5"),
    ("list", "[4]", "JSON list instead of an object"),
    ("reasoning not text", '{"reasoning": ["a"], "score": 4}', "JSON reasoning is not a string"),
    ("cut at max_tokens", '{"reasoning": "The answer is right and Score: 5 is dese', "malformed JSON"),
]


@pytest.mark.parametrize("reply, score, reasoning", [c[1:] for c in JSON_TABLE], ids=[c[0] for c in JSON_TABLE])
def test_parse_json_reads_score_and_reasoning(reply, score, reasoning):
    assert parse_json(reply) == Judgement(score=score, reasoning=reasoning)
    assert parse_judgement(reply, "json_schema") == Judgement(score=score, reasoning=reasoning)


@pytest.mark.parametrize("reply, why", [c[1:] for c in JSON_REFUSALS], ids=[c[0] for c in JSON_REFUSALS])
def test_parse_json_refuses_wrong_shapes(reply, why):
    with pytest.raises(Unparseable) as info:
        parse_json(reply)
    assert info.value.why == why


def test_json_schema_reply_cut_mid_object_is_refused_not_read_as_text():
    # the text parser would find "Score: 5" inside the half-written reasoning
    with pytest.raises(Unparseable) as info:
        parse_judgement('{"reasoning": "The answer is right and Score: 5 is dese', "json_schema")
    assert info.value.why == "malformed JSON"
    with pytest.raises(Unparseable) as info:
        parse_judgement('{"reasoning": "r", "score": 6}', "json_schema")
    assert info.value.why == "score 6 is outside 1-5"


def test_json_schema_reply_that_is_plain_text_is_read_as_text():
    # some servers ignore response_format and answer in prose
    assert parse_judgement("The process is sound.\n\nScore: 4", "json_schema").score == 4
    with pytest.raises(Unparseable) as info:
        parse_judgement("I cannot decide between 3 and 4", "json_schema")
    assert info.value.why == "no score found"


def test_text_format_reads_text_and_json_lookalikes():
    assert parse_judgement("Reasoning...\n**Score: 3**", "text") == Judgement(3, "Reasoning...\n**Score: 3**")
    assert parse_judgement('{"reasoning": "r", "score": 2}', "text").score == 2


@pytest.mark.parametrize("content", [None, "", "   \n"])
@pytest.mark.parametrize("fmt", ["json_schema", "text"])
def test_empty_reply_is_unparseable(content, fmt):
    with pytest.raises(Unparseable) as info:
        parse_judgement(content, fmt)
    assert info.value.why == "empty reply"


def test_unknown_response_format_is_an_internal_error():
    with pytest.raises(ValueError, match="response_format"):
        parse_judgement("Score: 4", "yaml")


def test_unparseable_is_a_value_error_that_survives_pickling():
    # Ray ships exceptions between processes
    err = pickle.loads(pickle.dumps(Unparseable("no score found")))
    assert isinstance(err, ValueError) and err.why == "no score found"


def test_describe_unparseable_cuts_long_replies_with_an_ellipsis():
    content = "I cannot decide.\nThe answer could be 3\nor it could be 4, since the process has gaps and the answer"
    reason = describe_unparseable(Unparseable("no score found"), content)
    shown = content.replace("\n", " ")[:60]
    assert reason == f'unparseable: no score found: "{shown}…"'
    assert "\n" not in reason


def test_describe_unparseable_keeps_short_replies_whole():
    assert describe_unparseable(Unparseable("score 7 is outside 1-5"), "Score: 7\n") == 'unparseable: score 7 is outside 1-5: "Score: 7"'
    assert describe_unparseable(Unparseable("empty reply"), None) == 'unparseable: empty reply: ""'
    assert describe_unparseable(Unparseable("x"), "abcdef", limit=3) == 'unparseable: x: "abc…"'
    assert describe_unparseable(Unparseable("x"), "abc", limit=3) == 'unparseable: x: "abc"'
