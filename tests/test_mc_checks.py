"""The Monte Carlo and posterior studies' algebra: the exchangeable covariance of
``mc_exchangeable_check``, the data-space exact GGN of ``exact_ggn_shift_check``."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.exact_ggn_shift_check import dataspace_variances, lambda_roots, training_side
from benchmarks.mc_exchangeable_check import exchangeable, variance_imbalance


def _covariances(n: int, C: int, seed: int) -> torch.Tensor:
    A = torch.randn(n, C, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return A @ A.mT


@settings(max_examples=30, deadline=None)
@given(C=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_exchangeable_keeps_the_centred_variance_and_equalises_it(C, seed):
    """Same ``tr(P Σ P)``, equal class variances and correlations (a multiple of ``P``)."""
    f_var = _covariances(4, C, seed)
    P = torch.eye(C, dtype=torch.float64) - 1.0 / C
    E = exchangeable(f_var)
    trace = lambda M: M.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    assert torch.allclose(trace(E), trace(P @ f_var @ P))
    assert torch.allclose(E, E[:, :1, :1] / P[0, 0] * P)
    assert abs(variance_imbalance(E) - 1.0) < 1e-12


def test_exchangeable_is_the_centred_covariance_with_two_classes():
    """With two classes ``tr(P Σ P) P = P Σ P``: the logit difference keeps its variance."""
    f_var = _covariances(5, 2, 0)
    P = torch.eye(2, dtype=torch.float64) - 0.5
    assert torch.allclose(exchangeable(f_var), P @ f_var @ P)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 4), C=st.integers(2, 4), P=st.integers(3, 9), seed=st.integers(0, 2**16))
def test_dataspace_variances_equal_the_dense_exact_ggn_posterior(N, C, P, seed):
    """``exact_ggn_shift_check``'s Woodbury form against ``j (Jᵀ s Λ J + c D⁻¹)⁻¹ jᵀ``."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(N, C, P, generator=g, dtype=torch.float64)
    j = torch.randn(3, C, P, generator=g, dtype=torch.float64)
    d = torch.rand(P, generator=g, dtype=torch.float64) + 0.1
    logits, s = 2 * torch.randn(N, C, generator=g, dtype=torch.float64), 1.7
    roots = lambda_roots(logits, s)
    p = logits.softmax(-1)
    lam = s * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    assert torch.allclose(roots @ roots.mT, lam, atol=1e-12)
    factors = [0.01, 0.5, 1.0, 30.0]
    got = dataspace_variances(j, d, *training_side(J.flatten(0, 1), d, roots), factors)
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, lam, J)
    for c, var in zip(factors, got, strict=True):
        want = j @ torch.linalg.inv(ggn + torch.diag(c / d)) @ j.mT
        assert torch.allclose(var, want, rtol=1e-8, atol=1e-10)
