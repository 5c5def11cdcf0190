"""The Monte Carlo studies' algebra: the exchangeable covariance of ``mc_exchangeable_check``."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
