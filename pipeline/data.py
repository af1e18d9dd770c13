"""Prompt rows for the pipeline: a built-in arithmetic set, or the user's own file / HF dataset.

Every source yields the same row shape (`PROMPT_COLUMNS`), deterministically, so a stage that is
re-run (or resumed) sees exactly the same prompts. A bad user file raises one `UserError` that
names the file, the line or row, the field, and what to change; never a traceback.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Literal

from pipeline.config import BuiltinMathData, DataConfig, FieldMap, FileData, HFData
from pipeline.errors import UserError

PROMPT_COLUMNS = ("prompt_id", "prompt", "solution", "answer")
Split = Literal["train", "eval"]


def load_prompts(cfg: DataConfig, split: Split) -> list[dict]:
    """Rows {prompt_id: str, prompt: str, solution: str|None, answer: str|None}, deterministic."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if isinstance(cfg, BuiltinMathData):
        n = cfg.num_train if split == "train" else cfg.num_eval
        if cfg.templates:
            return template_problems(cfg.templates, n, cfg.seed, split)
        return math_problems(n, cfg.seed, split, cfg.levels)
    if isinstance(cfg, FileData):
        def read(path: str) -> list[dict]:
            return _rows_from(path, _file_records(path, cfg.limit), cfg.fields, Path(path).stem)

        held = (lambda: read(cfg.eval_path)) if cfg.eval_path else None
        return _pick_split(lambda: read(cfg.path), held, cfg.eval_fraction, cfg.seed, split,
                           cfg.path, cfg.eval_path)
    if isinstance(cfg, HFData):
        held = (lambda: _hf_rows(cfg, cfg.eval_split)) if cfg.eval_split else None
        return _pick_split(lambda: _hf_rows(cfg, cfg.split), held, cfg.eval_fraction, cfg.seed, split,
                           f"{cfg.path} split {cfg.split}", f"{cfg.path} split {cfg.eval_split}")
    raise TypeError(f"unknown data config {type(cfg).__name__}")


# ── held-out split ───────────────────────────────────────────────────────────────────────────
def _pick_split(main: Callable[[], list[dict]], held: Callable[[], list[dict]] | None,
                fraction: float, seed: int, split: Split, main_name: str, held_name: str | None) -> list[dict]:
    """A separate eval source wins; otherwise a seeded shuffle decides which rows are held out."""
    if held:
        train, evals = main(), held()
        clash = sorted({r["prompt_id"] for r in train} & {r["prompt_id"] for r in evals})
        if clash:  # downstream stages key results by prompt_id, so train/eval ids must not collide
            raise UserError(f"prompt id {clash[0]!r} is in both {main_name} and {held_name}; "
                            "ids must be unique across train and eval (rename them or set data.fields.id)")
        return train if split == "train" else evals
    rows = main()
    held_out = set(eval_indices(len(rows), fraction, seed))
    if split == "eval" and not held_out:  # evaluate needs held-out prompts: preflight asks before any work
        raise UserError(f"{main_name}: the held-out (eval) split is empty: data.eval_fraction={fraction} of "
                        f"{len(rows)} row(s) holds none out. Set data.eval_fraction > 0 with at least 2 rows, "
                        "or point data.eval_path (file) / data.eval_split (hf) at held-out prompts")
    return [r for i, r in enumerate(rows) if (i in held_out) == (split == "eval")]


def eval_indices(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of the held-out rows: the last ceil(fraction·n) of a seeded shuffle, at least one
    when fraction > 0 and n >= 2, and never all of them (training needs rows too)."""
    if fraction <= 0 or n < 2:
        return []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(max(math.ceil(fraction * n), 1), n - 1)
    return sorted(order[n - k:])


# ── user rows ────────────────────────────────────────────────────────────────────────────────
def _file_records(path: str, limit: int | None) -> list[tuple[str, dict]]:
    """(where, record) pairs in file order; `where` is "line 7" for jsonl, "row 3" for parquet."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise UserError(f"prompt file {path}: unsupported extension {suffix or '(none)'!r}; "
                        "use a .jsonl or .parquet file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        _require_file(path)
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises a zoo of types for corrupt files
            raise UserError(f"{path}: not a readable parquet file: {err}") from None
        if limit is not None:
            table = table.slice(0, limit)
        return [(f"row {i + 1}", rec) for i, rec in enumerate(table.to_pylist())]
    out: list[tuple[str, dict]] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {lineno}: not valid JSON: {err}") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path} line {lineno}: expected a JSON object {{...}}, got {type(rec).__name__}")
        out.append((f"line {lineno}", rec))
    return out


def _require_file(path: str) -> None:
    if "://" not in path and not Path(path).is_file():
        raise UserError(f"prompt file not found: {path} (check data.path / data.eval_path)")


def _read_text(path: str) -> str:
    """Local paths directly; URIs (s3://, gs://, ...) through pyarrow's filesystems."""
    _require_file(path)
    if "://" not in path:
        return Path(path).read_text(encoding="utf-8")
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read().decode("utf-8")
    except (OSError, ValueError) as err:
        raise UserError(f"prompt file not found or unreadable: {path} ({err})") from None


def _hf_rows(cfg: HFData, split: str) -> list[dict]:
    import datasets

    try:
        if Path(cfg.path).is_dir():
            ds = datasets.load_from_disk(cfg.path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"HF dataset {cfg.path}: no split {split!r}; splits here: {', '.join(ds)}")
                ds = ds[split]
            elif split == cfg.eval_split:  # a plain Dataset has no splits: eval would repeat train
                raise UserError(f"HF dataset {cfg.path} is one Dataset without splits, so data.eval_split "
                                f"{split!r} cannot apply; remove it (eval_fraction then holds rows out)")
        else:
            ds = datasets.load_dataset(cfg.path, split=split)
    except (OSError, ValueError) as err:  # not found, not a saved dataset, unknown split
        raise UserError(f"could not load HF dataset {cfg.path} split {split!r}: {err}") from None
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    records = ((f"row {i + 1}", rec) for i, rec in enumerate(ds))
    # The split is part of the default id so a train split and an eval split never share ids.
    return _rows_from(f"{cfg.path} split {split}", records, cfg.fields, f"{Path(cfg.path).name}-{split}")


def _rows_from(source: str, records: Iterable[tuple[str, dict]], fields: FieldMap, stem: str) -> list[dict]:
    """Map the user's columns onto PROMPT_COLUMNS, checking every row so a bad one is named."""
    rows: list[dict] = []
    seen: dict[str, str] = {}
    for index, (where, rec) in enumerate(records):
        prompt = _field(source, where, rec, fields.prompt, "prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            what = "is empty" if isinstance(prompt, str) else f"is a {type(prompt).__name__}, not a string"
            raise UserError(f"{source} {where}: field {fields.prompt!r} {what}; every row needs a non-empty "
                            "prompt text (fix the row, or point data.fields.prompt at the right column)")
        pid = str(_field(source, where, rec, fields.id, "id")) if fields.id else f"{stem}-{index:05d}"
        if pid in seen:
            raise UserError(f"{source} {where}: duplicate id {pid!r} in field {fields.id!r} "
                            f"(first at {seen[pid]}); ids must be unique")
        seen[pid] = where
        solution = _field(source, where, rec, fields.solution, "solution") if fields.solution else None
        answer = _field(source, where, rec, fields.answer, "answer") if fields.answer else None
        rows.append({"prompt_id": pid, "prompt": prompt,
                     "solution": None if solution is None else str(solution), "answer": _as_answer(answer)})
    if not rows:
        raise UserError(f"{source}: no rows (the file or split is empty); add at least one prompt")
    return rows


def _field(source: str, where: str, rec: dict, column: str, role: str) -> Any:
    if column not in rec:
        raise UserError(f"{source} {where}: no field {column!r} (set data.fields.{role} to the column "
                        f"holding the {role}; columns here: {', '.join(map(str, rec)) or '(none)'})")
    return rec[column]


def _as_answer(value: Any) -> str | None:
    """Answers as text; an integral float (42.0, typical after parquet/pandas) becomes "42"."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ── built-in math problems ───────────────────────────────────────────────────────────────────
# Every question starts with the person's name, and train and eval draw names from these two
# disjoint lists, so a train question can never equal an eval question (by construction).
_TRAIN_NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lena", "Omar", "Priya", "Jack", "Chloe", "Ravi", "Emma")
_EVAL_NAMES = ("Ivan", "Zoe", "Kofi", "Yuki", "Marta", "Diego", "Aisha", "Felix", "Grace", "Tariq", "Ines", "Noah")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "beads")
_GOODS = (("pen", "pens"), ("notebook", "notebooks"), ("ticket", "tickets"), ("mango", "mangoes"),
          ("ball", "balls"))
_FOODS = ("muffins", "cupcakes", "rolls", "cookies")
_THINGS = ("book", "game", "kite", "lamp", "bag")


def _gain_loss(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, b, item = r.randint(3, 15), r.randint(2, 10), r.choice(_ITEMS)
    c = r.randint(1, a + b - 1)
    return (f"{name} has {a} {item}. {name} gets {b} more and then gives {c} to a friend. "
            f"How many {item} does {name} have now?",
            [f"{name} starts with {a} {item} and gets {b} more: {a} + {b} = {a + b} {item}.",
             f"{name} gives away {c}: {a + b} - {c} = {a + b - c} {item}."], a + b - c)


def _groups(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, b, item = r.randint(2, 9), r.randint(2, 9), r.choice(_ITEMS)
    return (f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in all?",
            [f"{name} has {a} bags of {b} {item}: {a} × {b} = {a * b} {item}."], a * b)


def _share(r: random.Random, name: str) -> tuple[str, list[str], int]:
    each, k, item = r.randint(2, 9), r.randint(2, 6), r.choice(_ITEMS)
    return (f"{name} shares {each * k} {item} equally among {k} friends. How many {item} does each friend get?",
            [f"{each * k} {item} shared by {k} friends: {each * k} ÷ {k} = {each} {item} each."], each)


def _percent_left(r: random.Random, name: str) -> tuple[str, list[str], int]:
    p = r.choice((10, 20, 25, 30, 40, 50, 60, 75))
    n = (100 // math.gcd(p, 100)) * r.randint(2, 20)
    spent = n * p // 100
    return (f"{name} has {n} dollars and spends {p}% of it on a {r.choice(_THINGS)}. "
            f"How many dollars does {name} have left?",
            [f"{p}% of {n} is {n} × {p} ÷ 100 = {spent} dollars.",
             f"{name} has {n} - {spent} = {n - spent} dollars left."], n - spent)


def _unit_rate(r: random.Random, name: str) -> tuple[str, list[str], int]:
    (one, many), a, u = r.choice(_GOODS), r.randint(2, 6), r.randint(2, 9)
    b = r.choice([x for x in range(2, 13) if x != a])
    return (f"{name} sees that {a} {many} cost {a * u} dollars. "
            f"At the same price, how many dollars do {b} {many} cost?",
            [f"One {one} costs {a * u} ÷ {a} = {u} dollars.",
             f"{b} {many} cost {b} × {u} = {b * u} dollars."], b * u)


def _change(r: random.Random, name: str) -> tuple[str, list[str], int]:
    (_, g1), (_, g2) = r.sample(_GOODS, 2)
    a, p, b, q = r.randint(2, 6), r.randint(2, 15), r.randint(2, 6), r.randint(1, 10)
    total = a * p + b * q
    bill = next(x for x in (20, 50, 100, 200) if x > total)
    return (f"{name} buys {a} {g1} at {p} dollars each and {b} {g2} at {q} dollars each, and pays with a "
            f"{bill}-dollar bill. How many dollars of change does {name} get?",
            [f"The {g1} cost {a} × {p} = {a * p} dollars.", f"The {g2} cost {b} × {q} = {b * q} dollars.",
             f"Together they cost {a * p} + {b * q} = {total} dollars.",
             f"The change is {bill} - {total} = {bill - total} dollars."], bill - total)


def _bakery(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, c, d, food = r.randint(2, 6), r.choice((2, 3, 4, 6)), r.randint(2, 9), r.choice(_FOODS)
    b = c * r.randint(1, 4)
    made, boxes = a * b, a * b // c
    return (f"{name} bakes {a} trays of {food} with {b} on each tray and packs them in boxes of {c}. "
            f"Each box sells for {d} dollars. How many dollars does {name} make by selling all the boxes?",
            [f"{name} bakes {a} × {b} = {made} {food}.", f"That fills {made} ÷ {c} = {boxes} boxes.",
             f"The boxes sell for {boxes} × {d} = {boxes * d} dollars."], boxes * d)


def _savings(r: random.Random, name: str) -> tuple[str, list[str], int]:
    w, weeks, k, thing = r.randint(3, 15), r.randint(2, 10), r.randint(2, 5), r.choice(_THINGS)
    total = w * weeks
    each = r.randint(1, (total - 1) // k)
    spent = total - each * k
    return (f"{name} saves {w} dollars every week for {weeks} weeks, then spends {spent} dollars on a {thing} "
            f"and splits the rest equally among {k} jars. How many dollars go in each jar?",
            [f"{name} saves {w} × {weeks} = {total} dollars.",
             f"After the {thing}, {total} - {spent} = {each * k} dollars are left.",
             f"Each jar gets {each * k} ÷ {k} = {each} dollars."], each)


def _discount(r: random.Random, name: str) -> tuple[str, list[str], int]:
    (_, many), p, k = r.choice(_GOODS), r.choice((10, 20, 25, 50)), r.randint(2, 5)
    price = (100 // math.gcd(p, 100)) * r.randint(1, 6)
    total = k * price
    off = total * p // 100
    return (f"{name} buys {k} {many} that cost {price} dollars each and gets {p}% off the total. "
            f"How many dollars does {name} pay?",
            [f"The {many} cost {k} × {price} = {total} dollars.",
             f"{p}% of {total} is {total} × {p} ÷ 100 = {off} dollars.",
             f"{name} pays {total} - {off} = {total - off} dollars."], total - off)


# One-step problems with small numbers, added for the embedded 135M policy (see LEVELS).
def _add(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, b, item = r.randint(2, 9), r.randint(2, 9), r.choice(_ITEMS)
    return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            [f"{name} has {a} {item} and gets {b} more: {a} + {b} = {a + b} {item}."], a + b)


def _take_away(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, item = r.randint(5, 15), r.choice(_ITEMS)
    b = r.randint(1, a - 1)
    return (f"{name} has {a} {item} and gives {b} away. How many {item} does {name} have left?",
            [f"{name} gives {b} of {a} {item} away: {a} - {b} = {a - b} {item}."], a - b)


def _double(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, item = r.randint(2, 15), r.choice(_ITEMS)
    return (f"{name} has {a} {item}. {name}'s sister has twice as many. How many {item} does the sister have?",
            [f"Twice {a} is 2 × {a} = {2 * a} {item}."], 2 * a)


def _sum(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, b = r.randint(2, 20), r.randint(2, 20)
    return f"{name} asks: what is {a} + {b}?", [f"{a} + {b} = {a + b}."], a + b


def _plus_one(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, item = r.randint(2, 9), r.choice(_ITEMS)
    return (f"{name} has {a} {item} and finds 1 more. How many {item} does {name} have now?",
            [f"{name} has {a} {item} and finds 1 more: {a} + 1 = {a + 1} {item}."], a + 1)


def _add_small(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, b, item = r.randint(2, 6), r.randint(2, 6), r.choice(_ITEMS)
    return (f"{name} has {a} red {item} and {b} blue {item}. How many {item} does {name} have?",
            [f"{name} has {a} red and {b} blue {item}: {a} + {b} = {a + b} {item}."], a + b)


def _sum_small(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, b = r.randint(1, 5), r.randint(1, 5)
    return f"{name} asks: how much is {a} plus {b}?", [f"{a} + {b} = {a + b}."], a + b


def _double_small(r: random.Random, name: str) -> tuple[str, list[str], int]:
    a, item = r.randint(2, 6), r.choice(_ITEMS)
    return (f"{name} has {a} {item} in each hand. How many {item} does {name} have in both hands?",
            [f"{a} {item} in each of 2 hands: 2 × {a} = {2 * a} {item}."], 2 * a)


Template = Callable[[random.Random, str], tuple[str, list[str], int]]
TEMPLATES: dict[str, Template] = {
    "gain_loss": _gain_loss, "groups": _groups, "share": _share, "percent_left": _percent_left,
    "unit_rate": _unit_rate, "change": _change, "bakery": _bakery, "savings": _savings, "discount": _discount,
    "add": _add, "take_away": _take_away, "double": _double, "sum": _sum,
    "plus_one": _plus_one, "add_small": _add_small, "sum_small": _sum_small, "double_small": _double_small,
}  # fmt: skip
# Difficulty levels by the solve rate MEASURED on the embedded policy with configs/default.yaml's
# sampler (bench/builtin_levels.py; bench/RESULTS.md, 2026-11-25: share of candidates scoring 5):
# 1 at least 4%, 2 from 1.5% to 4%, 3 below 1.5%. Within a draw, templates are taken in this
# order whatever the order of the levels asked for, so a level set gives the same problems
# however it is written.
LEVELS: dict[int, tuple[str, ...]] = {
    1: ("sum", "add_small", "add", "sum_small", "plus_one", "double"),
    2: ("groups", "take_away", "double_small", "share"),
    3: ("gain_loss", "percent_left", "unit_rate", "change", "discount", "savings", "bakery"),
}
# A draw that keeps producing questions it already has has (nearly) run out of distinct ones.
_MAX_REDRAWS = 10_000


def templates_of(levels: Iterable[int]) -> tuple[str, ...]:
    """The template names of `levels`, in LEVELS order; unknown or no levels raise ValueError."""
    wanted = set(levels)
    unknown = sorted(wanted - set(LEVELS), key=str)
    if unknown or not wanted:
        raise ValueError(f"levels must be a non-empty subset of {sorted(LEVELS)}, got {sorted(wanted, key=str)}")
    return tuple(name for level in sorted(LEVELS) if level in wanted for name in LEVELS[level])


def math_problems(n: int, seed: int, split: Split, levels: Iterable[int] = (1, 2, 3)) -> list[dict]:
    """The built-in generator, drawing only from the templates of `levels`; same row shape."""
    return template_problems(templates_of(levels), n, seed, split)


def template_problems(templates: Iterable[str], n: int, seed: int, split: Split) -> list[dict]:
    """`n` problems drawn uniformly from the named `templates` (keys of TEMPLATES).

    One rng per (seed, split), drawn from sequentially, so the first k of n problems equal the first
    k of n+m. A question already produced in this split is redrawn, so a split has no repeats.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    chosen = tuple(templates)
    unknown = [t for t in chosen if t not in TEMPLATES]
    if unknown or not chosen:
        raise ValueError(f"unknown or no templates {unknown or chosen}; known: {', '.join(TEMPLATES)}")
    makers = [TEMPLATES[t] for t in chosen]
    rng = random.Random(f"{seed}:{split}")
    names = _TRAIN_NAMES if split == "train" else _EVAL_NAMES
    rows: list[dict] = []
    seen: set[str] = set()
    redraws = 0
    while len(rows) < n:
        question, steps, answer = rng.choice(makers)(rng, rng.choice(names))
        if question in seen:
            redraws += 1
            if redraws > _MAX_REDRAWS:
                raise UserError(f"the built-in math set ran out of distinct {split} questions after {len(rows)} "
                                f"of {n} from templates {', '.join(chosen)}; ask for fewer (data.num_train / "
                                "data.num_eval) or add levels (data.levels)")
            continue
        redraws = 0
        seen.add(question)
        rows.append({"prompt_id": f"math-{split}-s{seed}-{len(rows):05d}", "prompt": question,
                     "solution": "\n".join([*steps, f"The answer is {answer}."]), "answer": str(answer)})
    return rows
