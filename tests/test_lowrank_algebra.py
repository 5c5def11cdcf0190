"""Property tests: ``LowRankKron`` / ``LowRankKronDecomposed`` equal laplace-torch's dense
``Kron`` / ``KronDecomposed`` of the same (represented) factors."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from laplace.utils.matrix import Kron, KronDecomposed

from laplace_lora_ext.lowrank import LowRankFactor, LowRankKron, LowRankKronDecomposed
from laplace_lora_ext.lowrank.kron import kron_from_dense, to_dense_kron

DT = torch.float64
RTOL = 1e-8
SETTINGS = settings(max_examples=25, deadline=None)


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, what: str = "") -> None:
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).norm().item()
    assert err <= rtol * b.norm().item() + 1e-12, (what, err, b.norm().item())


# ---------------------------------------------------------------------- strategies
@dataclass
class Side:
    d: int  # side of the factor
    r: int  # true rank
    m: int  # number of root columns (>= r)
    lowrank: bool
    k: int  # max_rank of the low-rank representation


@st.composite
def structures(draw, enough_rank: bool = True) -> tuple[list[list[Side]], int]:
    """Random blocks ``[G, A]`` / ``[M]`` with random sides, ranks and representations."""
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        sides = []
        for _ in range(draw(st.sampled_from([1, 2]))):
            d = draw(st.integers(1, 12))
            if enough_rank:
                r = draw(st.integers(0, d))
                m = draw(st.integers(r, r + 3))
                k = draw(st.integers(r, m + 2))
                lowrank = draw(st.booleans())
            else:
                r = draw(st.integers(1, d))
                m = r
                k = draw(st.integers(0, r - 1))
                lowrank = True
            sides.append(Side(d, r, m, lowrank, k))
        blocks.append(sides)
    return blocks, draw(st.integers(0, 2**31 - 1))


def make_root(side: Side, g: torch.Generator) -> torch.Tensor:
    """``(d, m)`` root of exact rank ``r``."""
    B = torch.randn(side.d, side.r, generator=g, dtype=DT)
    C = torch.randn(side.r, side.m, generator=g, dtype=DT)
    return B @ C / max(side.m, 1) ** 0.5


def build(structure: list[list[Side]], seed: int) -> tuple[Kron, LowRankKron]:
    """The dense ``Kron`` of the true factors and its low-rank representation."""
    g = torch.Generator().manual_seed(seed)
    dense, lowrank = [], []
    for sides in structure:
        Fd, Fl = [], []
        for side in sides:
            R = make_root(side, g)
            Fd.append(R @ R.T)
            Fl.append(LowRankFactor.from_root(R, side.k) if side.lowrank else R @ R.T)
        dense.append(Fd)
        lowrank.append(Fl)
    return Kron(dense), LowRankKron(lowrank)


def n_params(kron: Kron) -> int:
    total = 0
    for F in kron.kfacs:
        p = 1
        for H in F:
            p *= len(H)
        total += p
    return total


prior_kinds = st.sampled_from(["scalar", "one", "per_layer", "float"])


def make_deltas(kind: str, n: int, g: torch.Generator) -> torch.Tensor | float:
    vals = 0.05 + 5 * torch.rand(n, generator=g, dtype=DT)
    if kind == "scalar":
        return vals[0].reshape(())
    if kind == "one":
        return vals[:1]
    if kind == "float":
        return float(vals[0])
    return vals


def reference(dense: Kron, c: float, deltas, damping: bool) -> KronDecomposed:
    """laplace's ``H * c + deltas`` (built by hand: laplace's ``__add__`` drops damping)."""
    kd = dense.decompose() * c
    deltas = torch.zeros(len(kd), dtype=DT) + torch.as_tensor(deltas, dtype=DT)
    return KronDecomposed(kd.eigenvectors, kd.eigenvalues, deltas=deltas, damping=damping)


def compare_decomposed(ours: LowRankKronDecomposed, ref: KronDecomposed, P: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    assert_close(ours.logdet(), ref.logdet(), what="logdet")
    W = torch.randn(2, 3, P, generator=g, dtype=DT)
    for e in (1, -1, -0.5, 0.5, 0.3):
        assert_close(ours.bmm(W, exponent=e), ref.bmm(W, exponent=e), what=f"bmm {e}")
    assert_close(ours.inv_square_form(W), ref.inv_square_form(W), what="inv_square_form")
    for e in (1, -1, -0.5):
        assert_close(ours.diag(e), ref.diag(e), what=f"diag {e}")
        assert_close(ours.to_matrix(e), ref.to_matrix(e), what=f"to_matrix {e}")
    # laplace's 1-D / 2-D input conventions
    w = W[0, 0]
    assert_close(ours.bmm(w, exponent=-1), ref.bmm(w, exponent=-1), what="bmm 1-D")
    assert_close(ours.bmm(W[:, 0], exponent=-1), ref.bmm(W[:, 0], exponent=-1), what="bmm 2-D")


# ---------------------------------------------------------------------- decomposed vs laplace
@SETTINGS
@given(
    structures(enough_rank=True),
    prior_kinds,
    st.floats(0.1, 3.0),
    st.booleans(),
)
def test_decomposed_matches_laplace_when_rank_suffices(case, prior_kind, c, damping):
    structure, seed = case
    dense, lrk = build(structure, seed)
    deltas = make_deltas(prior_kind, len(dense), torch.Generator().manual_seed(seed))
    ours = lrk.decompose(damping=damping) * c + deltas
    assert type(ours) is LowRankKronDecomposed and ours.damping is damping
    assert isinstance(ours, KronDecomposed)
    compare_decomposed(ours, reference(dense, c, deltas, damping), n_params(dense), seed)


@SETTINGS
@given(structures(enough_rank=False), prior_kinds, st.booleans())
def test_truncated_factors_exact_for_represented_matrix(case, prior_kind, damping):
    """With k < true rank every operation is exact for the rank-k factors themselves."""
    structure, seed = case
    _, lrk = build(structure, seed)
    deltas = make_deltas(prior_kind, len(lrk), torch.Generator().manual_seed(seed))
    ours = lrk.decompose(damping=damping) + deltas
    ref = reference(to_dense_kron(lrk), 1.0, deltas, damping)
    compare_decomposed(ours, ref, n_params(lrk), seed)


@SETTINGS
@given(structures(enough_rank=True), st.floats(0.1, 3.0))
def test_kron_ops_match_laplace(case, c):
    structure, seed = case
    dense, lrk = build(structure, seed)
    P = n_params(dense)
    W = torch.randn(2, 3, P, generator=torch.Generator().manual_seed(seed), dtype=DT)
    for ours, ref in ((lrk, dense), (lrk * c, dense * c), (c * lrk, c * dense)):
        assert isinstance(ours, LowRankKron)
        assert_close(ours.bmm(W), ref.bmm(W), what="bmm")
        assert_close(ours.bmm(W[0, 0]), ref.bmm(W[0, 0]), what="bmm 1-D")
        assert_close(ours.diag(), ref.diag(), what="diag")
        assert_close(ours.to_matrix(), ref.to_matrix(), what="to_matrix")
    assert_close((lrk + lrk).to_matrix(), (dense + dense).to_matrix(), what="add")
    with pytest.raises(ValueError):
        lrk.bmm(W, exponent=-1)


@SETTINGS
@given(structures(enough_rank=True), st.booleans())
def test_inverse_square_root(case, damping):
    """``(P^-½)ᵀ P^-½ = P⁻¹`` and ``P^½ P^½ = P``, densely and through ``bmm``."""
    structure, seed = case
    _, lrk = build(structure, seed)
    P = lrk.decompose(damping=damping) + torch.tensor(0.7, dtype=DT)
    S = P.to_matrix(-0.5)
    assert_close(S.T @ S, P.to_matrix(-1), what="dense")
    eye = torch.eye(n_params(lrk), dtype=DT).unsqueeze(0)
    Sb = P.bmm(eye, exponent=-0.5)[0]
    assert_close(Sb.T @ Sb, P.bmm(eye, exponent=-1)[0], what="bmm -0.5")
    Rb = P.bmm(eye, exponent=0.5)[0]
    assert_close(Rb @ Rb, P.to_matrix(1), what="bmm 0.5")
    assert_close(P.bmm(P.bmm(eye, exponent=-1), exponent=1), eye, what="P P^-1")


def test_kron_logdet_full_rank_matches_laplace():
    g = torch.Generator().manual_seed(0)
    roots = [torch.randn(d, d + 2, generator=g, dtype=DT) for d in (3, 5, 4)]
    dense = Kron([[roots[0] @ roots[0].T, roots[1] @ roots[1].T], [roots[2] @ roots[2].T]])
    lrk = kron_from_dense(dense, factor_rank=5, threshold=3)
    assert isinstance(lrk.kfacs[0][1], LowRankFactor) and isinstance(lrk.kfacs[1][0], LowRankFactor)
    assert_close(lrk.logdet(), dense.logdet())
    deficient = kron_from_dense(dense, factor_rank=2, threshold=3)
    assert deficient.logdet().item() == float("-inf")


def test_diagonal_dense_factors_like_laplace():
    """laplace allows (d,) diagonal Kronecker factors; mixed with low-rank ones."""
    g = torch.Generator().manual_seed(1)
    R = torch.randn(6, 2, generator=g, dtype=DT)
    v = torch.rand(4, generator=g, dtype=DT) + 0.1
    lrk = LowRankKron([[LowRankFactor.from_root(R, 3), v], [v]])
    dense = Kron([[R @ R.T, v], [v]])
    W = torch.randn(1, 2, 28, generator=g, dtype=DT)
    assert_close(lrk.bmm(W), dense.bmm(W))
    assert_close(lrk.diag(), dense.diag())
    ours = lrk.decompose() + torch.tensor(0.3, dtype=DT)
    ref = dense.decompose() + torch.tensor(0.3, dtype=DT)
    compare_decomposed(ours, ref, 28, 1)
    total = lrk + Kron([[R @ R.T, torch.diag(v)], [v]])
    assert_close(total.to_matrix(), Kron([[2 * R @ R.T, 2 * v], [2 * v]]).to_matrix())


# ---------------------------------------------------------------------- LowRankFactor
@SETTINGS
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 15), st.integers(0, 2**31 - 1))
def test_from_root_is_best_rank_k(d, r, m, seed):
    """``from_root`` keeps the top-k eigenpairs of ``R Rᵀ`` (Eckart–Young)."""
    r, m = min(r, d, m), max(m, min(r, d))
    k_max = min(d, m)
    k = seed % (k_max + 1)
    g = torch.Generator().manual_seed(seed)
    R = make_root(Side(d, r, m, True, k), g)
    F = LowRankFactor.from_root(R, k)
    L = torch.linalg.eigvalsh(R @ R.T).flip(0)  # descending
    assert F.U.shape == (d, k) and F.s.shape == (k,) and F.rank == k
    assert_close(F.U.T @ F.U, torch.eye(k, dtype=DT), what="orthonormal")
    assert_close(F.s, L[:k], rtol=1e-10, what="eigenvalues")
    err2 = (R @ R.T - F.to_dense()).square().sum()
    assert abs(err2 - L[k:].square().sum()) <= 1e-9 * L.square().sum() + 1e-20
    assert_close(F.diagonal(), F.to_dense().diagonal(), what="diagonal")
    assert_close(F.trace(), L[:k].sum(), what="trace")


@SETTINGS
@given(
    st.integers(1, 12),
    st.lists(st.integers(0, 4), min_size=1, max_size=4),
    st.integers(0, 3),
    st.integers(0, 2**31 - 1),
)
def test_incremental_batches_equal_one_shot_sum(d, batch_cols, extra_rank, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(sum(batch_cols), d) + extra_rank
    F = LowRankFactor.zeros(d, k, dtype=DT)
    total = torch.zeros(d, d, dtype=DT)
    for m in batch_cols:
        R = torch.randn(d, m, generator=g, dtype=DT)
        F = F + LowRankFactor.from_root(R, k)
        total += R @ R.T
        assert F.rank <= k and F.max_rank == k
    assert_close(F.to_dense(), total, what="factor sum")


def _batch_factors(params, m: int, k: int, threshold: int, g: torch.Generator):
    """One batch's random factors ``R Rᵀ`` (roots ``(side, m)``) per parameter: as used in
    a fit (low-rank above ``threshold``, rank ``k``) and dense."""
    kfacs, dkfacs = [], []
    for p in params:
        sides = [p.shape[0]] if p.ndim == 1 else list(p.shape)
        roots = [torch.randn(s, m, generator=g, dtype=DT) for s in sides]
        kfacs.append(
            [LowRankFactor.from_root(R, k) if len(R) > threshold else R @ R.T for R in roots]
        )
        dkfacs.append([R @ R.T for R in roots])
    return kfacs, dkfacs


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(1, 10), st.integers(1, 10), st.booleans()), min_size=1, max_size=3
    ),
    st.integers(1, 3),
    st.integers(0, 8),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_fit_loop_accumulation(layers, n_batches, threshold, plain_init, seed):
    """``H += H_batch`` from zero-init factors (LowRankKron or plain Kron) equals the dense
    sum when ``factor_rank`` >= total rank."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for d_out, d_in, bias in layers:
        params.append(torch.empty(d_out, d_in))
        if bias:
            params.append(torch.empty(d_out))
    m = 2
    k = m * n_batches
    if plain_init:
        H = Kron.init_from_model(params, "cpu", DT)
    else:
        H = LowRankKron.init_from_model(params, "cpu", DT, factor_rank=k, threshold=threshold)
    dense = Kron.init_from_model(params, "cpu", DT)
    for _ in range(n_batches):
        kfacs, dkfacs = _batch_factors(params, m, k, threshold, g)
        H += LowRankKron(kfacs)
        dense += Kron(dkfacs)
    assert type(H) is LowRankKron
    for Fo, Fd in zip(to_dense_kron(H).kfacs, dense.kfacs, strict=True):
        for a, b in zip(Fo, Fd, strict=True):
            assert_close(a, b, what="accumulated factor")
    # laplace's KronLaplace._rescale_factors multiplies the second factor in place
    for kron in (H, dense):
        for F in kron.kfacs:
            if len(F) == 2:
                F[1] *= 0.5
    assert_close(H.to_matrix(), dense.to_matrix(), what="rescaled")


def test_init_from_model_mirrors_kron():
    params = [torch.empty(5, 3), torch.empty(5), torch.empty(2, 3, 2, 2)]
    ref = Kron.init_from_model(params, "cpu", DT)
    dense = LowRankKron.init_from_model(params, "cpu", DT)
    lr = LowRankKron.init_from_model(params, "cpu", DT, factor_rank=2, threshold=4)
    for Fr, Fd, Fl in zip(ref.kfacs, dense.kfacs, lr.kfacs, strict=True):
        assert [H.shape for H in Fr] == [H.shape for H in Fd] == [H.shape for H in Fl]
        for H in Fl:
            assert isinstance(H, LowRankFactor) == (len(H) > 4)
            if isinstance(H, LowRankFactor):
                assert H.rank == 0 and H.max_rank == 2 and H.dtype == DT


def test_factor_add_with_zero_and_dense():
    g = torch.Generator().manual_seed(2)
    R = torch.randn(7, 3, generator=g, dtype=DT)
    F = LowRankFactor.from_root(R, 4)
    for zero in (0, torch.zeros(7, 7, dtype=DT), LowRankFactor.zeros(7, 2, dtype=DT)):
        for out in (F + zero, zero + F):
            assert isinstance(out, LowRankFactor) and out.max_rank == 4
            assert_close(out.to_dense(), R @ R.T)
    S = torch.randn(7, 1, generator=g, dtype=DT)
    assert_close((F + S @ S.T).to_dense(), R @ R.T + S @ S.T)
    assert_close((2.5 * F).to_dense(), 2.5 * R @ R.T)
    X = torch.randn(3, 7, 2, generator=g, dtype=DT)
    assert_close(F @ X, R @ R.T @ X)
    assert_close(X.mT @ F, X.mT @ R @ R.T)
    assert len(F) == 7 and F.ndim == 2 and F.shape == (7, 7)
    lam, U = F.eigh()
    assert_close((U * lam) @ U.T, R @ R.T)
    with pytest.raises(ValueError):
        F + LowRankFactor.zeros(6, 2, dtype=DT)
    with pytest.raises(ValueError):
        F + torch.ones(6, 6, dtype=DT)
    with pytest.raises(ValueError):
        F * -1.0


def test_dtype_handling():
    g = torch.Generator().manual_seed(3)
    R = torch.randn(50, 4, generator=g, dtype=torch.float32)
    F16 = LowRankFactor.from_root(R.to(torch.bfloat16), 3)
    assert F16.dtype == torch.float32
    assert_close(F16.U.T @ F16.U, torch.eye(3, dtype=torch.float32), rtol=1e-5)
    assert LowRankFactor.from_root(R[:6], 3).dtype == torch.float32
    assert LowRankFactor.from_root(R.to(torch.float16), 3, dtype=torch.bfloat16).dtype == (
        torch.bfloat16
    )
    assert LowRankFactor.from_root(R.double(), 3).dtype == DT
    # float32 low-rank factor in a float64 Kron / with float64 vectors
    lrk = LowRankKron([[LowRankFactor.from_root(R[:6], 3), torch.eye(2, dtype=DT)]])
    W = torch.randn(1, 1, 12, dtype=DT)
    assert lrk.bmm(W).dtype == DT
    kd = lrk.decompose() + torch.tensor(1.0, dtype=DT)
    assert kd.bmm(W, exponent=-1).dtype == DT
    assert torch.isfinite(kd.logdet())
    for damping in (False, True):
        kd = lrk.decompose(damping=damping) + torch.tensor(1.0, dtype=DT)
        assert kd.diag(-1).dtype == DT and kd.to_matrix(-1).dtype == DT
        assert_close(kd.diag(-1), kd.to_matrix(-1).diagonal(), rtol=1e-6)
        assert_close(kd.bmm(W, -1)[0, 0], kd.to_matrix(-1) @ W[0, 0], rtol=1e-6)


def test_state_round_trip():
    g = torch.Generator().manual_seed(4)
    R = torch.randn(9, 3, generator=g, dtype=DT)
    F = LowRankFactor.from_root(R, 2)
    lrk = LowRankKron([[F, R[:4] @ R[:4].T], [F]])
    kd = lrk.decompose(damping=True) + torch.tensor([0.5, 2.0], dtype=DT)
    buf = io.BytesIO()
    torch.save({"F": F, "H": lrk, "kd": kd, "state": F.state()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_close(loaded["F"].to_dense(), F.to_dense())
    assert loaded["F"].max_rank == 2
    assert_close(loaded["H"].to_matrix(), lrk.to_matrix())
    assert loaded["kd"].damping and type(loaded["kd"]) is LowRankKronDecomposed
    assert_close(loaded["kd"].to_matrix(-1), kd.to_matrix(-1))
    buf = io.BytesIO()
    torch.save(F.state(), buf)
    buf.seek(0)
    F2 = LowRankFactor.from_state(torch.load(buf, weights_only=True))
    assert_close(F2.to_dense(), F.to_dense())


def test_mismatched_structures_raise():
    a = LowRankKron([[torch.eye(3), LowRankFactor.zeros(4, 2)], [torch.eye(3)]])
    bad = [
        Kron([[torch.eye(3), torch.eye(4)]]),  # fewer blocks
        Kron([[torch.eye(3), torch.eye(4)], [torch.eye(3), torch.eye(2)]]),  # factor count
        Kron([[torch.eye(3), torch.eye(5)], [torch.eye(3)]]),  # side
        LowRankKron([[torch.eye(2), LowRankFactor.zeros(4, 2)], [torch.eye(3)]]),
    ]
    for b in bad:
        with pytest.raises(ValueError):
            a + b
        with pytest.raises(ValueError):
            b + a
    with pytest.raises(ValueError):
        a + torch.eye(3)


def test_types_and_flags():
    a = LowRankKron([[torch.eye(3), LowRankFactor.zeros(4, 2)]])
    assert isinstance(a, Kron)
    plain = Kron([[torch.eye(3), torch.zeros(4, 4)]])
    assert type(plain + a) is LowRankKron and type(a + plain) is LowRankKron
    kd = a.decompose(damping=True)
    assert isinstance(kd, KronDecomposed) and kd.damping
    kd2 = 2.0 * (kd * 3.0) + torch.tensor([0.1])
    assert type(kd2) is LowRankKronDecomposed and kd2.damping and kd2.deltas.shape == (1,)
    with pytest.raises(ValueError):
        kd + torch.ones(2, 2)


def test_tensor_scalar_keeps_graph():
    R = torch.randn(5, 2, dtype=DT)
    kd = LowRankKron([[LowRankFactor.from_root(R, 2), torch.eye(3, dtype=DT)]]).decompose()
    c = torch.tensor(2.0, dtype=DT, requires_grad=True)
    delta = torch.tensor([0.5], dtype=DT, requires_grad=True)
    (kd * c + delta).logdet().backward()
    assert c.grad is not None and delta.grad is not None


def test_huge_side_never_forms_dense():
    """d = 200_000: a d x d float64 matrix would need 320 GB."""
    d, m = 200_000, 8
    g = torch.Generator().manual_seed(5)
    t0 = time.perf_counter()
    R = torch.randn(d, m, generator=g, dtype=DT)
    F = LowRankFactor.from_root(R, 4) + LowRankFactor.from_root(R[:, :3], 4)
    assert F.U.shape == (d, 4) and F.diagonal().shape == (d,)
    assert F.trace() > 0
    kd = LowRankKron([[F, torch.eye(2, dtype=DT)], [F]]).decompose() + torch.tensor(0.5, dtype=DT)
    w = torch.randn(3 * d, generator=g, dtype=DT)
    x = kd.bmm(w, exponent=-1)
    assert_close(kd.bmm(x, exponent=1), w, rtol=1e-10)
    assert torch.isfinite(kd.logdet()) and kd.diag(-1).shape == (3 * d,)
    assert time.perf_counter() - t0 < 20


def test_from_root_with_many_rows_is_chunked_and_exact_at_full_rank():
    """A batch with more rows than the side (tokens x outputs > d) never forms d x d."""
    from torch.utils._python_dispatch import TorchDispatchMode

    d, true_rank, m = 1500, 10, 4000
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(d, true_rank, generator=gen, dtype=torch.float64)
    R = A @ torch.randn(true_rank, m, generator=gen, dtype=torch.float64)
    shapes: list[tuple[int, ...]] = []

    class RecordShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    with RecordShapes():
        f = LowRankFactor.from_root(R, 16)
    assert max(sum(s >= d for s in shape) for shape in shapes) <= 1  # nothing d x d
    M = R @ R.T
    assert float((f.to_dense() - M).norm() / M.norm()) < 1e-10
