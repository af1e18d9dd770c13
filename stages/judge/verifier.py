"""Verifier judge: a rule-based stand-in for the "3D-Properties" GPT-4 judge.

The research protocol scores a response to a grade-school arithmetic word
problem on a 1-5 scale (5 = correct answer with a correct, complete process;
4 = correct answer but the process is missing or very redundant; 3 = wrong
answer but most of the process right; 2 = wrong answer and mostly wrong
process; 1 = answer and process entirely wrong, or no final result).  This
module approximates that rubric without an LLM, using only the reference
``answer`` and (optionally) the reference ``solution``:

=====  ===================================  =====================================================
score  reason                               when
=====  ===================================  =====================================================
5      ``correct_with_working``             the extracted final answer equals the reference AND
                                            working is shown: at least one line *other than the
                                            line holding the final answer* contains a computation
                                            (a digit next to one of ``= + - × x * / ÷``, ``\\times``,
                                            ``\\cdot``, or a digit followed by ``%``).
4      ``correct_without_working``          the final answer is correct, but no such line exists.
3      ``wrong_answer_mostly_right_process``  the final answer is wrong, but at least half (and at
                                            least one) of the reference solution's intermediate
                                            values (see :func:`intermediate_values`) appear as
                                            numbers somewhere in the response.
2      ``wrong_answer``                     a final answer was extracted but it is wrong (and the
                                            score-3 condition does not hold, e.g. no ``solution``).
1      ``no_final_answer``                  no final answer could be extracted.
=====  ===================================  =====================================================

Final-answer extraction (:func:`extract_final_answer`), first rule that fires:

1. the last ``\\boxed{...}`` (balanced braces; a plain number inside is cleaned,
   other LaTeX such as ``\\frac{1}{2}`` is kept as written);
2. the last ``answer is[:] X`` / ``answer: X`` / ``final answer[:] X`` phrase
   (case-insensitive) followed by a number; if the number starts a chain such
   as ``5 + 3 = 8`` the value after the last ``=`` is taken;
3. the last ``#### X``;
4. the last non-empty line, if it is just a number or ends with ``= N``
   (optionally followed by a few unit words and a period, e.g. ``So 3 + 4 = 7.``).

Numbers are returned cleaned: no ``$``, thousands separators, ``%``, units or
trailing period (``"$1,234."`` -> ``"1234"``, ``"-7 apples"`` -> ``"-7"``);
decimals and fractions are kept as written (``"12.50"``, ``"3/4"``).

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

# "answer is[:] X" / "answer: X" / "final answer[:] X"  (X is parsed from what follows)
_ANSWER_PHRASE_RE = re.compile(
    r"(?:\bfinal\s+answer\s*(?:is\s*)?:?|\banswer\s+is\s*:?|\banswer\s*:)",
    re.IGNORECASE,
)
# what may sit between the phrase and the number: spaces, markdown bold, math delimiters
_LEAD_RE = re.compile(r"(?:\s|\*|_|\\\(|\\\[|\$(?!\s?\d))*")
_CHAIN_RE = re.compile(rf"{_NUM}(?:\s*{_OP}\s*{_NUM})*(?:\s*=\s*{_NUM}(?:\s*{_OP}\s*{_NUM})*)*")
_HASH_RE = re.compile(rf"####\s*(?P<num>{_NUM})")
_LAST_LINE_NUMBER_RE = re.compile(rf"^[\s*$]*(?P<num>{_NUM})\s*%?[\s*]*\.?[\s*]*$")
_LAST_LINE_EQUALS_RE = re.compile(
    rf"=\s*(?P<num>{_NUM})\s*%?(?:\s+[A-Za-z][A-Za-z' ]{{0,40}})?\s*[.!]?[\s*]*$"
)
_EQUALS_VALUE_RE = re.compile(rf"=\s*(?P<num>{_NUM})")
_FINAL_LINE_RE = re.compile(r"answer\s+is", re.IGNORECASE)

# a line that shows working: a digit next to an arithmetic operator, or a percent
_WORKING_RE = re.compile(
    r"\d\s*(?:[=+\-\u2212*/\u00f7\u00d7]|\\times|\\cdot|\\div)"
    r"|(?:[=+\-\u2212*/\u00f7\u00d7]|\\times|\\cdot|\\div)\s*\$?\d"
    r"|\d\s*[xX]\s*\$?\d"
    r"|\d\s*(?:%|\\%|percent\b)"
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


def _value_after(text: str, pos: int) -> str | None:
    """Number right after an 'answer is' phrase ending at ``pos``; for a chain
    like '5 + 3 = 8' the value after the last '=' is returned."""
    lead = _LEAD_RE.match(text, pos)
    pos = lead.end() if lead else pos
    m = _CHAIN_RE.match(text, pos)
    if not m:
        return None
    chain = m.group(0)
    if "=" in chain:
        last = chain.rsplit("=", 1)[1].strip()
        if _NUM_RE.fullmatch(last):
            return _clean_number(last)
    first = _NUM_RE.match(chain)
    return _clean_number(first.group(0)) if first else None


def _extract(text: str) -> tuple[str, int] | None:
    """(cleaned answer, offset of the construct it came from) or None."""
    if not text or not text.strip():
        return None

    boxed = _find_boxed(text)
    if boxed is not None:
        content, start = boxed
        plain = _as_plain_number(content)
        if plain is not None:
            return plain, start
        content = content.strip()
        if content:
            return content, start

    found: tuple[str, int] | None = None
    for m in _ANSWER_PHRASE_RE.finditer(text):
        value = _value_after(text, m.end())
        if value is not None:
            found = (value, m.start())
    if found is not None:
        return found

    hashes = list(_HASH_RE.finditer(text))
    if hashes:
        m = hashes[-1]
        return _clean_number(m.group("num")), m.start()

    lines = text.rstrip().split("\n")
    last = lines[-1]
    start = len(text.rstrip()) - len(last)
    m = _LAST_LINE_NUMBER_RE.match(last) or _LAST_LINE_EQUALS_RE.search(last)
    if m:
        return _clean_number(m.group("num")), start
    return None


def extract_final_answer(text: str) -> str | None:
    """The final answer in ``text`` as a cleaned string ("1234", "-3", "2.5",
    "1/2", or LaTeX such as "\\frac{1}{2}" from a box), or None.

    Priority: last ``\\boxed{}``; last "answer is"/"answer:"/"final answer"
    phrase followed by a number; last "#### X"; a last line that is just a
    number or ends with "= N"."""
    res = _extract(text or "")
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


def _process_mostly_right(response: str, solution: str | None) -> bool:
    if not solution:
        return False
    wanted = [f for f in (_to_fraction(v) for v in intermediate_values(solution)) if f is not None]
    if not wanted:
        return False
    have = _response_numbers(response)
    hits = sum(1 for f in wanted if f in have)
    return hits >= 1 and 2 * hits >= len(wanted)


def score_math(response: str, answer: str, solution: str | None = None) -> Verdict:
    """Score ``response`` against the reference ``answer`` (and ``solution``
    for partial credit) on the 1-5 scale described in the module docstring."""
    response = response or ""
    found = _extract(response)
    if found is None:
        return Verdict(1, "no_final_answer", None)
    extracted, offset = found
    if answers_match(extracted, answer):
        if _shows_working(response, offset):
            return Verdict(5, "correct_with_working", extracted)
        return Verdict(4, "correct_without_working", extracted)
    if _process_mostly_right(response, solution):
        return Verdict(3, "wrong_answer_mostly_right_process", extracted)
    return Verdict(2, "wrong_answer", extracted)
