"""Reading a 1-5 score out of an LLM judge's reply, or refusing to.

A wrong score is worse than none: a guessed 5 can turn a bad candidate into a chosen response.
So the parsers accept the many ways real judges state one score ("Score: 4", "**Score**: 4/5",
"Rating: [[4]]", "## Score\\n3", a lone "4" as the last line, a JSON object, fenced or not) and
refuse with `Unparseable` everything that does not name exactly one whole score from 1 to 5:
two different scores, 7 or 4.5 or 8/10, a reply that never states one. The caller keeps such a
row unscored (`describe_unparseable` is its `score_reason`) or retries the request.

Text replies are read in tiers, and the first tier that finds anything decides:
1. labelled scores: "Score: N", "Final score = N", "Rating (1-5): N", "[[N]]", a "Score" heading
   or bold line with N alone on the next line, `"score": N`;
2. the last non-empty line when it is a lone number ("4", "4.", "**4**", "4/5", "4 points");
3. prose: "a score of N", "the final score is N".
Numbers elsewhere ("step 3 computes 12") never count.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Judgement:
    score: int  # 1-5
    reasoning: str  # the judge's explanation (the whole reply, for text replies)


class Unparseable(ValueError):
    """The reply states no single 1-5 score; `why` says what was wrong in a few words."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# A number as judges write it, an optional "/5" or "out of 5", and a range's second end ("4-5").
_NUM = r"(?P<num>-?\d+(?:\.\d+)?)"
_DEN = r"(?:[*_]*\s*(?:/|out\s+of)\s*[*_]*(?P<den>\d+))?"
_RANGE = r"(?:[*_]*\s*(?:-|–|to|or)\s*(?P<hi>\d+(?:\.\d+)?))?"
_LABEL = r"(?:\b(?:final|overall|total)\s+)?\b(?:score|rating|grade)\b"
_DECOR = r"[*_\[(\"' \t]*"  # bold/italics, brackets, quotes, spaces: never a newline

_LABELLED = [
    # "Score: 4", "**Score**: 4/5", "score = 3", "Rating (1-5): [4]", '"score": 4'
    re.compile(_LABEL + r"[\"'*_]*(?:\s*\([^)\n]{0,20}\))?[\"'*_\s]*[:=]" + _DECOR + _NUM + _DEN + _RANGE, re.I),
    # "## Score\n3", "**Final score**\n**4**": a label alone on its line, the number alone on the next
    re.compile(
        r"^[ \t]*(?:#+[ \t]*)?[*_]*" + _LABEL + r"[ \t]*:?[*_]*[ \t]*:?[ \t]*\n\s*" + _DECOR + _NUM + _DEN
        + r"[*_\])]*[ \t]*(?:points?)?\.?[ \t]*$",
        re.I | re.M,
    ),
    # MT-bench style "[[4]]"
    re.compile(r"\[\[\s*" + _NUM + _DEN + r"\s*\]\]"),
]
_LAST_LINE = re.compile(r"[*_#`\[(\s]*(?:" + _LABEL + r"[*_:\s]*)?" + _NUM + r"\.?" + _DEN + r"[*_`\])\s]*(?:points?)?\.?[*_\s]*", re.I)
_PROSE = re.compile(_LABEL + r"\s+(?:of|is|would\s+be|should\s+be)\s*:?" + _DECOR + _NUM + _DEN + _RANGE, re.I)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(?P<body>.*?)\n?\s*```$", re.S)


def parse_text(content: str) -> Judgement:
    """The one score stated in a free-text reply (see the module docstring for the tiers)."""
    text = (content or "").strip()
    if not text:
        raise Unparseable("empty reply")
    found = sorted((m for pattern in _LABELLED for m in pattern.finditer(text)), key=lambda m: m.start())
    if not found:
        last = text.splitlines()[-1]
        found = [m for m in [_LAST_LINE.fullmatch(last)] if m]
    if not found:
        found = list(_PROSE.finditer(text))
    if not found:
        raise Unparseable("no score found")
    return Judgement(score=_one_score(found), reasoning=text)


def parse_json(content: str) -> Judgement:
    """A JSON object {"reasoning": str, "score": 1..5}, whitespace and a ``` fence tolerated. A
    score of 4.0 or "4" is read as 4 (servers without strict schemas send those); 4.5, true and
    7 are refused. Missing reasoning reads as ""."""
    text = _unfence((content or "").strip())
    if not text:
        raise Unparseable("empty reply")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise Unparseable("malformed JSON") from None
    if not isinstance(data, dict):
        raise Unparseable(f"JSON {type(data).__name__} instead of an object")
    reasoning = data.get("reasoning")
    if reasoning is None:
        reasoning = ""
    if not isinstance(reasoning, str):
        raise Unparseable("JSON reasoning is not a string")
    return Judgement(score=_json_score(data.get("score")), reasoning=reasoning.strip())


def parse_judgement(content: str | None, response_format: str) -> Judgement:
    """The score of a judge reply made under `response_format` ("json_schema" or "text"). A
    json_schema reply that is not JSON at all (some servers ignore `response_format`) is read as
    text; one that starts as JSON but breaks (cut at max_tokens) is refused, since the text
    parser could pick a number out of half a reasoning."""
    if content is None or not content.strip():
        raise Unparseable("empty reply")
    if response_format == "text":
        return parse_text(content)
    if response_format == "json_schema":
        if not _unfence(content.strip()).startswith("{"):
            return parse_text(content)
        return parse_json(content)
    raise ValueError(f"response_format {response_format!r}: expected 'json_schema' or 'text'")


def describe_unparseable(err: Unparseable, content: str | None, limit: int = 60) -> str:
    """The `score_reason` of a row left unscored: `unparseable: <why>: "<start of the reply>…"`."""
    flat = re.sub(r"\r\n|\r|\n", " ", (content or "").strip())
    shown = flat[:limit] + ("…" if len(flat) > limit else "")
    return f'unparseable: {err.why}: "{shown}"'


def _one_score(matches: list[re.Match]) -> int:
    """The single score the matches agree on, or Unparseable saying why there is none."""
    stated: dict[tuple[float, int], str] = {}  # (value, denominator) → as written
    for m in matches:
        if m.groupdict().get("hi"):
            raise Unparseable(f"score range {m['num']}-{m['hi']}, not one score")
        key = (float(m["num"]), int(m["den"] or 5))
        stated.setdefault(key, m["num"] + (f"/{m['den']}" if m["den"] and int(m["den"]) != 5 else ""))
    if len(stated) > 1:
        shown = list(stated.values())
        words = {2: "two"}.get(len(shown), str(len(shown)))
        raise Unparseable(f"{words} different scores ({', '.join(shown[:-1])} and {shown[-1]})")
    (value, den), written = next(iter(stated.items()))
    if den != 5:
        raise Unparseable(f"score {written} is not on the 1-5 scale")
    return _in_range(value, written)


def _json_score(score: object) -> int:
    if isinstance(score, str) and re.fullmatch(r"\s*-?\d+\s*", score):
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise Unparseable("JSON without an integer score")
    return _in_range(float(score), f"{score:g}" if isinstance(score, float) else str(score))


def _in_range(value: float, written: str) -> int:
    if not value.is_integer():
        raise Unparseable(f"score {written} is not a whole number")
    if not 1 <= value <= 5:
        raise Unparseable(f"score {int(value)} is outside 1-5")
    return int(value)


def _unfence(text: str) -> str:
    m = _FENCE.match(text)
    return m["body"].strip() if m else text
