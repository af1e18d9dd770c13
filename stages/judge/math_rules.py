"""Rule-based math scoring, the verifier judge's rubric: a stand-in for the "3D-Properties" GPT-4 judge.

The research protocol scores a response to a grade-school arithmetic word
problem on a 1-5 scale (5 = correct answer with a correct, complete process;
4 = correct answer but the process is missing or very redundant; 3 = wrong
answer but most of the process right; 2 = wrong answer and mostly wrong
process; 1 = answer and process entirely wrong, or no final result).  This
module approximates that rubric without an LLM, using the reference
``answer`` (required: :func:`score_math` raises ``ValueError`` without one)
and, optionally, the reference ``solution``:

=====  =====================================  ===================================================
score  reason                                 when
=====  =====================================  ===================================================
5      ``correct_with_working``               the extracted final answer equals the reference AND
                                              working is shown: at least one line *other than the
                                              line holding the final answer* holds a computation,
                                              i.e. a binary operation between two numbers
                                              (``3 + 4``, ``12 × 5``, ``80 * 25 / 100``,
                                              ``3 \\times 4``, ``2 \\cdot 6``, ``10 ÷ 2``; a
                                              ``/`` needs a space on one side, since ``3/4`` is a
                                              number) or an equation with a number after ``=``
                                              (``= 12``).  A percent sign (``25%``), a list bullet
                                              (``- 3 apples``) or a numbered list (``1. ...``) is
                                              not working.
4      ``correct_without_working``            the final answer is correct, but no such line exists.
3      ``wrong_answer_mostly_right_process``  the final answer is wrong, but at least half (and at
                                              least one) of the reference solution's intermediate
                                              values (see :func:`intermediate_values`) *other than
                                              the reference answer itself* appear as numbers in
                                              the response.  A one-step solution has none left, so
                                              its wrong answers score 2.
2      ``wrong_answer``                       a final answer was extracted but it is wrong (and the
                                              score-3 condition does not hold, e.g. no ``solution``).
1      ``no_final_answer``                    no final answer could be extracted.
=====  =====================================  ===================================================

Final-answer extraction (:func:`extract_final_answer`): the final answer is the
LAST one stated.  Every construct below is found, and the one that starts last
in the text wins (on the same line a phrase, box or ``####`` beats rule 4, whose
position is the start of its line):

1. the last ``\\boxed{...}`` (balanced braces; a plain number inside is cleaned,
   other LaTeX such as ``\\frac{1}{2}`` is kept as written);
2. the last ``answer is[:] X`` / ``answer: X`` / ``final answer[:] X`` phrase
   (case-insensitive) followed, on the same line, by a number or an arithmetic
   chain: ``5 + 3 = 8`` gives the value after the last ``=`` (8), an expression
   without ``=`` such as ``20 - 5`` gives its exact value (15; ``+ - × x * / ÷``,
   usual precedence, :class:`fractions.Fraction`, no ``eval``);
3. the last ``#### X``;
4. the last non-empty line, if it is just a number or ends with ``= N``
   (optionally followed by a few unit words and a period, e.g. ``So 3 + 4 = 7.``)
   -- but not a bare integer with a period (``2.``), the shape of a list marker.

A response cut by the token limit (``truncated=True``, the sampler's
``finish_reason == "length"``) did not end: its last non-empty line is
incomplete (``answer is 12`` may have become ``answer is 125``), so nothing is
taken from that line by any rule, and rule 4 does not apply; constructs on
earlier lines still count.

Numbers are returned cleaned: no ``$``, thousands separators, ``%``, units or
trailing period (``"$1,234."`` -> ``"1234"``, ``"-7 apples"`` -> ``"-7"``);
decimals and fractions are kept as written (``"12.50"``, ``"3/4"``); the value
of an expression is an integer or ``a/b`` (``"15"``, ``"3/2"``).

Correctness: when both sides are plain numbers (integer, decimal or ``a/b``)
they are compared exactly as :class:`fractions.Fraction` (so ``"12.0" == "12"``,
``"1/2" == "0.5"``).  Otherwise ``math_verify.verify(parse(gold), parse(pred))``
is used with its signal-based timeouts disabled (``parsing_timeout=None``,
``timeout_seconds=None``) so the judge works in non-main threads (Ray actors);
inputs longer than a few hundred characters are not sent to math-verify.

All functions are pure: no Ray, no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "Verdict",
    "answers_match",
    "extract_final_answer",
    "intermediate_values",
    "score_math",
]


@dataclass(frozen=True)
class Verdict:
    score: int  # 1..5
    reason: str  # short machine-friendly reason, e.g. "correct_with_working"
    extracted: str | None  # the final answer string we extracted, or None


# ---------------------------------------------------------------------------
# number patterns
# ---------------------------------------------------------------------------

_MINUS = "-\u2212"  # ASCII hyphen-minus and unicode minus sign
# unsigned magnitude: "1,234", "1234", "12.50", ".5"
_MAG = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
# optional sign / currency, optional "/b" fraction part (no spaces inside a fraction)
_NUM = rf"(?:[{_MINUS}]\s?)?\$?\s?(?:[{_MINUS}])?{_MAG}(?:/{_MAG})?"
_NUM_RE = re.compile(_NUM)
_PLAIN_NUMBER_RE = re.compile(rf"[{_MINUS}]?(?:\d+(?:\.\d+)?|\.\d+)(?:/(?:\d+(?:\.\d+)?|\.\d+))?")
_OP = r"(?:[-+\u2212\u00d7xX*/\u00f7]|\\times|\\cdot|\\div)"
_MUL_OPS = ("\u00d7", "x", "X", "*", "\\times", "\\cdot")
_DIV_OPS = ("/", "\u00f7", "\\div")
_SP = r"[ \t]*"  # a chain stays on one line: "answer is 12\n- 3 more" is 12, not 9

# "answer is[:] X" / "answer: X" / "final answer[:] X"  (X is parsed from what follows)
_ANSWER_PHRASE_RE = re.compile(
    r"(?:\bfinal\s+answer\s*(?:is\s*)?:?|\banswer\s+is\s*:?|\banswer\s*:)",
    re.IGNORECASE,
)
# what may sit between the phrase and the number: spaces, markdown bold, math delimiters
_LEAD_RE = re.compile(r"(?:\s|\*|_|\\\(|\\\[|\$(?!\s?\d))*")
_EXPR = rf"{_NUM}(?:{_SP}{_OP}{_SP}{_NUM})*"
_CHAIN_RE = re.compile(rf"{_EXPR}(?:{_SP}={_SP}{_EXPR})*")
_OPERATOR_RE = re.compile(rf"{_SP}(?P<op>{_OP}){_SP}")
_HASH_RE = re.compile(rf"####\s*(?P<num>{_NUM})")
_LAST_LINE_NUMBER_RE = re.compile(rf"^[\s*$]*(?P<num>{_NUM})\s*%?[\s*]*\.?[\s*]*$")
_LAST_LINE_EQUALS_RE = re.compile(
    rf"=\s*(?P<num>{_NUM})\s*%?(?:\s+[A-Za-z][A-Za-z' ]{{0,40}})?\s*[.!]?[\s*]*$"
)
_LIST_MARKER_RE = re.compile(r"\s*\d+\.\s*")  # "2." alone: an ordered-list marker, not an answer
_EQUALS_VALUE_RE = re.compile(rf"=\s*(?P<num>{_NUM})")
_FINAL_LINE_RE = re.compile(r"answer\s+is", re.IGNORECASE)

# Working: a binary operation between two numbers, or an equation with a number after "=".
# "/" needs a space on one side ("3/4" is a number); a left operand may carry "%" or ")", a
# right one "(", "$" or a sign. A bare "25%", a "- 3" bullet or a "1." list marker matches neither.
_BINARY_OP = (
    r"(?:[ \t]*(?:[-+\u2212*\u00f7\u00d7xX]|\\times|\\cdot|\\div)[ \t]*"
    r"|[ \t]+/[ \t]*|[ \t]*/[ \t]+)"
)
_RIGHT_OPERAND = rf"(?:[(\$][ \t]?|[{_MINUS}][ \t]?)*\.?\d"
_WORKING_RE = re.compile(
    rf"\d(?:[ \t]*(?:%|\\%|\)))*{_BINARY_OP}{_RIGHT_OPERAND}"
    rf"|={_SP}{_RIGHT_OPERAND}"
)

_MATH_VERIFY_MAX_CHARS = 300


# ---------------------------------------------------------------------------
# cleaning helpers
# ---------------------------------------------------------------------------


def _clean_number(token: str) -> str:
    """'$1,234' -> '1234', '- 7' -> '-7', '\u22123' -> '-3', '+5' -> '5'."""
    s = token.replace("\u2212", "-").replace("$", "").replace(",", "")
    s = re.sub(r"\s+", "", s)
    negative = s.count("-") % 2 == 1
    s = s.replace("-", "").lstrip("+")
    if s.startswith("."):
        s = "0" + s
    s = s.replace("/.", "/0.")
    return ("-" + s) if negative and s.strip("0./") else s


def _strip_latex_wrappers(s: str) -> str:
    s = s.strip()
    s = re.sub(r"\\text\s*\{[^{}]*\}", " ", s)
    s = re.sub(r"\\(?:mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("\\$", "$").replace("\\!", "").replace("\\,", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


_NUMBER_WITH_UNITS_RE = re.compile(
    rf"^[\s*]*(?P<num>{_NUM})\s*(?:%|percent)?(?:\s*[A-Za-z][A-Za-z' ]{{0,40}})?\s*[.!]?[\s*]*$"
)


def _as_plain_number(s: str) -> str | None:
    """Return the cleaned number if ``s`` is a number possibly decorated with
    currency, commas, percent, units and a trailing period; else None."""
    s = _strip_latex_wrappers(s)
    m = _NUMBER_WITH_UNITS_RE.match(s)
    if not m:
        return None
    cleaned = _clean_number(m.group("num"))
    return cleaned if _PLAIN_NUMBER_RE.fullmatch(cleaned) else None


def _to_fraction(s: str) -> Fraction | None:
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


# ---------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------


def _find_boxed(text: str) -> tuple[str, int] | None:
    """Content and start offset of the last ``\\boxed{...}`` / ``\\fbox{...}``
    whose braces balance; None if there is none."""
    best: tuple[str, int] | None = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 1
        i = m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth == 0:
            best = (text[m.end() : i - 1], m.start())
    return best


def _evaluate(expr: str) -> Fraction | None:
    """Exact value of an arithmetic expression such as ``20 - 5`` or ``80 * 25 ÷ 100``:
    numbers as :data:`_NUM` spells them, ``+ - × x * / ÷``, usual precedence, left to right.
    None if it does not parse or divides by zero. No ``eval``."""
    pos, total, term, sign = 0, Fraction(0), None, 1
    op = "+"
    while True:
        m = _NUM_RE.match(expr, pos)
        value = _to_fraction(_clean_number(m.group(0))) if m else None
        if value is None:
            return None
        pos = m.end()
        if op in _MUL_OPS:
            term *= value
        elif op in _DIV_OPS:
            if value == 0:
                return None
            term /= value
        else:  # + or -: the finished term joins the sum, a new one starts
            if term is not None:
                total += sign * term
            term, sign = value, (-1 if op in _MINUS else 1)
        if pos == len(expr):
            return total + sign * term
        m = _OPERATOR_RE.match(expr, pos)
        if not m:
            return None
        op, pos = m.group("op"), m.end()


def _format_value(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _value_after(text: str, pos: int) -> str | None:
    """The answer stated right after an 'answer is' phrase ending at ``pos``: a number, the
    value after the last '=' of a chain ('5 + 3 = 8' -> '8'), or the value of an expression
    without '=' ('20 - 5' -> '15')."""
    lead = _LEAD_RE.match(text, pos)
    pos = lead.end() if lead else pos
    m = _CHAIN_RE.match(text, pos)
    if not m:
        return None
    stated = m.group(0).rsplit("=", 1)[-1].strip()
    if _NUM_RE.fullmatch(stated):  # a single number: keep it as written ("12.50", "3/4")
        return _clean_number(stated)
    value = _evaluate(stated)
    return None if value is None else _format_value(value)


def _last_line_answer(text: str) -> tuple[str, int] | None:
    """Rule 4: the last non-empty line is just a number or ends with '= N'; (value, line start)."""
    stripped = text.rstrip()
    start = stripped.rfind("\n") + 1
    last = stripped[start:]
    if _LIST_MARKER_RE.fullmatch(last):
        return None
    m = _LAST_LINE_NUMBER_RE.match(last) or _LAST_LINE_EQUALS_RE.search(last)
    return (_clean_number(m.group("num")), start) if m else None


def _candidates(text: str) -> Iterator[tuple[str, int]]:
    """Every construct that states a final answer, as (cleaned answer, offset), in rule order."""
    boxed = _find_boxed(text)
    if boxed is not None:
        content, start = boxed
        plain = _as_plain_number(content)
        if plain is not None or content.strip():
            yield (plain if plain is not None else content.strip()), start
    for m in _ANSWER_PHRASE_RE.finditer(text):
        value = _value_after(text, m.end())
        if value is not None:
            yield value, m.start()
    hashes = list(_HASH_RE.finditer(text))
    if hashes:
        yield _clean_number(hashes[-1].group("num")), hashes[-1].start()


def _extract(text: str, truncated: bool = False) -> tuple[str, int] | None:
    """(cleaned answer, offset of the construct it came from) of the last stated answer, or None."""
    if truncated:  # the last non-empty line was cut off mid-way: keep only the lines before it
        text = text[: max(text.rstrip().rfind("\n"), 0)]
    if not text.strip():
        return None
    found = list(_candidates(text))
    if not truncated:
        last_line = _last_line_answer(text)
        if last_line is not None:
            found.append(last_line)
    # the last stated answer wins; on the same offset, the earlier rule (max keeps the first)
    return max(found, key=lambda c: c[1]) if found else None


def extract_final_answer(text: str, *, truncated: bool = False) -> str | None:
    """The final answer in ``text`` as a cleaned string ("1234", "-3", "2.5",
    "1/2", or LaTeX such as "\\frac{1}{2}" from a box), or None.

    The last stated answer wins among: the last ``\\boxed{}``; every "answer is" /
    "answer:" / "final answer" phrase followed by a number or an expression; the last
    "#### X"; a last line that is just a number or ends with "= N".  ``truncated``: the
    response was cut by the token limit, so its last line counts for nothing (see the
    module docstring)."""
    res = _extract(text or "", truncated)
    return res[0] if res else None


def intermediate_values(solution: str) -> list[str]:
    """Numbers right after '=' on the reference solution's step lines (the
    "The answer is N." line is skipped), cleaned, de-duplicated, in order.

    >>> intermediate_values("3 × 4 = 12 apples.\\n12 + 5 = 17 apples.\\nThe answer is 17.")
    ['12', '17']
    """
    out: list[str] = []
    seen: set[Fraction | str] = set()
    for line in (solution or "").splitlines():
        if _FINAL_LINE_RE.search(line):
            continue
        for m in _EQUALS_VALUE_RE.finditer(line):
            value = _clean_number(m.group("num"))
            key = _to_fraction(value)
            k = key if key is not None else value
            if k not in seen:
                seen.add(k)
                out.append(value)
    return out


# ---------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify  # heavy (sympy); imported on first non-trivial comparison

    return math_verify


def answers_match(pred: str | None, gold: str) -> bool:
    """True if ``pred`` equals the reference ``gold`` (see module docstring)."""
    if pred is None or gold is None:
        return False
    pred_s, gold_s = str(pred).strip(), str(gold).strip()
    if not pred_s or not gold_s:
        return False
    p_num, g_num = _as_plain_number(pred_s), _as_plain_number(gold_s)
    if p_num is not None and g_num is not None:
        p_frac, g_frac = _to_fraction(p_num), _to_fraction(g_num)
        if p_frac is not None and g_frac is not None:
            return p_frac == g_frac
    if len(pred_s) > _MATH_VERIFY_MAX_CHARS or len(gold_s) > _MATH_VERIFY_MAX_CHARS:
        return False
    p_tex = p_num if p_num is not None else _strip_latex_wrappers(pred_s)
    g_tex = g_num if g_num is not None else _strip_latex_wrappers(gold_s)
    try:
        mv = _math_verify()
        gold_parsed = mv.parse(f"${g_tex}$", parsing_timeout=None)
        pred_parsed = mv.parse(f"${p_tex}$", parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - a judge must never crash on odd text
        return False


# ---------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------


def _shows_working(response: str, answer_offset: int) -> bool:
    """At least one line, other than the one holding the final answer, with a computation."""
    pos = 0
    for line in response.split("\n"):
        end = pos + len(line)
        is_answer_line = pos <= answer_offset <= end
        pos = end + 1
        if is_answer_line:
            continue
        if _WORKING_RE.search(line):
            return True
    return False


def _response_numbers(response: str) -> set[Fraction]:
    values: set[Fraction] = set()
    for m in re.finditer(_MAG, response):
        f = _to_fraction(m.group(0).replace(",", ""))
        if f is None:
            continue
        values.add(f)
        if m.start() > 0 and response[m.start() - 1] in _MINUS:
            values.add(-f)
    return values


def _process_mostly_right(response: str, answer: str, solution: str | None) -> bool:
    """At least half (and at least one) of the solution's intermediate values appear in the
    response; the reference answer itself is not one (a one-step solution has none left)."""
    steps = [v for v in intermediate_values(solution or "") if not answers_match(v, answer)]
    wanted = [f for f in map(_to_fraction, steps) if f is not None]
    if not wanted:
        return False
    have = _response_numbers(response)
    hits = sum(1 for f in wanted if f in have)
    return hits >= 1 and 2 * hits >= len(wanted)


def score_math(response: str, answer: str, solution: str | None = None, *, truncated: bool = False) -> Verdict:
    """Score ``response`` against the reference ``answer`` (and ``solution``
    for partial credit) on the 1-5 scale described in the module docstring.

    ``truncated``: the sampler stopped at its token limit (``finish_reason == "length"``),
    so the response's last line is incomplete and no final answer is taken from it.
    Raises ValueError if ``answer`` is missing: without it every score would be capped at 3."""
    if answer is None or not str(answer).strip():
        raise ValueError(
            f"score_math needs a reference answer, got {answer!r}: the verifier judge scores "
            "against the reference answer of every prompt"
        )
    response = response or ""
    found = _extract(response, truncated)
    if found is None:
        return Verdict(1, "no_final_answer", None)
    extracted, offset = found
    if answers_match(extracted, answer):
        if _shows_working(response, offset):
            return Verdict(5, "correct_with_working", extracted)
        return Verdict(4, "correct_without_working", extracted)
    if _process_mostly_right(response, answer, solution):
        return Verdict(3, "wrong_answer_mostly_right_process", extracted)
    return Verdict(2, "wrong_answer", extracted)
