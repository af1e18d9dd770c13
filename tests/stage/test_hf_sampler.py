"""The hf sampler on real Ray with a tiny random Llama, every check against the model itself.

The model is `tiny_llama` with its EOS embedding (tied to the output row) scaled up, so that at
temperature 1 some candidates stop on EOS and others run into `max_tokens`: both finish reasons
occur. Five prompts of different lengths in batches of 2 or 3, so every batch is left-padded.
Three sampler runs on Ray (each mostly actor start-up: torch and transformers imports): seed 0 on
one actor, seed 0 again on two actors, seed 1.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import HFSampler
from stages.sample import hf
from stages.sample.candidates import CANDIDATE_COLUMNS, stop_token_ids
from stages.sample.candidates import SCHEMA
from stages.train.batch import tokenize_pair

SYSTEM = "Solve it step by step."
PROMPTS = [
    {"prompt_id": f"q{i}", "prompt": question, "solution": f"worked {i}", "answer": answer}
    for i, (question, answer) in enumerate([
        ("What is 7 + 5?", "12"),
        ("Tom has 3 bags of 4 apples. How many apples does Tom have in all?", "12"),
        ("How many dollars does Lena make by selling all 16 boxes at 2 dollars a box, if she sells half?", None),
        ("0 1 2 3?", "4"),
        ("The answer is what?", "1"),
    ])
]  # fmt: skip
N, MAX_TOKENS = 3, 12


@pytest.fixture(scope="module")
def eos_llama(tiny_llama, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("models") / "eos-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():  # random logits are O(0.2): ×20 makes EOS likely after some contexts, not all
        model.model.embed_tokens.weight[model.config.eos_token_id] *= 20.0
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return path


def _sample(model: Path, out: Path, **settings) -> pd.DataFrame:
    sampler = HFSampler(max_tokens=MAX_TOKENS, system_prompt=SYSTEM, **settings)
    hf.generate(sampler, str(model), "eos-llama", PROMPTS, out)
    table = pq.read_table(out)
    assert table.schema.equals(SCHEMA)  # the candidate columns, typed as every sampler writes them
    return pd.DataFrame(table.to_pylist(), dtype=object).sort_values(["prompt_id", "candidate_id"], ignore_index=True)


@pytest.fixture(scope="module")
def sampled(eos_llama, ray_local, tmp_path_factory) -> pd.DataFrame:
    return _sample(eos_llama, tmp_path_factory.mktemp("sampled"), n=N, temperature=1.0, batch_size=2, seed=0)


@pytest.fixture(scope="module")
def greedy(eos_llama) -> pd.DataFrame:
    """evaluate's setting (temperature 0), n=2, by the Ray actor's own class called here: one
    actor start-up less, and the plain generate it is checked against runs in the same process."""
    sampler = HFSampler(max_tokens=MAX_TOKENS, system_prompt=SYSTEM, n=2, temperature=0.0, batch_size=3)
    generator = hf.HFGenerator(sampler, str(eos_llama), "eos-llama")
    table = pa.concat_tables(generator(pa.Table.from_pylist(PROMPTS[i : i + 3])) for i in (0, 3))
    return pd.DataFrame(table.to_pylist(), dtype=object)


def _ids(df: pd.DataFrame) -> list[list[int]]:
    return df.response_token_ids.tolist()


def test_writes_n_candidate_rows_per_prompt_with_the_candidate_columns(sampled):
    assert tuple(sampled.columns) == CANDIDATE_COLUMNS  # and typed (`_sample`)
    assert len(sampled) == len(PROMPTS) * N
    assert sampled.groupby("prompt_id").candidate_id.apply(sorted).tolist() == [list(range(N))] * len(PROMPTS)
    assert (sampled.sampler == "hf").all() and (sampled.model == "eos-llama").all() and (sampled.seed == 0).all()
    by_id = {p["prompt_id"]: p for p in PROMPTS}
    for row in sampled.itertuples():
        assert {k: getattr(row, k) for k in ("prompt_id", "prompt", "solution", "answer")} == by_id[row.prompt_id]
        user = HFSampler().prompt_template.format(prompt=row.prompt)
        assert row.messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    # n independent samples: a prompt's candidates differ
    assert sampled.groupby("prompt_id").response.nunique().min() == N


def test_prompt_ids_are_the_chat_template_rendering_training_uses(sampled, eos_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(eos_llama)
    for row in sampled.itertuples():
        messages, ids = row.messages, row.prompt_token_ids
        pair = {"prompt": messages, "chosen_token_ids": [1], "rejected_token_ids": [1]}
        assert ids == tokenize_pair(tokenizer, pair, max_length=10_000).prompt
        chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        assert tokenizer.decode(ids) == chatml + "<|im_start|>assistant\n"
        assert row.prompt_tokens == len(ids)


def test_responses_end_at_the_first_eos_or_at_max_tokens_and_decode_to_the_text(sampled, eos_llama):
    from transformers import AutoTokenizer

    tokenizer, stops = AutoTokenizer.from_pretrained(eos_llama), stop_token_ids(eos_llama)
    for row, ids in zip(sampled.itertuples(), _ids(sampled)):
        assert row.response == tokenizer.decode(ids, skip_special_tokens=True)
        assert row.response_tokens == len(ids) and 1 <= len(ids) <= MAX_TOKENS
        assert not stops & set(ids[:-1])  # nothing after the first EOS (padding) is kept
        assert (row.finish_reason == "length") == (len(ids) == MAX_TOKENS and ids[-1] not in stops)
        assert (row.finish_reason == "stop") == (ids[-1] in stops)
    assert set(sampled.finish_reason) == {"stop", "length"}


def test_greedy_answers_are_what_a_plain_unpadded_generate_returns(greedy, eos_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, stops = AutoTokenizer.from_pretrained(eos_llama), stop_token_ids(eos_llama)
    model = AutoModelForCausalLM.from_pretrained(eos_llama).eval()
    assert len(greedy) == 2 * len(PROMPTS)
    first, second = greedy[greedy.candidate_id == 0], greedy[greedy.candidate_id == 1]
    assert _ids(first) == _ids(second)  # greedy: the n candidates are one answer
    for row, ids in zip(first.itertuples(), _ids(first)):
        prompt = torch.tensor([row.prompt_token_ids])
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=MAX_TOKENS, eos_token_id=sorted(stops),
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert ids == hf.until_stop(out[0, prompt.shape[1] :].tolist(), stops)


def test_same_seed_same_samples_on_any_number_of_actors_and_another_seed_other_samples(
    sampled, eos_llama, tmp_path_factory
):
    again = _sample(eos_llama, tmp_path_factory.mktemp("again"), n=N, temperature=1.0, batch_size=2, seed=0, workers=2)
    assert _ids(again) == _ids(sampled)
    assert again.finish_reason.tolist() == sampled.finish_reason.tolist()
    other = _sample(eos_llama, tmp_path_factory.mktemp("other"), n=N, temperature=1.0, batch_size=2, seed=1)
    differ = sum(a != b for a, b in zip(_ids(other), _ids(sampled)))
    assert differ >= 0.8 * len(sampled), f"only {differ} of {len(sampled)} candidates changed with the seed"


def test_until_stop_keeps_the_first_eos_and_drops_the_padding_after_it():
    eos, pad = 2, 0
    assert hf.until_stop([5, 6, eos, eos, eos], frozenset({eos})) == [5, 6, eos]  # pad_token_id == EOS
    assert hf.until_stop([5, pad, 6, eos, pad, pad], frozenset({eos})) == [5, pad, 6, eos]  # a sampled pad id stays
    assert hf.until_stop([5, 6, 7], frozenset({eos})) == [5, 6, 7]
    assert hf.batch_seed(0, "q0") == hf.batch_seed(0, "q0") != hf.batch_seed(1, "q0")
