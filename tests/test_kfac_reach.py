"""Which positions KFAC's input factor averages: the real tokens that reach the logits."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from laplace import Laplace

from laplace_lora_ext.curvature.kfac import REACH_RTOL, reaching_weights
from tests.models import loader, random_batch, tiny_llama

EPS32 = torch.finfo(torch.float32).eps


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_reaching_weights_keep_the_reached_real_tokens(B, T, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(B, T, generator=gen) < 0.8).double()
    kinds = torch.randint(0, 3, (B, T), generator=gen)  # 0: zero, 1: round-off, 2: reached
    kinds[0::2, 0], w[0::2, 0] = 2, 1.0  # even rows: a reached real token sets the scale
    kinds[1::2] = 0  # odd rows: every gradient underflowed (a saturated softmax)
    size = torch.rand(B, T, generator=gen).double() + 0.5
    size = torch.where(kinds == 1, 2 * EPS32 * size / 1.5, size)  # round-off: <= 2 eps
    size = torch.where(kinds == 0, torch.zeros_like(size), size)
    kept = reaching_weights(w, size)
    reached = (kinds == 2).double() * w
    for n in range(B):
        expected = reached[n] if reached[n].sum() > 0 else w[n]
        assert torch.equal(kept[n], expected)


def test_a_sequence_with_no_reached_token_keeps_all_its_tokens():
    """A saturated softmax: every gradient underflows to zero; A is as without the rule."""
    w = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    size = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    kept = reaching_weights(w, size)
    assert torch.equal(kept, torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))


def test_the_threshold_is_relative_to_the_sequence_and_the_same_for_every_dtype():
    w = torch.ones(1, 2, dtype=torch.float64)
    assert REACH_RTOL == 16 * EPS32
    for dtype in (torch.float32, torch.float64):
        above = torch.tensor([[1.0, 1.01 * REACH_RTOL]], dtype=dtype)
        below = torch.tensor([[1.0, 0.99 * REACH_RTOL]], dtype=dtype)
        assert torch.equal(reaching_weights(w, above), w)
        assert torch.equal(reaching_weights(w, below), torch.tensor([[1.0, 0.0]]).to(w))
        # a sequence with small gradients is judged against its own largest one
        assert torch.equal(reaching_weights(w, 1e-30 * above), w)


def test_mismatched_token_axes_restrict_nothing():
    w = torch.ones(2, 3)
    assert torch.equal(reaching_weights(w, torch.zeros(2, 1)), w)
    assert torch.equal(reaching_weights(w, None), w)


def _input_factors(model, batch) -> list[torch.Tensor]:
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(loader(batch, 4))
    return [F[-1].double() for F in la.H_facs.kfacs]


def test_float32_and_float64_copies_keep_the_same_positions_under_peaked_attention():
    """The cut-off does not follow the model's dtype. With the last block's attention peaked
    (its key projection x10), some positions' gradients fall below float32's round-off; a
    float32 copy and the float64 original must still average the same positions into ``A``
    (review, 2026-12-04: with a cut-off of 16 epsilons of each dtype they differed by 0.71,
    relative Frobenius; now by 4e-7)."""
    model = tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.1.self_attn.k_proj" in name and name.endswith("weight"):
                p.mul_(10.0)
    batch = random_batch(1, 12, 3, "right")
    batch["attention_mask"][:] = 1
    f64 = _input_factors(model, batch)
    f32 = _input_factors(copy.deepcopy(model).float(), batch)
    for A64, A32 in zip(f64, f32, strict=True):
        assert (A32 - A64).norm() <= 1e-5 * A64.norm()
