"""How often re-tokenising the decoded text gives other ids than the policy sampled.

    .venv/bin/python bench/retokenize_mismatch.py runs/default/round-0/sample [--model embedded:smollm2-135m-instruct]

Training used to score `tokenizer(response) + EOS`; it now scores the sampled
`response_token_ids` (and gives a response cut off by `max_tokens` no EOS). This reads a sample
stage's Parquet and counts, per candidate, whether the old recipe's ids differ from the sampled
ones — in the text tokens alone, and through the EOS appended to cut-off responses. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sample_dir")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pipeline.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    eos = tokenizer.eos_token_id
    df = pd.read_parquet(args.sample_dir, columns=["response", "response_token_ids", "finish_reason"])
    text_differs = eos_wrong = either = 0
    for row in df.itertuples():
        sampled = [int(t) for t in row.response_token_ids]
        text_ids = tokenizer(row.response, add_special_tokens=False)["input_ids"]
        body = sampled[:-1] if sampled and sampled[-1] == eos else sampled
        old = text_ids + [eos]  # the old recipe: EOS after every response
        text_differs += text_ids != body
        eos_wrong += row.finish_reason == "length"
        either += old != sampled
    n = len(df)
    print(json.dumps({
        "candidates": n,
        "text_retokenisation_differs": text_differs, "text_retokenisation_differs_share": round(text_differs / n, 4),
        "cut_off_given_a_spurious_eos": eos_wrong, "cut_off_share": round(eos_wrong / n, 4),
        "old_recipe_differs_from_sampled": either, "old_recipe_differs_share": round(either / n, 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
