"""The rubric of the `openai` judge: a text file that becomes the judge's one user message.

A rubric is plain text with placeholders in Python `str.format` syntax:

- `{question}` (required): the prompt text the policy answered.
- `{response}` (required): the candidate response being judged.
- `{reference}` (optional): the reference, rendered by `render_reference`: "Reference solution:"
  and/or "Reference answer:" with what the data has, or, for a prompt with neither, the sentence
  "No reference solution is available; judge the response on its own." A rubric without
  `{reference}` never shows the reference.

Nothing else may appear in braces: write a literal brace doubled (`{{` and `}}`), and a
placeholder plainly (no `{question!r}`, `{response:>10}` or `{question.text}`). `check_rubric`
refuses anything else before any request is sent, naming the file.

Leave the output format out of the rubric: `judge_messages` appends the instruction for the
judge's `response_format` (`FORMAT_INSTRUCTIONS`: a JSON object with "reasoning" and "score", or
a final line "Score: N"), so one rubric serves both formats and the parser always finds what it
asked for. The shipped `configs/rubrics/math_1to5.txt` carries the paper's five score levels
(Appendix C, score-criteria table) word for word.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

REQUIRED = ("question", "response")
OPTIONAL = ("reference",)

# Where each required placeholder goes, for the "how to fix" half of the error.
_WHAT = {"question": "the question", "response": "the judged answer"}
_ALLOWED = "{question}, {response} (required) and {reference} (optional)"

NO_REFERENCE = "No reference solution is available; judge the response on its own."

FORMAT_INSTRUCTIONS: dict[str, str] = {
    "json_schema": (
        'Reply with a JSON object with two keys: "reasoning", a brief explanation of your judgement, '
        'and "score", your score as an integer from 1 to 5.'
    ),
    "text": (
        "Explain your judgement briefly, then end your reply with a final line exactly of the form "
        '"Score: N", where N is your score, an integer from 1 to 5.'
    ),
}

# The OpenAI `response_format` parameter for `response_format: json_schema`: with `strict` the
# server constrains decoding to this shape, so the score cannot fall outside 1-5.
JSON_SCHEMA: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "judgement",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "reasoning": {"type": "string"},
                "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
            },
            "required": ["reasoning", "score"],
            "additionalProperties": False,
        },
    },
}


def check_rubric(text: str, where: str) -> None:
    """Raise a UserError unless `text` is a usable rubric: both required placeholders, no other
    placeholder, none with a conversion/format spec/attribute access, and well-formed braces.
    `where` names the rubric in the message, e.g. "judge.rubric (configs/rubrics/x.txt)"."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as err:
        raise UserError(
            f"{where}: the rubric is not a valid template ({err}); write a literal brace doubled "
            f"({{{{ or }}}}) and placeholders as {_ALLOWED}"
        ) from None

    problems: list[str] = []
    for name, spec, conv in fields:
        shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        base = _base_name(name)
        if base not in REQUIRED + OPTIONAL:
            problems.append(
                f"unknown placeholder {shown}: allowed are {_ALLOWED}; "
                "a literal brace is written doubled ({{ or }})"
            )
        elif base != name or spec or conv:
            problems.append(f"placeholder {shown} must be written plainly as {{{base}}} (no conversion, format spec or attribute/index)")
    present = {_base_name(name) for name, _, _ in fields}
    for name in REQUIRED:
        if name not in present:
            problems.append(f"missing placeholder {{{name}}}: add {{{name}}} where {_WHAT[name]} should appear")
    if problems:
        raise UserError(f"{where}: " + "; ".join(dict.fromkeys(problems)))


def load_rubric(path: str, field: str = "judge.rubric") -> str:
    """Read and check the rubric file at `path` (relative to the current directory); `field` is the
    config key that named it, for the error message. Returns the text unchanged."""
    where = f"{field} ({path})"
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file; set {field} to a rubric file, e.g. configs/rubrics/math_1to5.txt") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: cannot read the rubric ({err}); {field} must name a readable UTF-8 text file") from None
    if not text.strip():
        raise UserError(f"{where}: the rubric file is empty; write the judge's instructions with {_ALLOWED}")
    check_rubric(text, where)
    return text


def render_reference(solution: str | float | None, answer: str | float | None) -> str:
    """The `{reference}` block: the reference solution and/or answer that exist. None, NaN (rows
    come from pandas) and blank strings count as missing; with neither, a sentence telling the
    judge to score the response on its own, so the rubric never shows an empty section."""
    solution, answer = _present(solution), _present(answer)
    parts = []
    if solution is not None:
        parts.append(f"Reference solution:\n{solution}")
    if answer is not None:
        parts.append(f"Reference answer: {answer}")
    return "\n\n".join(parts) if parts else NO_REFERENCE


def judge_messages(
    rubric: str,
    *,
    question: str,
    response: str,
    solution: str | float | None,
    answer: str | float | None,
    response_format: str,
) -> list[dict[str, str]]:
    """The chat sent to the judge: one user message, the filled rubric, a blank line and the
    output instruction for `response_format`. Pure and deterministic: the judge cache hashes it."""
    if response_format not in FORMAT_INSTRUCTIONS:
        raise ValueError(f"response_format {response_format!r}: expected one of {sorted(FORMAT_INSTRUCTIONS)}")
    check_rubric(rubric, "judge rubric")  # cheap next to a request; a bad rubric fails here, not as a KeyError
    filled = rubric.format(question=question, response=response, reference=render_reference(solution, answer))
    return [{"role": "user", "content": filled.rstrip() + "\n\n" + FORMAT_INSTRUCTIONS[response_format]}]


def _base_name(field_name: str) -> str:
    """`question.x` → `question`, `response[0]` → `response`: the key `str.format` looks up."""
    for i, ch in enumerate(field_name):
        if ch in ".[":
            return field_name[:i]
    return field_name


def _present(value: Any) -> str | None:
    """`value` as stripped text, or None when missing (None, NaN, pd.NA, blank)."""
    if value is None:
        return None
    try:
        if value != value:  # NaN is the one value unequal to itself
            return None
    except TypeError:  # pd.NA refuses to be a bool
        return None
    text = str(value).strip()
    return text or None
