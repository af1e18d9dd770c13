"""Forgetting on standard benchmarks: lm-eval-harness tasks (`evaluate.forgetting.lm_eval`).

The built-in exact-answer tasks (`pipeline/tasks.py`) say whether training cost the model some
arithmetic; the tasks of EleutherAI's lm-evaluation-harness (ARC, HellaSwag, MMLU, …) say the
same on benchmarks a reader already knows. Each task's accuracy before and after training enters
the alignment tax of seed 001 §3 like a built-in task's (`intervals.py`):
    TAX = 100/|T| · Σ_i min(0, (T_i(θ) − T_i(θ_SFT)) / T_i(θ_SFT)).

A run does not reach the hub: lm-eval runs with HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1, so a
task's data must be on this machine already (the `datasets` cache, filled beforehand with hub
access: `TaskManager().load([NAME])` reads it), or be a custom task:
`evaluate.forgetting.include_path` names a folder of lm-eval task YAMLs reading local files, e.g.

    task: my_arith
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_arith.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: label
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]

`check_available` runs in the pipeline's preflight (names only, no model, no data);
`lm_eval_accuracy` is the Ray task that scores one model folder, on CPU, in float32. Needs the
`eval` extra (`pip install '.[eval]'`, lm-eval ≥ 0.4).
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray

from pipeline.errors import UserError

# What a task's accuracy is, in order of preference: lm-eval names a metric "<metric>,<filter>".
PREFERRED_METRICS = ("acc,none", "exact_match,none", "acc_norm,none")

# The environment of the process that runs lm-eval, set before it starts: `datasets` and
# `huggingface_hub` read the offline switches when they are imported, tqdm its defaults. The
# progress bars (model loading, dataset preparation, request building) are a worker's stderr,
# printed by the driver mid-run; lm-eval's "Running loglikelihood requests" bar stays (it sets
# `disable` itself), the one sign of progress on a task of thousands of documents.
RUN_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}  # fmt: skip

# lm-eval warns when the model path contains "inst" or "chat" and no chat template is applied.
# Forgetting compares a model with itself before and after training, on lm-eval's own
# (template-free) prompts, so there is nothing for the user to change.
_CHAT_TEMPLATE_HINT = "appears to be an instruct or chat variant"


def pick_metric(result: dict) -> tuple[str, float]:
    """(metric, value) of one task's lm-eval result: the first of `PREFERRED_METRICS` it reports,
    else its first numeric metric ("<metric>,<filter>" keys; standard errors and counts skipped)."""

    def numeric(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for key in PREFERRED_METRICS:
        if numeric(result.get(key)):
            return key, float(result[key])
    for key, value in result.items():
        if "," in key and "_stderr" not in key.split(",")[0] and numeric(value):
            return key, float(value)
    raise ValueError(f"no numeric metric among {sorted(result)}")


def _task_manager(tasks: list[str], include_path: str | None, defaults: bool = False):
    """lm-eval's index of task names. Indexing its own ~15k YAMLs takes 5-20 s, so when every
    name is a custom task in `include_path` (and `defaults` is not asked for) only that folder is."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not defaults:
        custom = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in custom.all_tasks for name in tasks):
            return custom
    return TaskManager(include_path=include_path)


def check_available(tasks: list[str], include_path: str | None) -> None:
    """Raise a UserError when lm-eval is not installed, `include_path` is not a folder, or a task
    name is unknown to lm-eval (its own tasks, groups and tags, and the YAMLs in `include_path`).
    Reads no model and no data."""
    if not tasks:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(
            f"evaluate.forgetting.lm_eval names lm-eval-harness tasks ({', '.join(tasks)}) but lm-eval is not "
            "installed: install the eval extra (`pip install '.[eval]'`), or set evaluate.forgetting.lm_eval=[]"
        ) from None
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"evaluate.forgetting.include_path: {include_path} is not a folder (of lm-eval task YAMLs)")
    _quiet_logging()
    known = set(_task_manager(tasks, include_path).all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        where = f"the YAMLs in {include_path}" if include_path else "no include_path"
        raise UserError(
            f"evaluate.forgetting.lm_eval: {', '.join(map(repr, unknown))} is not an lm-eval task, group or tag "
            f"(lm-eval's own tasks and {where}); check the spelling (`lm_eval ls tasks`), or put a task YAML "
            "in the folder evaluate.forgetting.include_path names"
        )


def _quiet_logging() -> None:
    """lm-eval logs every step at INFO; keep its warnings (a task YAML the user can fix)."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    evaluator = logging.getLogger("lm_eval.evaluator")
    if not any(isinstance(f, _DropChatTemplateHint) for f in evaluator.filters):
        evaluator.addFilter(_DropChatTemplateHint())


class _DropChatTemplateHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _CHAT_TEMPLATE_HINT not in " ".join(str(record.msg).split())  # lm-eval wraps it over lines


def _load(manager, name: str) -> list:
    """The Task or Group lm-eval builds for `name` (a tag: its tasks), its data read from disk."""
    try:
        loaded = manager.load([name])
    except OSError as e:  # datasets: ConnectionError (offline, not cached), FileNotFoundError (a local file)
        raise UserError(
            f"lm-eval task {name}: its data is not on this machine (no hub access at run time): {e}. Fill the "
            "datasets cache beforehand, on a machine with hub access and the same HF_HOME (`python -c \"from "
            f"lm_eval.tasks import TaskManager; TaskManager().load(['{name}'])\"`), or point the task's YAML in "
            "evaluate.forgetting.include_path at local files"
        ) from None
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())


def _prompts(results: dict, name: str) -> int:
    """Documents scored for a task, or summed over a group's tasks."""
    if name in results["n-samples"]:
        return int(results["n-samples"][name]["effective"])
    return sum(_prompts(results, child) for child in results["group_subtasks"].get(name, []))


@ray.remote(num_cpus=1, max_calls=1, runtime_env={"env_vars": RUN_ENV})
def lm_eval_accuracy(model_path: str, tasks: list[str], limit: int, include_path: str | None) -> dict[str, dict]:
    """Each lm-eval task's accuracy of the model folder at `model_path` on its first `limit`
    documents: {task: {"prompts": n, "accuracy": value, "metric": name}} (a tag: its tasks).
    max_calls=1: the worker exits afterwards and gives back the model's memory."""
    import lm_eval

    _quiet_logging()
    manager = _task_manager(tasks, include_path)
    try:
        loaded = [item for name in tasks for item in _load(manager, name)]
    except KeyError:  # a custom group or YAML that names one of lm-eval's own tasks
        manager = _task_manager(tasks, include_path, defaults=True)
        loaded = [item for name in tasks for item in _load(manager, name)]
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_path},dtype=float32", tasks=loaded, limit=limit,
        task_manager=manager, log_samples=False, device="cpu",
        bootstrap_iters=0,  # no standard errors: the report's intervals are its own
    )  # fmt: skip
    accuracy = {}
    for item in loaded:
        name = getattr(item, "task_name", None) or item.name
        try:
            metric, value = pick_metric(results["results"][name])
        except ValueError as e:
            raise UserError(
                f"lm-eval task {name} reports no accuracy ({e}): name a task with an acc or exact_match metric "
                "(for a group without aggregate_metric_list, name its tasks)"
            ) from None
        accuracy[name] = {"prompts": _prompts(results, name), "accuracy": value, "metric": metric}
    return accuracy
