"""Tests for stages/train/logps.py: per-token and per-sequence response log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from stages.train.logps import sequence_logps, token_logps

B, T, V = 3, 7, 11
PROMPT_LEN = [2, 3, 1]
RESPONSE_LEN = [4, 2, 6]  # row 1 ends in 2 padding positions; row 2 fills the width


def _random_case(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    loss_mask = torch.zeros(B, T, dtype=torch.long)
    for b, (p, n) in enumerate(zip(PROMPT_LEN, RESPONSE_LEN)):
        loss_mask[b, p : p + n] = 1
    return logits, input_ids, loss_mask


def _loop_reference(logits, input_ids, loss_mask) -> list[float]:
    """Position by position: the token at t is scored by the log-softmax of the logits at t-1."""
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(1, logits.shape[1]):
            if loss_mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1].double(), dim=-1)[input_ids[b, t]].item()
        out.append(total)
    return out


def test_token_logps_matches_log_softmax():
    logits, labels, _ = _random_case()
    got = token_logps(logits, labels)
    want = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert got.shape == (B, T)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got <= 0).all()


def test_token_logps_matches_trl_selective_log_softmax():
    from trl.trainer.utils import selective_log_softmax

    logits, labels, _ = _random_case(seed=3)
    torch.testing.assert_close(token_logps(logits, labels), selective_log_softmax(logits, labels),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_sequence_logps_matches_position_loop():
    logits, input_ids, loss_mask = _random_case(seed=1)
    got = sequence_logps(logits, input_ids, loss_mask)
    assert got.shape == (B,)
    assert got.dtype == torch.float64
    want = _loop_reference(logits, input_ids, loss_mask)
    for b in range(B):
        assert got[b].item() == pytest.approx(want[b], rel=1e-12, abs=1e-12)


def test_shift_by_hand():
    """V=3, T=3, tokens [0, 1, 2], response = positions 1 and 2.
    logits[0] = [0, ln 2, 0]  → p(next = 1) = 2/4 = 1/2
    logits[1] = [ln 3, 0, 0]  → p(next = 2) = 1/5
    logits[2] predicts nothing (no token after the last one): anything, here very peaked.
    logp = ln(1/2) + ln(1/5) = ln(0.1)."""
    logits = torch.tensor(
        [[[0.0, math.log(2), 0.0], [math.log(3), 0.0, 0.0], [50.0, -50.0, 7.0]]], dtype=torch.float64
    )
    input_ids = torch.tensor([[0, 1, 2]])
    loss_mask = torch.tensor([[0, 1, 1]])
    got = sequence_logps(logits, input_ids, loss_mask)
    assert got.item() == pytest.approx(math.log(0.1), rel=1e-12)
    # only the last response token: ln(1/5)
    got_last = sequence_logps(logits, input_ids, torch.tensor([[0, 0, 1]]))
    assert got_last.item() == pytest.approx(math.log(1 / 5), rel=1e-12)
    # a mask on the first position (which nothing predicts) adds nothing
    got_first = sequence_logps(logits, input_ids, torch.tensor([[1, 0, 0]]))
    assert got_first.item() == 0.0
    # the per-token values themselves
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])
    torch.testing.assert_close(per_token, torch.tensor([[math.log(0.5), math.log(0.2)]], dtype=torch.float64))


def test_masked_positions_contribute_nothing():
    logits, input_ids, loss_mask = _random_case(seed=2)
    base = sequence_logps(logits, input_ids, loss_mask)
    # logits at t are used iff the token at t+1 is a response token
    used = torch.zeros(B, T, dtype=torch.bool)
    used[:, :-1] = loss_mask[:, 1:].bool()
    noisy = logits.clone()
    noisy[~used] = 1e3 * torch.randn(int((~used).sum()), V, dtype=torch.float64)
    ids = input_ids.clone()
    ids[loss_mask == 0] = (ids[loss_mask == 0] + 1) % V  # labels of prompt/padding positions
    torch.testing.assert_close(sequence_logps(noisy, ids, loss_mask), base, rtol=0, atol=0)
    # whereas the logits just before the first response token do matter (they predict it)
    for b in range(B):
        moved = logits.clone()
        moved[b, PROMPT_LEN[b] - 1, input_ids[b, PROMPT_LEN[b]]] += 5.0
        changed = sequence_logps(moved, input_ids, loss_mask)
        assert changed[b] > base[b] + 1e-3
        others = [i for i in range(B) if i != b]
        torch.testing.assert_close(changed[others], base[others], rtol=0, atol=0)


def test_all_masked_is_zero():
    logits, input_ids, _ = _random_case(seed=4)
    got = sequence_logps(logits, input_ids, torch.zeros(B, T, dtype=torch.long))
    torch.testing.assert_close(got, torch.zeros(B, dtype=torch.float64), rtol=0, atol=0)


def test_bf16_logits_reduced_in_fp32():
    g = torch.Generator().manual_seed(5)
    b, t, v = 2, 9, 4096  # a wide vocabulary, where a bf16 logsumexp would be visibly off
    logits32 = torch.randn(b, t, v, generator=g)
    input_ids = torch.randint(0, v, (b, t), generator=g)
    loss_mask = torch.zeros(b, t, dtype=torch.long)
    loss_mask[:, 3:] = 1
    logits16 = logits32.bfloat16()

    got = sequence_logps(logits16, input_ids, loss_mask)
    assert got.dtype == torch.float32
    # same (bf16-rounded) logits, computed in float64: agrees to fp32 precision
    exact = _loop_reference(logits16.double(), input_ids, loss_mask)
    for i in range(b):
        assert got[i].item() == pytest.approx(exact[i], rel=1e-5)
    # and the fp32 logits' result within 1e-2 (the difference is bf16's rounding of the logits)
    torch.testing.assert_close(got, sequence_logps(logits32, input_ids, loss_mask), rtol=0, atol=1e-2)

    per_token = token_logps(logits16, input_ids)
    assert per_token.dtype == torch.float32


def test_fp32_stays_fp32():
    logits, input_ids, loss_mask = _random_case(dtype=torch.float32)
    assert token_logps(logits, input_ids).dtype == torch.float32
    assert sequence_logps(logits, input_ids, loss_mask).dtype == torch.float32


def test_gradient_flows_only_through_used_logits():
    logits, input_ids, loss_mask = _random_case(seed=6)
    logits.requires_grad_(True)
    sequence_logps(logits, input_ids, loss_mask).sum().backward()
    used = torch.zeros(B, T, dtype=torch.bool)
    used[:, :-1] = loss_mask[:, 1:].bool()
    assert (logits.grad[~used] == 0).all()
    # d/dlogits of log softmax[y] = onehot(y) - softmax: rows sum to zero
    torch.testing.assert_close(logits.grad[used].sum(-1), torch.zeros(int(used.sum()), dtype=torch.float64))


def test_bf16_logits_keep_no_fp32_copy_for_backward_and_get_the_same_gradient():
    """With a gradient, bf16 logits are reduced in fp32 one row at a time and the fp32 rows are
    recomputed in backward: the tensors autograd saves are the bf16 logits' size, not B × T × V fp32;
    values and gradients equal the plain computation's."""
    vocab = 1000  # large enough that the logits, not the labels, dominate what is saved
    g = torch.Generator().manual_seed(5)
    leaf = (3 * torch.randn(B, T, vocab, generator=g)).to(torch.bfloat16).requires_grad_(True)
    input_ids = torch.randint(0, vocab, (B, T), generator=g)
    _, _, loss_mask = _random_case(seed=5)

    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = sequence_logps(leaf, input_ids, loss_mask)
    got.sum().backward()
    fp32_copy = B * (T - 1) * vocab * 4
    assert sum(saved) < 0.75 * fp32_copy, saved  # the bf16 rows (half of it) and labels, no fp32 rows

    plain = leaf.detach().float().requires_grad_(True)
    want = sequence_logps(plain, input_ids, loss_mask)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad.float(), plain.grad.to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequence_logps_of_a_real_model_equal_with_left_and_right_padding_and_alone(tiny_llama, arch):
    """`policy_logps` in float64: each pair's log-probs with right padding and with left padding
    equal each sequence run alone through a naive full log-softmax. Llama's rotary positions are
    shift-invariant, so left padding is harmless there anyway; GPT-2's learned absolute positions
    are not — without `policy_logps`'s position ids its left-padded log-probs are wrong."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from stages.train.batch import TokenizedPair, collate
    from stages.train.loop import policy_logps

    if arch == "llama":
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    else:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        model = GPT2LMHeadModel(config).double().eval()
    pad_id = 0
    pairs = [TokenizedPair([5, 6, 7], [8, 9, 10, 11, 12], [13]), TokenizedPair([20] * 9, [21, 22], [23, 24, 25, 26, 27, 28])]

    def naive(prompt: list[int], response: list[int]) -> float:
        ids = torch.tensor([prompt + response])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        return float(sum(logprobs[len(prompt) + k - 1, tok] for k, tok in enumerate(response)))

    with torch.no_grad():
        want = [naive(p.prompt, p.chosen) for p in pairs] + [naive(p.prompt, p.rejected) for p in pairs]
        for side in ("right", "left"):
            batch = collate(pairs, pad_id, padding_side=side)
            assert (batch.attention_mask == 0).any()  # padding on that side really happens
            chosen, rejected = policy_logps(model, batch)
            assert torch.cat([chosen, rejected]).tolist() == pytest.approx(want, rel=1e-9, abs=1e-9), side
