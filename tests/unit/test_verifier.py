"""Unit tests for stages.judge.math_rules (rule-based 1-5 math judge)."""

from __future__ import annotations

import random
import threading

import pytest

from stages.judge.math_rules import (
    Verdict,
    answers_match,
    extract_final_answer,
    intermediate_values,
    score_math,
)

# ---------------------------------------------------------------------------
# extract_final_answer
# ---------------------------------------------------------------------------

EXTRACTION_CASES = [
    # boxed, incl. nested braces
    (r"So we get $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"First \boxed{3}, then finally \boxed{{4}+{1}}", "{4}+{1}"),
    (r"\boxed{1,234}", "1234"),
    (r"\boxed{12 \text{ apples}}", "12"),
    # the LAST stated answer wins (this case encoded "a box beats a later phrase", now 7)
    (r"The answer is \boxed{42}. Actually the answer is 7.", "7"),
    (r"The answer is 7. Finally \boxed{42}", "42"),
    (r"unbalanced \boxed{5 and the answer is 6", "6"),
    # "answer is" phrases
    ("The answer is $1,234.", "1234"),
    ("So the answer is: -7 apples", "-7"),
    ("The answer is 12. Wait, no, the answer is 13.", "13"),
    ("The answer is 12. Wait, no, 13", "12"),  # only one "answer is": it wins
    ("The answer is 12.50", "12.50"),
    ("The answer is 3/4.", "3/4"),
    ("The answer is 7.", "7"),
    ("The final answer is 5", "5"),
    ("Final answer: 9", "9"),
    ("Answer: 11 cookies", "11"),
    ("final answer 8", "8"),
    ("THE ANSWER IS **15**.", "15"),
    ("The answer is 25%.", "25"),
    ("The answer is \u22123.", "-3"),
    ("The answer is 5 + 3 = 8.", "8"),
    ("The answer is unclear.\nThe answer is 10.", "10"),
    # GSM8K style
    ("2 + 2 = 4\n#### 42", "42"),
    ("#### 1,000", "1000"),
    # last-line fallbacks
    ("She has 3 apples.\nHe has 4.\nSo 3 + 4 = 7.", "7"),
    ("3 \u00d7 4 = 12 apples.", "12"),
    ("Total:\n  56  ", "56"),
    ("The discount is 50 \u00f7 2 = 25%", "25"),
    # nothing extractable
    ("There were 3 cats and 4 dogs in the park.", None),
    ("", None),
    ("   \n\n  ", None),
    ("I don't know the answer.", None),
    ("The answer is twelve.", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_handles_none_like_input():
    assert extract_final_answer(None) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# answers_match
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("1,234", "1234"),
        ("12.0", "12"),
        ("$12", "12"),
        ("12 apples", "12"),
        ("0.5", "1/2"),
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{84}{2}", "42"),
        ("-3", "-3"),
    ],
)
def test_answers_match_equal(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    "pred,gold",
    [("13", "12"), ("-12", "12"), ("1/3", "0.33"), ("x", "12"), (None, "12"), ("", "12")],
)
def test_answers_match_different(pred, gold):
    assert not answers_match(pred, gold)


# ---------------------------------------------------------------------------
# intermediate_values
# ---------------------------------------------------------------------------

SOLUTION = (
    "Tom buys 3 bags with 4 apples each: 3 × 4 = 12 apples.\n"
    "He gets 5 more: 12 + 5 = 17 apples.\n"
    "He eats 2, so 17 - 2 = 15 apples.\n"
    "The answer is 15."
)
ANSWER = "15"


def test_intermediate_values():
    assert intermediate_values(SOLUTION) == ["12", "17", "15"]


def test_intermediate_values_skips_answer_line_and_dedupes():
    sol = "a = 1,200 dollars\nb = 1200 - 200 = 1000\nThe answer is = 1000."
    assert intermediate_values(sol) == ["1200", "1000"]
    assert intermediate_values("") == []


# ---------------------------------------------------------------------------
# score_math: each level
# ---------------------------------------------------------------------------


def test_score_5_correct_with_working():
    resp = "3 × 4 = 12 apples.\n12 + 5 = 17 apples.\n17 - 2 = 15 apples.\nThe answer is 15."
    v = score_math(resp, ANSWER, SOLUTION)
    assert v == Verdict(5, "correct_with_working", "15")


def test_score_5_with_formatting_differences():
    resp = "He pays 10 * $1,000 = $10,000.\nThe answer is $10,000.00."
    assert score_math(resp, "10000").score == 5


def test_score_4_correct_without_working():
    v = score_math("Tom has some apples left.\nThe answer is 15.", ANSWER, SOLUTION)
    assert v == Verdict(4, "correct_without_working", "15")


def test_score_4_when_only_the_answer_line_computes():
    # the only computation is on the final-answer line itself
    v = score_math("So 17 - 2 = 15.", ANSWER, SOLUTION)
    assert (v.score, v.extracted) == (4, "15")


def test_score_3_wrong_answer_mostly_right_process():
    resp = "3 × 4 = 12 apples.\n12 + 5 = 17 apples.\n17 - 2 = 16 apples.\nThe answer is 16."
    v = score_math(resp, ANSWER, SOLUTION)
    assert v == Verdict(3, "wrong_answer_mostly_right_process", "16")


def test_score_2_wrong_answer():
    resp = "3 + 4 = 7 apples.\n7 + 5 = 13 apples.\nThe answer is 13."
    v = score_math(resp, ANSWER, SOLUTION)
    assert v == Verdict(2, "wrong_answer", "13")


def test_score_2_without_solution_even_if_process_right():
    resp = "3 × 4 = 12 apples.\n12 + 5 = 17 apples.\n17 - 2 = 16 apples.\nThe answer is 16."
    assert score_math(resp, ANSWER).score == 2
    assert score_math(resp, ANSWER, None).reason == "wrong_answer"


def test_score_1_no_final_answer():
    v = score_math("Tom likes apples. He has 3 bags of them and eats some.", ANSWER, SOLUTION)
    assert v == Verdict(1, "no_final_answer", None)
    assert score_math("", ANSWER, SOLUTION).score == 1


def test_score_boxed_latex_answer():
    v = score_math("Half of 84 is 84 / 2.\n$\\boxed{\\frac{84}{2}}$", "42")
    assert v.score == 5 and v.extracted == "\\frac{84}{2}"


# ---------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------


def test_score_math_in_non_main_thread():
    results: dict[str, object] = {}

    def work():
        try:
            results["numeric"] = score_math("12 + 5 = 17\nThe answer is 17.", "17")
            # non-plain-number answers go through math-verify
            results["latex"] = score_math("1 / 2 = 0.5\n\\boxed{\\frac{1}{2}}", "0.5")
        except BaseException as e:  # noqa: BLE001
            results["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    assert "error" not in results, results.get("error")
    assert results["numeric"] == Verdict(5, "correct_with_working", "17")
    assert results["latex"] == Verdict(5, "correct_with_working", "\\frac{1}{2}")


# Adversarial inputs (catastrophic-backtracking shapes): each must terminate (pytest-timeout)
# and give the verdict the rules say, with no assertion on wall-clock time.
ADVERSARIAL_CASES = [
    # a 480-term chain after "answer is" is evaluated exactly
    ("answer is " + "1 + " * 480 + "\n", "42", Verdict(2, "wrong_answer", "480")),
    ("answer is " + "1 + " * 480 + "\n", "480", Verdict(4, "correct_without_working", "480")),
    ("\\boxed{" * 250 + "1", "42", Verdict(1, "no_final_answer", None)),  # never balanced
    ("1," * 1000, "42", Verdict(1, "no_final_answer", None)),
    ("= " + "-$ " * 650 + "\n", "42", Verdict(1, "no_final_answer", None)),
    ("The answer is " + "(" * 2000, "42", Verdict(1, "no_final_answer", None)),
]


@pytest.mark.parametrize("text,answer,expected", ADVERSARIAL_CASES, ids=range(len(ADVERSARIAL_CASES)))
def test_adversarial_inputs_get_the_rule_verdict(text, answer, expected):
    assert score_math(text, answer, SOLUTION) == expected
    assert score_math(text, answer, SOLUTION, truncated=True).score in (1, 2)  # one line: nothing left


def _garbage(seed: int) -> str:
    rng = random.Random(seed)
    alphabet = "0123456789+-=*/x×÷$,.%{}()\\ abcAnswerIsboxed####\n"
    return "".join(rng.choice(alphabet) for _ in range(2000))


@pytest.mark.parametrize("text", [_garbage(0), _garbage(1), "The answer is " + _garbage(2)[:1980]])
@pytest.mark.parametrize("truncated", [False, True])
def test_random_garbage_gets_a_consistent_verdict(text, truncated):
    v = score_math(text, "42", SOLUTION, truncated=truncated)
    assert v.extracted == extract_final_answer(text, truncated=truncated)
    assert (v.score == 1) == (v.extracted is None)
    assert v.score in (1, 2, 3, 4, 5)
    assert v == score_math(text, "42", SOLUTION, truncated=truncated)  # deterministic


# ---------------------------------------------------------------------------
# loopholes (issue 9): each case failed before the fix
# ---------------------------------------------------------------------------

# 1. Working is a computation: a binary operation between two numbers, or "= N".
NOT_WORKING_CASES = [
    # a restated question with a percent, then the right answer
    "Tom has 80 dollars and spends 25% of it on a kite.\nThe answer is 60.",
    "The coat costs 80 dollars with 25\\% off.\nThe answer is 60.",
    "The coat costs 80 dollars with 25 percent off.\nThe answer is 60.",
    # list bullets
    "- 80 dollars\n- 25% off\nThe answer is 60.",
    "\u2212 80 dollars\nThe answer is 60.",
    "* 80 dollars\n* 20 off\nThe answer is 60.",
    # a numbered list restating the question
    "1. The coat costs 80 dollars.\n2. The discount is 25%.\nThe answer is 60.",
]


@pytest.mark.parametrize("response", NOT_WORKING_CASES)
def test_restated_question_is_not_working(response):
    assert score_math(response, "60") == Verdict(4, "correct_without_working", "60")


# legitimate working (passed before, must keep passing)
WORKING_CASES = [
    "3 + 4 = 7 apples.\nThe answer is 7.",
    "12 × 5 = 60\nThe answer is 60.",
    "The discount is 80 * 25 / 100 dollars.\nThe answer is 20.",
    "$3 \\times 4 = 12$\nThe answer is 12.",
    "$2 \\cdot 6$ apples\nThe answer is 12.",
    "She shares 10 ÷ 2 cookies.\nThe answer is 5.",
    "Apples = 12\nThe answer is 12.",
    "25% of 80 is 80 × 25 ÷ 100 = 20 dollars.\nThe answer is 20.",
    "1. 3 + 4 = 7\n2. The answer is 7.",
    "(3 + 4) × 2 = 14\nThe answer is 14.",
]


@pytest.mark.parametrize("response", WORKING_CASES)
def test_a_computation_is_working(response):
    v = score_math(response, extract_final_answer(response))
    assert (v.score, v.reason) == (5, "correct_with_working")


# 2a. a bare "2." last line is an ordered-list marker, not an answer
@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 + 4 = 7\n2.", None),
        ("Tom has 1 apple.\n2.", None),
        ("Step 1: 3 + 4 = 7.\n  2.  ", None),
        ("The answer is 7.\n2.", "7"),  # unchanged: the phrase still states it
    ],
)
def test_list_marker_last_line_is_not_an_answer(text, expected):
    assert extract_final_answer(text) == expected


# 2b. truncated=True (finish_reason == "length"): nothing is taken from the cut last line
TRUNCATED_CASES = [
    ("3 \u00d7 4 = 12 apples.\n12 + 5 = 17", None),  # mid-working "= 17"
    ("3 + 4 = 7", None),
    ("The answer is 12", None),  # may have been 125
    ("The answer is 12.\n\n", None),  # the last non-empty line counts as cut
    ("Total:\n56", None),
    ("\\boxed{12} is wrong, so the answer is 1", None),
    ("The answer is 12.\nLet me check: 3 \u00d7 4 = 1", "12"),  # earlier lines still count
    ("\\boxed{12}\nDouble-check: 12 + 0 = 12", "12"),
    ("#### 9\nand 3 + 4 = 7", "9"),
    ("3 + 4 = 7\n12 + 5 = 17\n", None),  # the last-line rule needs an ending
]


@pytest.mark.parametrize("text,expected", TRUNCATED_CASES)
def test_truncated_last_line_is_not_an_answer(text, expected):
    assert extract_final_answer(text, truncated=True) == expected


def test_truncated_scores_from_earlier_lines_only():
    resp = "3 \u00d7 4 = 12 apples.\n12 + 5 = 17 apples.\n17 - 2 = 15 apples.\nThe answer is 15.\nTo che"
    assert score_math(resp, ANSWER, SOLUTION, truncated=True) == Verdict(5, "correct_with_working", "15")
    assert score_math("3 \u00d7 4 = 12 apples.\n12 + 5 = 15", ANSWER, SOLUTION, truncated=True).score == 1
    assert score_math("3 \u00d7 4 = 12 apples.\n12 + 5 = 15", ANSWER, SOLUTION).score == 5  # not cut: it ended


# 3. an expression after an answer phrase gives its exact value
@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is 20 - 5", "15"),
        ("The answer is 20 - 5.", "15"),
        ("Answer: 3 \u00d7 4 apples", "12"),
        ("The answer is 80 * 25 / 100 dollars", "20"),
        ("The answer is 2 + 3 * 4", "14"),  # precedence
        ("The answer is 20 - 2 - 3", "15"),  # left to right
        ("The answer is 7 / 2", "7/2"),
        ("The answer is 1/2 + 1/4", "3/4"),
        ("The answer is 10 \u00f7 4", "5/2"),
        (r"The answer is $3 \times 4$", "12"),
        ("The answer is 5 + 3 = 4 + 4", "8"),
        ("The answer is 12 \u00f7 0", None),  # does not evaluate: nothing
        ("The answer is 12\n- 3 more apples", "12"),  # an expression stays on its line
    ],
)
def test_answer_phrase_expression_is_evaluated(text, expected):
    assert extract_final_answer(text) == expected


# 4. the final answer is the last stated one
@pytest.mark.parametrize(
    "text,expected",
    [
        ("answer: 5+3=8\nThen he gets 2 more: 8 + 2 = 10.", "10"),
        ("The answer is 7.\n#### 9", "9"),
        ("\\boxed{3}\nOn second thought, the answer is 4", "4"),
        ("The answer is 12.\nWait: 12 + 1 = 13", "13"),
        ("#### 9\nThe answer is 7.", "7"),  # unchanged: the phrase was already last
        ("The answer is 12, not 5 + 3 = 8.", "12"),  # same line: the phrase beats the last-line rule
    ],
)
def test_last_stated_answer_wins(text, expected):
    assert extract_final_answer(text) == expected


# 5. partial credit counts only intermediate values other than the answer
ONE_STEP = "Tom has 3 bags of 4 apples: 3 \u00d7 4 = 12 apples.\nThe answer is 12."
TWO_STEP = "Tom has 5 and gets 3 more: 5 + 3 = 8 apples.\nTom gives away 2: 8 - 2 = 6 apples.\nThe answer is 6."
PARTIAL_CREDIT_CASES = [
    # one step: no intermediate value but the answer, so a wrong answer scores 2
    ("Tom has 12 apples? No: 3 + 4 = 7.\nThe answer is 7.", "12", ONE_STEP, 2),
    ("3 \u00d7 4 = 12, plus 3 is 15.\nThe answer is 15.", "12", ONE_STEP, 2),
    # two steps: mentioning the answer (6) is not half the process
    ("Tom had 6 apples? 5 + 2 = 7\nThe answer is 7.", "6", TWO_STEP, 2),
    # ... while the real intermediate value (8) still earns it
    ("5 + 3 = 8 apples.\n8 - 3 = 5 apples.\nThe answer is 5.", "6", TWO_STEP, 3),
]


@pytest.mark.parametrize("response,answer,solution,score", PARTIAL_CREDIT_CASES)
def test_partial_credit_needs_intermediate_values_other_than_the_answer(response, answer, solution, score):
    assert score_math(response, answer, solution).score == score


def test_one_step_solution_has_only_the_answer_as_intermediate_value():
    assert intermediate_values(ONE_STEP) == ["12"]  # hence no partial credit for one-step problems


# 6. a missing reference answer is an error, not a silent cap at 3
@pytest.mark.parametrize("answer", [None, "", "   "])
def test_missing_answer_is_an_error(answer):
    with pytest.raises(ValueError, match="reference answer"):
        score_math("3 + 4 = 7\nThe answer is 7.", answer, "3 + 4 = 7.\nThe answer is 7.")
