"""LogitJacobianCache: cached scoring equals the posterior's own predictive."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laplace_lora_ext.jacobian_cache import LogitJacobianCache
from laplace_lora_ext.links import probit
from tests.models import loader, lora_laplace, random_batch, tiny_llama


def _fitted(structure: str = "kron", **kwargs):
    batch = random_batch(n=6, n_classes=3)
    la = lora_laplace(tiny_llama(), structure, **kwargs)  # float64
    la.fit(loader(batch, 3))
    la.prior_precision = torch.linspace(0.5, 2.0, len(la.params), dtype=la._dtype)
    return la, batch


def test_cache_scores_like_the_posterior_and_recomputes_over_budget():
    la, batch = _fitted()
    kept = LogitJacobianCache(la, loader(batch, 3))
    dropped = LogitJacobianCache(la, loader(batch, 3), max_bytes=0)  # nothing kept
    assert len(kept) == len(dropped) == 2
    x = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(kept.probs(la, "probit"), la(x, link_approx="probit"))
    torch.testing.assert_close(kept.logits, la.predictive_moments(x)[0])
    assert torch.equal(kept.labels, batch["labels"])
    draws = [c.probs(la, "mc", 50, torch.Generator().manual_seed(1)) for c in (kept, dropped)]
    torch.testing.assert_close(draws[0], draws[1])


def test_keep_masks_the_variance_of_other_tensors():
    la, batch = _fitted()
    cache = LogitJacobianCache(la, loader(batch, 3), block_dtype=torch.float32)
    assert all(b.dtype == torch.float32 for _, blocks, _ in cache for b in blocks)
    none = cache.probs(la, "mc", 10, keep=set())  # no variance: the MAP's softmax
    torch.testing.assert_close(none, cache.logits.to(none.dtype).softmax(-1))
    last = len(la.params) - 1
    _, blocks, _ = next(iter(LogitJacobianCache(la, [batch])))  # all 6 examples at once
    only_last = [b if i == last else torch.zeros_like(b) for i, b in enumerate(blocks)]
    expected = la._functional_variance_blocks(only_last)
    probs_last = cache.probs(la, "probit", keep={last})
    kappa = (1 + torch.pi / 8 * expected.diagonal(dim1=-2, dim2=-1)).rsqrt()
    torch.testing.assert_close(
        probs_last, torch.softmax(kappa * cache.logits.to(kappa.dtype), -1), rtol=1e-4, atol=1e-6
    )


def test_with_logits_recentres_the_predictive_and_keeps_it_when_recomputing():
    la, batch = _fitted()
    shifted = torch.randn(6, 3, dtype=la._dtype, generator=torch.Generator().manual_seed(0))
    for max_bytes in (float("inf"), 0):
        cache = LogitJacobianCache(la, loader(batch, 3), max_bytes=max_bytes)
        moved = cache.with_logits(shifted)
        torch.testing.assert_close(moved.logits, shifted.to(moved.logits))
        assert torch.equal(moved.labels, cache.labels)
        assert torch.equal(cache.logits, LogitJacobianCache(la, loader(batch, 3)).logits)
        x = {k: v for k, v in batch.items() if k != "labels"}
        f_var = la.predictive_moments(x)[1]
        torch.testing.assert_close(moved.probs(la, "probit"), probit(shifted.to(f_var), f_var))
    with pytest.raises(ValueError, match="shape"):
        cache.with_logits(shifted[:2])


def _variances(cache: LogitJacobianCache, la) -> torch.Tensor:
    """Functional variances ``(N, C, C)`` the cache scores ``la`` with (probit's input)."""
    from laplace_lora_ext import eigenbasis

    out = []
    for _, blocks, _ in cache:
        blocks = [b.to(la._dtype) for b in blocks]
        if cache._basis is None:
            out.append(la._functional_variance_blocks(blocks))
        else:
            out.append(eigenbasis.variance(la, cache._basis, blocks))
    return torch.cat(out)


@settings(max_examples=15, deadline=None)
@given(
    log_deltas=st.lists(st.floats(-4, 4), min_size=1, max_size=1) | st.just(None),
    temperature=st.floats(0.1, 10),
    seed=st.integers(0, 99),
    low_rank=st.booleans(),
)
def test_eigenbasis_cache_scores_any_prior_like_the_plain_cache(
    log_deltas, temperature, seed, low_rank
):
    la, batch = _fitted(**({"factor_rank": 2, "rank_threshold": 4} if low_rank else {}))
    L = len(la.params)
    g = torch.Generator().manual_seed(seed)
    la.prior_precision = (
        10 ** torch.empty(L, dtype=la._dtype).uniform_(-4, 4, generator=g)
        if log_deltas is None
        else 10.0 ** log_deltas[0]
    )
    la.temperature = temperature
    plain = LogitJacobianCache(la, loader(batch, 4))
    rotated = LogitJacobianCache(la, loader(batch, 4), in_eigenbasis=True)
    assert rotated._basis is la.H
    spans = [Q.shape[0] == Q.shape[1] for Qs in la.H.eigenvectors for Q in Qs]
    assert all(spans) != low_rank  # low-rank factors: the complement columns are exercised
    torch.testing.assert_close(_variances(rotated, la), _variances(plain, la), rtol=1e-9, atol=0)
    keep = {0, L - 1}
    draws = [
        c.probs(la, "mc", 20, torch.Generator().manual_seed(1), keep) for c in (plain, rotated)
    ]
    torch.testing.assert_close(draws[0], draws[1], rtol=1e-9, atol=1e-12)
    moved = rotated.with_logits(rotated.logits + 1.0)
    torch.testing.assert_close(
        moved.probs(la, "probit"), plain.with_logits(moved.logits).probs(la, "probit")
    )


@pytest.mark.parametrize(
    "structure, kwargs",
    [
        ("kron", {"damping": True}),
        ("diag", {}),
        ("full", {}),
    ],
)
def test_eigenbasis_is_skipped_where_the_prior_does_not_commute(structure, kwargs):
    la, batch = _fitted(structure, **kwargs)
    rotated = LogitJacobianCache(la, loader(batch, 3), in_eigenbasis=True)
    assert rotated._basis is None
    plain = LogitJacobianCache(la, loader(batch, 3))
    torch.testing.assert_close(rotated.probs(la, "probit"), plain.probs(la, "probit"))


def test_eigenbasis_cache_refuses_another_curvature():
    la, batch = _fitted()
    rotated = LogitJacobianCache(la, loader(batch, 3), in_eigenbasis=True)
    la.fit(loader(batch, 2))  # a refit: new eigenvectors
    with pytest.raises(ValueError, match="another posterior's eigenbasis"):
        rotated.probs(la, "probit")


@pytest.mark.parametrize("kwargs", [{}, {"factor_rank": 2, "rank_threshold": 4}])
def test_eigenbasis_variance_matches_a_dense_inverse_and_explicit_jacobians(kwargs):
    """Brute force: Σ = (s H + δ)⁻¹ as a dense matrix from the curvature's own factors
    (``Q diag(λ) Qᵀ`` each, low-rank ones zero off their span), J by autograd per entry."""
    from laplace_lora_ext.testing.reference import explicit_jacobians, rel

    la, batch = _fitted(**kwargs)
    L = len(la.params)
    la.prior_precision = torch.logspace(-1, 1, L, dtype=la._dtype)
    la.temperature = 0.7
    blocks = []
    eigen = zip(la.H.eigenvectors, la.H.eigenvalues, la.prior_precision, strict=True)
    for Qs, ls, delta in eigen:
        factors = [Q @ torch.diag(lam) @ Q.T for Q, lam in zip(Qs, ls, strict=True)]
        H = factors[0] if len(factors) == 1 else torch.kron(factors[0], factors[1])
        blocks.append(la._H_factor * H + delta * torch.eye(len(H), dtype=H.dtype))
    Sigma = torch.linalg.inv(torch.block_diag(*blocks))
    x = {k: v for k, v in batch.items() if k != "labels"}
    _, J = explicit_jacobians(la.model, x, la.params)
    expected = J @ Sigma @ J.mT
    got = _variances(LogitJacobianCache(la, loader(batch, 4), in_eigenbasis=True), la)
    assert rel(got, expected) < 1e-9


def test_an_empty_loader_names_itself_when_its_logits_or_labels_are_read():
    cache = LogitJacobianCache(_fitted()[0], [])
    assert len(cache) == 0
    for read in (lambda: cache.logits, lambda: cache.labels):
        with pytest.raises(ValueError, match="yielded no batches"):
            read()
