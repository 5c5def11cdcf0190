"""Which positions KFAC's input factor averages: the real tokens that reach the logits."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laplace_lora_ext.curvature.kfac import REACH_RTOL_EPS, reaching_weights


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    st.integers(0, 2**31 - 1),
)
def test_reaching_weights_keep_the_reached_real_tokens(B, T, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(B, T, generator=gen) < 0.8).double()
    kinds = torch.randint(0, 3, (B, T), generator=gen)  # 0: zero, 1: round-off, 2: reached
    kinds[0::2, 0], w[0::2, 0] = 2, 1.0  # even rows: a reached real token sets the scale
    kinds[1::2] = 0  # odd rows: every gradient underflowed (a saturated softmax)
    size = torch.rand(B, T, generator=gen).double() + 0.5
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    size = torch.where(kinds == 1, eps * size / 2, size)  # below 16 eps of any reached one
    size = torch.where(kinds == 0, torch.zeros_like(size), size)
    kept = reaching_weights(w, size, dtype)
    reached = (kinds == 2).double() * w
    for n in range(B):
        expected = reached[n] if reached[n].sum() > 0 else w[n]
        assert torch.equal(kept[n], expected)


def test_a_sequence_with_no_reached_token_keeps_all_its_tokens():
    """A saturated softmax: every gradient underflows to zero; A is as without the rule."""
    w = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    size = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    kept = reaching_weights(w, size, torch.float32)
    assert torch.equal(kept, torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))


def test_the_threshold_is_relative_to_the_sequence_and_the_dtype():
    w = torch.ones(1, 2, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        just_above = torch.tensor([[1.0, 1.01 * REACH_RTOL_EPS * eps]], dtype=torch.float64)
        just_below = torch.tensor([[1.0, 0.99 * REACH_RTOL_EPS * eps]], dtype=torch.float64)
        assert torch.equal(reaching_weights(w, just_above, dtype), w)
        assert torch.equal(reaching_weights(w, just_below, dtype), torch.tensor([[1.0, 0.0]]).to(w))
        # a tiny sequence is judged against its own largest gradient, not a global one
        assert torch.equal(reaching_weights(w, 1e-30 * just_below, dtype)[0, 0], w[0, 0])


def test_mismatched_token_axes_restrict_nothing():
    w = torch.ones(2, 3)
    assert torch.equal(reaching_weights(w, torch.zeros(2, 1), torch.float32), w)
