"""Deferred sums of :class:`LowRankFactor`: batch roots are summed exactly and compressed
once per buffer (or when read), never changing the represented matrix when the rank
suffices; with truncation, one compression gives the best rank-k of the whole sum."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laplace_lora_ext.lowrank import LowRankFactor
from laplace_lora_ext.lowrank.factor import CUDA_MERGE_COLUMNS, buffer_columns, merge_columns
from tests.models import loader, lora_laplace, random_batch, tiny_llama

DT = torch.float64
SETTINGS = settings(max_examples=20, deadline=None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def low_rank_root(basis: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    """``(d, m)`` root in the span of ``basis`` ``(d, r)``."""
    return basis @ torch.randn(basis.shape[1], m, generator=g, dtype=DT)


@SETTINGS
@given(
    st.sampled_from([5, 40, 300]),  # 5, 40: Gram path; 300 > buffer + k: QR path
    st.lists(st.integers(0, 200), min_size=1, max_size=6),
    st.integers(0, 2**31 - 1),
)
def test_deferred_sum_equals_dense_sum_when_rank_suffices(d, cols, seed):
    g = torch.Generator().manual_seed(seed)
    true_rank = min(d, 6)
    k = true_rank + seed % 3
    basis = torch.randn(d, true_rank, generator=g, dtype=DT)  # all roots share one span
    F = LowRankFactor.zeros(d, k, dtype=DT)
    dense = torch.zeros(d, d, dtype=DT)
    for m in cols:
        R = low_rank_root(basis, m, g)
        F = F + LowRankFactor.deferred(R, k)
        dense += R @ R.T
        assert F.pending_columns <= buffer_columns(k) or F._gram is not None
    if dense.norm() == 0:
        assert float(F.to_dense().norm()) == 0
        return
    assert rel(F.to_dense(), dense) < 1e-10
    assert F.rank <= k and F.pending_columns == 0
    assert rel(F.U.T @ F.U, torch.eye(F.rank, dtype=DT)) < 1e-10 if F.rank else True


@SETTINGS
@given(st.lists(st.integers(1, 60), min_size=2, max_size=4), st.integers(0, 2**31 - 1))
def test_one_deferred_compression_is_the_best_rank_k_of_the_sum(cols, seed):
    """Total columns within one buffer: the factor is truncated once, at the first read, so
    it is the Eckart-Young best rank-k approximation of the exact sum."""
    g = torch.Generator().manual_seed(seed)
    d, k = 300, 1 + seed % 5
    roots = [torch.randn(d, m, generator=g, dtype=DT) for m in cols]
    F = LowRankFactor.deferred(roots[0], k)
    for R in roots[1:]:
        F = F + LowRankFactor.deferred(R, k) * 1.0
    assert F.pending_columns == sum(cols)  # nothing compressed yet
    full = torch.cat(roots, dim=1)
    L = torch.linalg.eigvalsh(full @ full.T).flip(0)
    assert F.rank == min(k, sum(cols))
    err2 = float((F.to_dense() - full @ full.T).square().sum())
    assert abs(err2 - float(L[k:].square().sum())) <= 1e-9 * float(L.square().sum())


def test_scaling_and_dense_add_commute_with_deferral():
    g = torch.Generator().manual_seed(0)
    d, k = 300, 8
    basis = torch.randn(d, 3, generator=g, dtype=DT)
    R1, R2, M = low_rank_root(basis, 5, g), low_rank_root(basis, 4, g), low_rank_root(basis, 2, g)
    F = (LowRankFactor.deferred(R1, k) + LowRankFactor.deferred(R2, k)) * 0.3 + M @ M.T
    expected = 0.3 * (R1 @ R1.T + R2 @ R2.T) + M @ M.T
    assert rel(F.to_dense(), expected) < 1e-10
    # finiteness checks read the stored tensors without compressing
    G = LowRankFactor.deferred(R1, k)
    assert len(G.stored_tensors()) == 3 and G.pending_columns == 5
    assert "pending=5" in repr(G) and G.pending_columns == 5


def test_fit_compresses_each_factor_once(monkeypatch):
    """Low-rank fit on 3 batches: one compression per low-rank factor (at the end), not two
    per batch; and the result equals the dense fit (ranks suffice)."""
    calls = {"n": 0}
    original = LowRankFactor.compress

    def counting(self):
        calls["n"] += self.pending_columns > 0
        return original(self)

    monkeypatch.setattr(LowRankFactor, "compress", counting)
    model = tiny_llama(lm_head=True)
    batch = random_batch(9, 6, 3, "left")
    low = lora_laplace(model, factor_rank=64, rank_threshold=4)
    low.fit(loader(batch, 3))
    dense = lora_laplace(model, factor_rank=None)
    dense.fit(loader(batch, 3))
    n_low = sum(isinstance(f, LowRankFactor) for F in low.H_facs.kfacs for f in F)
    assert n_low >= 8
    assert calls["n"] == n_low  # each factor's 3 batches compressed together, once
    assert rel(low.H_facs.to_matrix(), dense.H_facs.to_matrix()) < 1e-10


@SETTINGS
@given(st.integers(1, 700), st.integers(0, 2**31 - 1))
def test_from_root_chunk_size_keeps_the_represented_matrix(chunk, seed):
    """Any merge chunk (the GPU's larger one included) gives ``R Rᵀ`` exactly when the
    rank suffices."""
    g = torch.Generator().manual_seed(seed)
    d, m, r = 300, 650, 5
    R = low_rank_root(torch.randn(d, r, generator=g, dtype=DT), m, g)
    F = LowRankFactor.from_root(R, r + 2, chunk=chunk)
    assert rel(F.to_dense(), R @ R.T) < 1e-10


def test_merge_columns_is_larger_on_cuda_only():
    assert merge_columns(256, "cpu") == buffer_columns(256) == 512
    assert merge_columns(256, "cuda") == CUDA_MERGE_COLUMNS >= 2048
    assert merge_columns(2000, "cuda") == buffer_columns(2000)
