"""Built-in exact-answer tasks for forgetting (TAX, seed 001 §3): what else the model can do.

Alignment tax is measured on tasks the model was *not* trained on: if preference training on
word problems costs the model its times tables, the accuracy on them falls. These tasks are
small, generated on the fly (no download), and each has one integer answer, so the verifier's
rules (`stages/judge/math_rules.py`) grade them exactly whatever judge the run uses. None of
them is a template of the built-in math set (`pipeline/data.py`), so no training prompt is one.

Rows have the prompt-set shape (`prompt_id, prompt, solution, answer`), deterministic by seed.
"""

from __future__ import annotations

import random
from typing import Callable

Task = Callable[[random.Random], tuple[str, int]]


def _times_table(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    return f"What is {a} times {b}?", a * b


_UNITS = (("minutes", "hours", 60), ("seconds", "minutes", 60), ("days", "weeks", 7), ("months", "years", 12),
          ("centimetres", "metres", 100), ("grams", "kilograms", 1000), ("eggs", "dozen", 12))  # fmt: skip


def _unit_conversion(r: random.Random) -> tuple[str, int]:
    small, big, factor = r.choice(_UNITS)
    k = r.randint(2, 9)
    return f"How many {small} are in {k} {big}?", k * factor


def _next_number(r: random.Random) -> tuple[str, int]:
    start, step = r.randint(1, 20), r.randint(2, 9)
    seq = [start + i * step for i in range(4)]
    return f"What number comes next in the sequence {', '.join(map(str, seq))}?", start + 4 * step


def _larger(r: random.Random) -> tuple[str, int]:
    a, b = r.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", max(a, b)


TASKS: dict[str, Task] = {
    "times_table": _times_table,
    "unit_conversion": _unit_conversion,
    "next_number": _next_number,
    "larger": _larger,
}


def task_prompts(task: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct problems of one task (fewer if the task has fewer), deterministic by seed."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built in: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}:{task}")
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(100 * n):  # a small task runs out of distinct questions: stop, do not loop forever
        if len(rows) == n:
            break
        question, answer = TASKS[task](rng)
        if question not in seen:
            seen.add(question)
            rows.append({"prompt_id": f"{task}-s{seed}-{len(rows):05d}", "prompt": question, "solution": None,
                         "answer": str(answer)})
    return rows
