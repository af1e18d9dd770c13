"""Unit tests for stages.judge.verifier (rule-based 1-5 math judge)."""

from __future__ import annotations

import threading
import time

import pytest

from stages.judge.verifier import (
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
    # boxed, incl. nested braces; boxed wins over a later "answer is"
    (r"So we get $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"First \boxed{3}, then finally \boxed{{4}+{1}}", "{4}+{1}"),
    (r"\boxed{1,234}", "1234"),
    (r"\boxed{12 \text{ apples}}", "12"),
    (r"The answer is \boxed{42}. Actually the answer is 7.", "42"),
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


def test_garbage_returns_fast():
    import random

    rng = random.Random(0)
    alphabet = "0123456789+-=*/x×÷$,.%{}()\\ abcAnswerIsboxed####\n"
    garbage = "".join(rng.choice(alphabet) for _ in range(2000))
    worst = (
        "answer is " + "1 + " * 480 + "\n",
        "\\boxed{" * 250 + "1",
        "1," * 1000,
        "= " + "-$ " * 650 + "\n",
    )
    answer_is_garbage = "The answer is " + garbage[:1980]
    for text in (garbage, answer_is_garbage, *worst):
        t0 = time.perf_counter()
        v = score_math(text, "42", SOLUTION)
        assert time.perf_counter() - t0 < 1.0
        assert 1 <= v.score <= 5
