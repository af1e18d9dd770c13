"""OGD's update rule (stages/train/ogd.py): the formula in float64 against an independent
projection, and the paper's Theorems 5.3–5.4 on a real (tiny) model with plain SGD."""

from __future__ import annotations

import pytest
import torch

from stages.train.ogd import global_dot, ogd_coefficient, ogd_direction, ogd_step


def _projection_matrix_form(g_w: torch.Tensor, g_l: torch.Tensor) -> torch.Tensor:
    """g_w with its component along g_l removed, as (I − u uᵀ) g_w with u = g_l/‖g_l‖, built as a
    dense matrix: a different computation from the rule's scalar coefficient."""
    u = g_l / torch.linalg.vector_norm(g_l)
    return (torch.eye(len(g_w), dtype=torch.float64) - torch.outer(u, u)) @ g_w


@pytest.mark.parametrize("seed", range(20))
def test_rule_matches_the_projection_or_leaves_g_w(seed):
    gen = torch.Generator().manual_seed(seed)
    g_w, g_l = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    g = ogd_direction(g_w, g_l)
    if g_w @ g_l > 0:
        torch.testing.assert_close(g, _projection_matrix_form(g_w, g_l), atol=1e-12, rtol=0)
        assert abs(float(g @ g_l)) < 1e-12 * float(g_l.norm() * g_w.norm())  # orthogonal to g_l
    else:
        assert torch.equal(g, g_w)  # lowering NLL(y+) already raises NLL(y−): no projection
    # Theorems 5.3 and 5.4 to first order, for the step Δθ = −η·g: ΔNLL(y+) ≈ −η·g·g_w ≤ 0 and
    # ΔNLL(y−) ≈ −η·g·g_l ≥ 0, i.e. g·g_w ≥ 0 and g·g_l ≤ 0
    assert float(g @ g_w) >= 0 and float(g @ g_l) <= 1e-12


def test_both_signs_occur_among_the_seeds():
    """The parametrised test above covers the projecting and the non-projecting branch."""
    signs = set()
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        g_w, g_l = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
        signs.add(bool(g_w @ g_l > 0))
    assert signs == {True, False}


def test_hand_derived_case():
    g_w, g_l = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64)
    # g_w·g_l = 2, ‖g_l‖² = 4: coefficient 1/2, g = (1, 1) − (1, 0) = (0, 1)
    assert float(ogd_coefficient(g_w @ g_l, g_l @ g_l)) == 0.5
    assert ogd_direction(g_w, g_l).tolist() == [0.0, 1.0]
    assert ogd_direction(g_w, -g_l).tolist() == [1.0, 1.0]
    assert ogd_direction(g_w, torch.zeros(2, dtype=torch.float64)).tolist() == [1.0, 1.0]  # nothing to avoid


def test_global_dot_sums_over_parameters_and_skips_missing_gradients():
    xs = [torch.tensor([[1.0, 2.0]]), None, torch.tensor([3.0])]
    ys = [torch.tensor([[4.0, 5.0]]), torch.tensor([9.0]), torch.tensor([-1.0])]
    assert float(global_dot(xs, ys)) == 1 * 4 + 2 * 5 + 3 * -1


# ── the theorems on a real model ─────────────────────────────────────────────────────────────
PAIRS = [
    {"prompt": [{"role": "user", "content": "How many apples are 3 bags of 4 apples?"}],
     "chosen": [{"role": "assistant", "content": "3 × 4 = 12 apples. The answer is 12."}],
     "rejected": [{"role": "assistant", "content": "3 + 4 = 7 apples. The answer is 7."}]},
    {"prompt": [{"role": "user", "content": "16 ÷ 2 = ?"}],
     "chosen": [{"role": "assistant", "content": "16 ÷ 2 = 8. The answer is 8."}],
     "rejected": [{"role": "assistant", "content": "16 - 2 = 14. The answer is 14."}]},
]  # fmt: skip


def _mean_nll(model, batch) -> tuple[float, float]:
    from stages.train.loop import policy_logps

    with torch.no_grad():
        c, r = policy_logps(model, batch)
    return float(-c.double().mean()), float(-r.double().mean())


def _tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import disable_dropout

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = disable_dropout(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64))
    batch = collate([tokenize_pair(tokenizer, row, 256) for row in PAIRS], tokenizer.pad_token_id)
    return model, batch


def test_sgd_step_lowers_nll_chosen_and_not_nll_rejected(tiny_llama):
    """Seed 001 Theorems 5.3–5.4: with plain SGD and a small step, the OGD update lowers the mean
    NLL of the chosen responses and does not lower that of the rejected ones; the plain NLL(y+)
    step (no projection) on the same model lowers both — which is what OGD is for."""
    from stages.train.objectives import dpo

    model, batch = _tiny(tiny_llama)
    before = _mean_nll(model, batch)
    outputs, stats = ogd_step(model, [batch], [(None, None)], lambda lp: dpo(lp, 0.1) if lp.ref_chosen is not None else None,
                              scale=batch.num_pairs)  # fmt: skip
    assert stats["ogd/projected"] == 1.0 and stats["ogd/dot"] > 0, "the chosen and rejected gradients must align for this test"
    assert outputs == [None]  # no reference given: the comparison objective was not computable and is not invented
    lr = 1e-5  # small: the theorems are first-order statements
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in g:
                p.sub_(lr * g[n])
    after = _mean_nll(model, batch)
    chosen_fall, rejected_fall = before[0] - after[0], before[1] - after[1]
    assert chosen_fall > 1e-3, (before, after)  # NLL(y+) falls
    # NLL(y−) does not fall to first order (the step is orthogonal to g_l): what moves is the
    # second-order remainder, a thousandth of the chosen side's fall
    assert rejected_fall < 1e-3 * chosen_fall, (before, after)

    # The same step along g_w alone lowers the rejected NLL too.
    model, batch = _tiny(tiny_llama)
    from stages.train.loop import policy_logps

    c, _ = policy_logps(model, batch)
    (-c.mean()).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
    plain = _mean_nll(model, batch)
    assert before[1] - plain[1] > 0.1 * (before[0] - plain[0]) > 0, (before, plain)  # both fall together
    assert before[1] - plain[1] > 100 * abs(rejected_fall)


def test_step_leaves_the_projected_gradient_in_grad(tiny_llama):
    """The `.grad` ogd_step leaves is g_w − c·g_l of the flat gradients autograd gives for each
    side separately, and it is orthogonal to g_l."""
    from stages.train.loop import policy_logps

    model, batch = _tiny(tiny_llama)
    params = [p for p in model.parameters()]
    c, r = policy_logps(model, batch)
    g_w = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-c.mean(), params, retain_graph=True)])
    g_l = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-r.mean(), params)])
    _, stats = ogd_step(model, [batch], [(None, None)], lambda lp: None, scale=batch.num_pairs)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    u = g_l / g_l.norm()  # (too many parameters for the dense projection matrix: the unit-vector form)
    torch.testing.assert_close(got, g_w - (g_w @ u) * u if g_w @ g_l > 0 else g_w, atol=1e-10, rtol=1e-8)
    assert abs(float(got @ g_l)) < 1e-8 * float(g_l.norm() * g_w.norm())
    assert stats["ogd/grad_norm_chosen"] == pytest.approx(float(g_w.norm()), rel=1e-10)
    assert stats["ogd/grad_norm_rejected"] == pytest.approx(float(g_l.norm()), rel=1e-10)
    assert stats["ogd/coefficient"] == pytest.approx(float(g_w @ g_l / (g_l @ g_l)), rel=1e-10)
