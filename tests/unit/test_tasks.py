"""Built-in forgetting tasks and the evaluation's prompt list."""

import pytest

from pipeline.config import RunConfig
from pipeline.data import TEMPLATES, load_prompts
from pipeline.tasks import TASKS, task_prompts
from stages.evaluate.sets import FORGETTING, evaluation_prompts
from stages.judge.math_rules import score_math


@pytest.mark.parametrize("task", list(TASKS))
def test_a_task_is_deterministic_distinct_and_its_answer_is_right(task):
    rows = task_prompts(task, 20, seed=1)
    assert rows == task_prompts(task, 20, seed=1)
    assert rows != task_prompts(task, 20, seed=2)
    assert len({r["prompt"] for r in rows}) == 20
    for row in rows:  # recompute each answer from the question's own numbers
        nums = [int(x) for x in row["prompt"].replace(",", " ").replace("?", " ").split() if x.isdigit()]
        expected = {"times_table": lambda n: n[0] * n[1], "larger": max,
                    "next_number": lambda n: n[-1] + (n[1] - n[0])}.get(task)
        if expected:
            assert int(row["answer"]) == expected(nums), row
        assert score_math(f"So: The answer is {row['answer']}.", row["answer"]).score >= 4


def test_unit_conversions_by_hand():
    rows = {r["prompt"]: int(r["answer"]) for r in task_prompts("unit_conversion", 40)}
    factors = {"hours": 60, "minutes": 60, "weeks": 7, "years": 12, "metres": 100, "kilograms": 1000, "dozen": 12}
    for question, answer in rows.items():
        k, unit = question.rstrip("?").split()[-2:]
        assert answer == int(k) * factors[unit]


def test_no_task_is_a_template_of_the_training_set():
    assert not set(TASKS) & set(TEMPLATES)


def test_evaluation_prompts_tag_sets_prefix_later_ids_and_drop_training_prompts(tmp_path):
    train = [{"id": f"p{i}", "prompt": f"question {i}", "answer": "1"} for i in range(6)]
    held = [{"id": "h0", "prompt": "question 3", "answer": "1"}, {"id": "h1", "prompt": "held 1", "answer": "2"}]
    (tmp_path / "train.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in train))
    (tmp_path / "held.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in held))
    data = {"type": "file", "path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "held.jsonl"),
            "fields": {"id": "id", "answer": "answer"}}
    cfg = RunConfig(data=data, evaluate={"sets": {"in_domain": {}, "ood": {"data": {"type": "builtin_math",
                    "templates": ["share"], "num_eval": 3}}}, "forgetting": {"tasks": ["larger"], "num_prompts": 2}})
    rows, dropped = evaluation_prompts(cfg)
    assert dropped == {"in_domain": 1, "ood": 0}  # "question 3" is a training prompt
    assert [(r["set"], r["prompt_id"]) for r in rows] == [
        ("in_domain", "h1"),
        *[("ood", f"ood/{r['prompt_id']}") for r in load_prompts(cfg.evaluate.sets["ood"].data, "eval")],
        (FORGETTING + "larger", "larger-s0-00000"), (FORGETTING + "larger", "larger-s0-00001")]


def test_a_set_left_empty_is_a_named_error(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "q", "answer": "1"}\n{"prompt": "r", "answer": "2"}\n')
    (tmp_path / "e.jsonl").write_text('{"prompt": "q", "answer": "1"}\n')
    cfg = RunConfig(data={"type": "file", "path": str(tmp_path / "t.jsonl"), "eval_path": str(tmp_path / "e.jsonl"),
                          "fields": {"answer": "answer", "id": None}},
                    evaluate={"forgetting": None})
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=r"evaluate.sets.in_domain: no held-out prompt left \(1 of 1"):
        evaluation_prompts(cfg)


def test_unknown_templates_and_tasks_are_config_errors():
    from pipeline.config import UserError, load_config  # noqa: F401

    with pytest.raises(Exception, match="unknown template"):
        RunConfig(data={"type": "builtin_math", "templates": ["nope"]})
    with pytest.raises(Exception, match="unknown task"):
        RunConfig(evaluate={"forgetting": {"tasks": ["nope"]}})
    with pytest.raises(Exception, match="not a usable set name"):
        RunConfig(evaluate={"sets": {"a b": {}}})
