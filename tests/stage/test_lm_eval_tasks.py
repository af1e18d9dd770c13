"""lm-eval-harness tasks for forgetting, against the real lm-eval on a custom task over a local
jsonl: its accuracy equals the argmax of log-likelihoods computed here with transformers alone;
unknown tasks and missing data are UserErrors that name the task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from stages.evaluate.lm_eval_tasks import check_available, lm_eval_accuracy, pick_metric

pytest.importorskip("lm_eval")

# 8 rows, 6 scored (limit): three choices each, the gold one at a varying position.
ROWS = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": i % 3}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2), (7, 1), (4, 4), (9, 0), (6, 3)])]  # fmt: skip
LIMIT = 6


def write_task(folder: Path, name: str, data: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval")
    data = root / "local_arith.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    write_task(root / "tasks", "local_arith", data)
    write_task(root / "tasks", "gone_arith", root / "no-such-file.jsonl")  # data not on disk
    return root / "tasks"


def reference_accuracy(model_dir: Path, rows: list[dict]) -> float:
    """Each choice's log-likelihood as lm-eval defines it for a multiple-choice task: context =
    doc_to_text, continuation = target_delimiter " " + choice; the pair tokenized whole and split
    at the context's length (lm_eval/api/model.py `_encode_pair`); the sum of the continuation
    tokens' log-probs. Prediction: argmax (unnormalised, `acc`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = []
    for row in rows:
        context_ids = tok.encode(row["question"])
        lls = []
        for choice in row["choices"]:
            whole = tok.encode(row["question"] + " " + choice)
            assert whole[: len(context_ids)] == context_ids  # the split is at a token boundary
            with torch.no_grad():
                logps = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            # token t is predicted at position t-1
            lls.append(sum(logps[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole))))
        correct.append(float(max(range(len(lls)), key=lls.__getitem__) == row["label"]))
    return sum(correct) / len(correct)


def _forgetting_config(tasks: list[str], task_folder: Path):
    from pipeline.config import RunConfig

    return RunConfig(evaluate={"forgetting": {"tasks": ["times_table"], "lm_eval": tasks, "num_prompts": LIMIT,
                                              "include_path": str(task_folder)}})  # fmt: skip


def test_accuracy_equals_argmax_of_loglikelihoods_computed_with_transformers(ray_local, tiny_llama, task_folder):
    from stages.evaluate import lm_eval_forgetting  # the evaluate stage's own call

    got = lm_eval_forgetting(_forgetting_config(["local_arith"], task_folder), str(tiny_llama))
    expected = reference_accuracy(tiny_llama, ROWS[:LIMIT])
    assert 0 < expected < 1  # the random model gets some right and some wrong: the check discriminates
    assert got == {"local_arith": {"prompts": LIMIT, "accuracy": pytest.approx(expected, abs=1e-12), "metric": "acc,none"}}


def test_task_whose_data_file_is_missing_is_a_user_error_naming_it(ray_local, tiny_llama, task_folder):
    from stages.evaluate import lm_eval_forgetting

    with pytest.raises(UserError) as info:  # the user's message alone, not the remote traceback
        lm_eval_forgetting(_forgetting_config(["local_arith", "gone_arith"], task_folder), str(tiny_llama))
    message = str(info.value)
    assert message.startswith("lm-eval task gone_arith: its data is not on this machine")
    assert "no-such-file.jsonl" in message and "Traceback" not in message


def test_unknown_task_is_a_user_error_naming_it_and_where_yamls_go(task_folder):
    check_available(["local_arith"], str(task_folder))
    with pytest.raises(UserError, match=r"'local_arithh' is not an lm-eval task.*include_path"):
        check_available(["arc_easy", "local_arith", "local_arithh"], str(task_folder))  # lm-eval's own and custom pass


def test_lm_eval_not_installed_is_a_user_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(UserError, match=r"names lm-eval-harness tasks \(arc_easy\).*pip install '\.\[eval\]'"):
        check_available(["arc_easy"], None)


def test_pick_metric_prefers_acc_then_exact_match_then_acc_norm_else_first_numeric():
    assert pick_metric({"alias": "t", "acc_norm,none": 0.5, "acc,none": 0.25, "acc_stderr,none": 0.1}) == ("acc,none", 0.25)
    assert pick_metric({"exact_match,none": 1, "acc_norm,none": 0.5}) == ("exact_match,none", 1.0)
    assert pick_metric({"acc_norm,none": 0.5, "acc_stderr,none": "N/A"}) == ("acc_norm,none", 0.5)
    # gsm8k-like: only filtered metrics; counts and standard errors are not metrics
    assert pick_metric({"name": "g", "sample_len": 16, "exact_match_stderr,strict-match": 0.1,
                        "exact_match,strict-match": 0.375, "exact_match,flexible-extract": 0.5}) == ("exact_match,strict-match", 0.375)  # fmt: skip
    assert pick_metric({"acc,none": "N/A", "f1,none": 0.75}) == ("f1,none", 0.75)
    with pytest.raises(ValueError, match="no numeric metric"):
        pick_metric({"alias": "t", "acc_stderr,none": 0.1, "flag,none": True})
