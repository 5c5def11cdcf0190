"""Drop-in ``Kron`` / ``KronDecomposed`` whose factors may be :class:`LowRankFactor`.

``LowRankKron.kfacs[i]`` is ``[G (d_out, d_out), A (d_in, d_in)]`` for a weight (parameter
vector ``W.flatten()``, row-major, so the block is ``G ⊗ A``) or ``[M]`` for a 1-D parameter.
Each factor is a dense tensor (``(d, d)``, or a ``(d,)`` diagonal like laplace allows) or a
:class:`LowRankFactor`. Every operation is exact for the represented matrices, where a
low-rank factor is zero on the complement of its column space.

Decomposed, each factor is ``(Q (d, k), λ (k,))`` with orthonormal ``Q``; a dense factor is the
special case ``k = d``. For a 2-factor block and prior ``δ`` the posterior precision is

* ``damping=False``: ``P = G ⊗ A + δ I``; eigenvalues ``λ_G,i λ_A,j + δ`` on
  ``span(Q_G ⊗ Q_A)`` and ``δ`` on its complement (``d_out d_in - k_G k_A`` of them);
* ``damping=True``: ``P = (G + √δ I) ⊗ (A + √δ I)``; each factor has eigenvalues ``λ + √δ``
  on ``span(Q)`` and ``√δ`` on its complement (exact for low-rank factors too).

A 1-factor block is ``M + δ I`` in both cases (as in laplace). Powers use
``P^e W = Q (f(λ) - δ^e) Qᵀ W + δ^e W``, costing ``O(p k)`` per block instead of ``O(p d)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Number
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..compat import Kron, KronDecomposed, block_diag, kron, symeig
from ..compat import is_valid_scalar as _is_valid_scalar
from .auto import DEFAULT_RANK_THRESHOLD
from .factor import LowRankFactor

__all__ = [
    "LowRankKron",
    "LowRankKronDecomposed",
    "to_dense_kron",
    "kron_from_dense",
]

Factor = Tensor | LowRankFactor


# ---------------------------------------------------------------------- factor helpers
def _scalar_root(scalar: float | Tensor, n: int) -> float | Tensor:
    """``scalar ** (1/n)``; keeps tensors (and their graph) as tensors."""
    if n == 1:
        return scalar.reshape(()) if isinstance(scalar, Tensor) else scalar
    if isinstance(scalar, Tensor):
        return scalar.reshape(()) ** (1.0 / n)
    return math.pow(scalar, 1.0 / n)


def _as_2d(F: Tensor) -> Tensor:
    return torch.diag(F) if F.ndim == 1 else F


def _add_factor(a: Factor, b: Factor, where: str) -> Factor:
    if len(a) != len(b):
        raise ValueError(f"Kronecker factor sides differ at {where}: {len(a)} vs {len(b)}.")
    if isinstance(a, LowRankFactor):
        return a + b
    if isinstance(b, LowRankFactor):
        return b + a
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        raise ValueError(f"Unsupported Kronecker factor types at {where}.")
    if a.ndim != b.ndim:
        return _as_2d(a) + _as_2d(b)
    return a + b


def _left(F: Factor, X: Tensor) -> Tensor:
    """``F @ X`` for ``X`` ``(..., d, n)``, in the promoted dtype of both."""
    dt = torch.promote_types(F.dtype, X.dtype)
    F, X = F.to(dt), X.to(dt)
    if isinstance(F, LowRankFactor):
        return F @ X
    if F.ndim == 1:
        return F.unsqueeze(-1) * X
    return F @ X


def _factor_diag(F: Factor) -> Tensor:
    if isinstance(F, LowRankFactor):
        return F.diagonal()
    return F if F.ndim == 1 else F.diagonal()


def _factor_dense(F: Factor) -> Tensor:
    if isinstance(F, LowRankFactor):
        return F.to_dense()
    return _as_2d(F)


def _factor_logdet(F: Factor) -> Tensor:
    if isinstance(F, LowRankFactor):
        if F.rank < F.dim:
            return torch.tensor(-math.inf, device=F.device, dtype=F.dtype)
        return F.s.log().sum()
    return F.log().sum() if F.ndim == 1 else F.logdet()


def _factor_eig(F: Factor) -> tuple[Tensor, Tensor]:
    """``(λ (k,), Q (d, k))``."""
    if isinstance(F, LowRankFactor):
        return F.eigh()
    if F.ndim == 1:
        return F, torch.eye(len(F), dtype=F.dtype, device=F.device)
    return symeig(F)


def _check_structure(a: list, b: list) -> None:
    """Raise a ValueError unless two kfac lists have the same blocks, factors and sides."""
    if len(a) != len(b):
        raise ValueError(f"Cannot add Kron with {len(a)} blocks to Kron with {len(b)} blocks.")
    for i, (Fa, Fb) in enumerate(zip(a, b, strict=True)):
        if len(Fa) != len(Fb):
            raise ValueError(
                f"Block {i} has {len(Fa)} factors in one Kron and {len(Fb)} in the other."
            )
        for j, (x, y) in enumerate(zip(Fa, Fb, strict=True)):
            if len(x) != len(y):
                raise ValueError(f"Factor {j} of block {i} has side {len(x)} vs {len(y)}.")


# ---------------------------------------------------------------------- LowRankKron
class LowRankKron(Kron):
    """``Kron`` whose factors are dense tensors or :class:`LowRankFactor` s.

    Args:
        kfacs: per parameter tensor ``[G, A]`` (``G ⊗ A``) or ``[M]``; each factor a dense
            ``(d, d)`` / ``(d,)`` tensor or a ``LowRankFactor`` of side ``d``.
    """

    def __init__(self, kfacs: list[list[Factor]]) -> None:
        super().__init__([list(F) for F in kfacs])

    @classmethod
    def init_from_model(
        cls,
        model: nn.Module | Iterable[nn.Parameter],
        device: torch.device,
        dtype: torch.dtype,
        factor_rank: int | None = None,
        threshold: int = DEFAULT_RANK_THRESHOLD,
    ) -> LowRankKron:
        """Zero factors mirroring ``Kron.init_from_model``: weights ``[G (out×out),
        A (in×in)]`` (conv: ``in = prod(shape[1:])``), 1-D params ``[M]``. When
        ``factor_rank`` is set, sides ``> threshold`` are ``LowRankFactor.zeros``."""
        params = model.parameters() if isinstance(model, nn.Module) else model

        def zeros(side: int) -> Factor:
            if factor_rank is not None and side > threshold:
                return LowRankFactor.zeros(side, factor_rank, device=device, dtype=dtype)
            return torch.zeros(side, side, device=device, dtype=dtype)

        kfacs: list[list[Factor]] = []
        for p in params:
            if p.ndim == 1:
                kfacs.append([zeros(p.size(0))])
            elif 2 <= p.ndim <= 4:
                d_out, d_in = p.shape[0], int(np.prod(p.shape[1:]))
                kfacs.append([zeros(d_out), zeros(d_in)])
            else:
                raise ValueError("Invalid parameter shape in network.")
        return cls(kfacs)

    def __add__(self, other: Kron | int) -> LowRankKron:
        """Factor-wise sum (low-rank sums are re-truncated). ``other`` may be a plain
        ``Kron`` with the same structure; mismatched structures raise ``ValueError``."""
        if isinstance(other, Number) and other == 0:
            return LowRankKron(self.kfacs)
        if not isinstance(other, Kron):
            raise ValueError("Can only add Kron to LowRankKron.")
        _check_structure(self.kfacs, other.kfacs)
        kfacs = [
            [
                _add_factor(a, b, f"block {i}, factor {j}")
                for j, (a, b) in enumerate(zip(Fa, Fb, strict=True))
            ]
            for i, (Fa, Fb) in enumerate(zip(self.kfacs, other.kfacs, strict=True))
        ]
        return LowRankKron(kfacs)

    def __radd__(self, other: Kron | int) -> LowRankKron:
        # Distinct from Kron.__radd__, so Python prefers it for ``Kron + LowRankKron``.
        return self.__add__(other)

    def __mul__(self, scalar: float | Tensor) -> LowRankKron:
        """Multiply by a scalar, ``pow(scalar, 1/len(F))`` per factor (as ``Kron``)."""
        if not _is_valid_scalar(scalar):
            raise ValueError("Input not valid python or torch scalar.")
        return LowRankKron([[_scalar_root(scalar, len(F)) * H for H in F] for F in self.kfacs])

    __rmul__ = __mul__

    def decompose(self, damping: bool = False) -> LowRankKronDecomposed:
        """Eigendecompose every factor (cheap for low-rank ones)."""
        eigvecs, eigvals = [], []
        for F in self.kfacs:
            pairs = [_factor_eig(H) for H in F]
            eigvals.append([lam for lam, _ in pairs])
            eigvecs.append([Q for _, Q in pairs])
        return LowRankKronDecomposed(eigvecs, eigvals, damping=damping)

    def _bmm(self, W: Tensor) -> Tensor:
        assert W.ndim == 3
        B, K, P = W.shape
        W = W.reshape(B * K, P)
        out, cur = [], 0
        for F in self.kfacs:
            if len(F) == 1:
                p = len(F[0])
                out.append(_left(F[0], W[:, cur : cur + p].T).T)
            elif len(F) == 2:
                G, A = F
                p = len(G) * len(A)
                Wp = W[:, cur : cur + p].reshape(B * K, len(G), len(A))
                Y = _left(A, _left(G, Wp).mT).mT
                out.append(Y.reshape(B * K, p))
            else:
                raise AttributeError("Shape mismatch")
            cur += p
        if cur != P:
            raise ValueError(f"W has {P} parameters but the Kron covers {cur}.")
        return _cat(out).reshape(B, K, P)

    def logdet(self) -> Tensor:
        """Log-determinant of the factor products (``-inf`` for a rank-deficient factor)."""
        logdet: Any = 0
        for F in self.kfacs:
            if len(F) == 1:
                logdet = logdet + _factor_logdet(F[0])
            else:
                G, A = F
                logdet = logdet + len(A) * _factor_logdet(G) + len(G) * _factor_logdet(A)
        return logdet

    def diag(self) -> Tensor:
        diags = []
        for F in self.kfacs:
            d0 = _factor_diag(F[0])
            diags.append(d0 if len(F) == 1 else torch.outer(d0, _factor_diag(F[1])).flatten())
        return _cat(diags)

    def to_matrix(self) -> Tensor:
        """Dense block-diagonal matrix (tests / small models only)."""
        blocks = []
        for F in self.kfacs:
            D0 = _factor_dense(F[0])
            blocks.append(D0 if len(F) == 1 else kron(D0, _factor_dense(F[1])))
        return block_diag(blocks)

    def to(self, *args: Any, **kwargs: Any) -> LowRankKron:
        return LowRankKron([[H.to(*args, **kwargs) for H in F] for F in self.kfacs])

    def detach(self) -> LowRankKron:
        return LowRankKron([[H.detach() for H in F] for F in self.kfacs])


def _cat(parts: list[Tensor]) -> Tensor:
    dtype = parts[0].dtype
    for x in parts[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return torch.cat([x.to(dtype) for x in parts], dim=-1 if parts[0].ndim == 1 else 1)


# ---------------------------------------------------------------------- decomposed helpers
def _unify(Qs: list[Tensor], ls: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Cast the eigenpairs of one block to their common (promoted) dtype."""
    dt = Qs[0].dtype
    for x in [*Qs, *ls]:
        dt = torch.promote_types(dt, x.dtype)
    return [Q.to(dt) for Q in Qs], [lam.to(dt) for lam in ls]


def _pow_left(Q: Tensor, lam: Tensor, shift: Tensor, e: float, X: Tensor) -> Tensor:
    """``(Q diag(λ) Qᵀ + shift I)^e @ X`` for ``X`` ``(..., d, n)``."""
    dt = torch.promote_types(Q.dtype, X.dtype)
    Q, lam, X = Q.to(dt), lam.to(dt), X.to(dt)
    d, k = Q.shape
    f = (lam + shift).pow(e)
    if k < d:
        c = shift.pow(e)
        return Q @ ((f - c).unsqueeze(-1) * (Q.T @ X)) + c * X
    return Q @ (f.unsqueeze(-1) * (Q.T @ X))


def _pow_diag(Q: Tensor, lam: Tensor, shift: Tensor, e: float) -> Tensor:
    """Diagonal of ``(Q diag(λ) Qᵀ + shift I)^e``."""
    d, k = Q.shape
    f = (lam + shift).pow(e)
    if k < d:
        c = shift.pow(e)
        return Q.square() @ (f - c) + c
    return Q.square() @ f


def _pow_dense(Q: Tensor, lam: Tensor, shift: Tensor, e: float) -> Tensor:
    d, k = Q.shape
    f = (lam + shift).pow(e)
    if k < d:
        c = shift.pow(e)
        return (Q * (f - c)) @ Q.T + c * torch.eye(d, dtype=Q.dtype, device=Q.device)
    return (Q * f) @ Q.T


# ---------------------------------------------------------------------- LowRankKronDecomposed
class LowRankKronDecomposed(KronDecomposed):
    """``KronDecomposed`` whose factors may be low-rank: ``Q`` ``(d, k)``, ``λ`` ``(k,)``.

    Args:
        eigenvectors: per block ``[Q_G, Q_A]`` or ``[Q_M]``, each ``(d, k)`` orthonormal.
        eigenvalues: per block ``[λ_G, λ_A]`` or ``[λ_M]``, each ``(k,)``.
        deltas: prior precision, scalar / ``(1,)`` / ``(n_blocks,)``; stored as ``(n_blocks,)``.
        damping: ``P = (G + √δ)⊗(A + √δ)`` instead of ``G⊗A + δ`` (see module docstring).
    """

    def __init__(
        self,
        eigenvectors: list[list[Tensor]],
        eigenvalues: list[list[Tensor]],
        deltas: Tensor | float | None = None,
        damping: bool = False,
    ) -> None:
        if len(eigenvectors) != len(eigenvalues) or len(eigenvalues) == 0:
            raise ValueError("eigenvectors and eigenvalues must be non-empty and equally long.")
        for i, (Qs, ls) in enumerate(zip(eigenvectors, eigenvalues, strict=True)):
            if len(Qs) != len(ls) or len(ls) not in (1, 2):
                raise ValueError(f"Block {i} needs 1 or 2 factors with eigenpairs each.")
            for Q, lam in zip(Qs, ls, strict=True):
                if Q.ndim != 2 or lam.ndim != 1 or Q.shape[1] != lam.shape[0]:
                    raise ValueError(
                        f"Block {i}: eigenvectors {tuple(Q.shape)} do not match eigenvalues "
                        f"{tuple(lam.shape)}."
                    )
        super().__init__(eigenvectors, eigenvalues, None, damping)
        if deltas is not None:
            deltas = self._as_deltas(deltas)
            self._check_deltas(deltas)
            self.deltas = self.deltas + deltas  # broadcast to (n_blocks,)

    def _as_deltas(self, deltas: Tensor | float) -> Tensor:
        if isinstance(deltas, Number) and not isinstance(deltas, bool):
            return torch.tensor(float(deltas), dtype=self.deltas.dtype, device=self.deltas.device)
        return deltas

    def __add__(self, deltas: Tensor | float) -> LowRankKronDecomposed:
        """Add a prior precision (scalar or per block); keeps ``damping``."""
        deltas = self._as_deltas(deltas)
        self._check_deltas(deltas)
        return LowRankKronDecomposed(
            self.eigenvectors, self.eigenvalues, self.deltas + deltas, damping=self.damping
        )

    __radd__ = __add__

    def __mul__(self, scalar: float | Tensor) -> LowRankKronDecomposed:
        """Scale the curvature eigenvalues (``pow(scalar, 1/len(F))`` per factor); like
        laplace, ``deltas`` are not scaled. Keeps ``damping``."""
        if not _is_valid_scalar(scalar):
            raise ValueError("Invalid argument, can only multiply Kron with scalar.")
        eigenvalues = [
            [_scalar_root(scalar, len(ls)) * lam for lam in ls] for ls in self.eigenvalues
        ]
        return LowRankKronDecomposed(
            self.eigenvectors, eigenvalues, self.deltas, damping=self.damping
        )

    __rmul__ = __mul__

    def _blocks(self) -> Iterable[tuple[list[Tensor], list[Tensor], Tensor]]:
        return zip(self.eigenvectors, self.eigenvalues, self.deltas, strict=True)

    def logdet(self) -> Tensor:
        """``log det`` of the posterior precision, complements included."""
        logdet: Any = 0
        for Qs, ls, delta in self._blocks():
            if len(ls) == 1:
                (Q,), (lam,) = Qs, ls
                logdet = logdet + torch.log(lam + delta).sum()
                if Q.shape[0] > Q.shape[1]:
                    logdet = logdet + (Q.shape[0] - Q.shape[1]) * torch.log(delta)
                continue
            (Q1, Q2), (l1, l2) = _unify(Qs, ls)
            (d1, k1), (d2, k2) = Q1.shape, Q2.shape
            if self.damping:
                sq = torch.sqrt(delta)
                ld1 = torch.log(l1 + sq).sum()
                ld2 = torch.log(l2 + sq).sum()
                if k1 < d1:
                    ld1 = ld1 + (d1 - k1) * torch.log(sq)
                if k2 < d2:
                    ld2 = ld2 + (d2 - k2) * torch.log(sq)
                logdet = logdet + d2 * ld1 + d1 * ld2
            else:
                logdet = logdet + torch.log(torch.outer(l1, l2) + delta).sum()
                if k1 * k2 < d1 * d2:
                    logdet = logdet + (d1 * d2 - k1 * k2) * torch.log(delta)
        return logdet

    def _bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """``P^exponent @ W`` for ``W`` ``(batch, classes, params)``."""
        assert W.ndim == 3
        B, K, P = W.shape
        W = W.reshape(B * K, P)
        out, cur = [], 0
        for Qs, ls, delta in self._blocks():
            if len(ls) == 1:
                p = Qs[0].shape[0]
                Wp = W[:, cur : cur + p].T
                out.append(_pow_left(Qs[0], ls[0], delta, exponent, Wp).T)
            elif len(ls) == 2:
                (Q1, Q2), (l1, l2) = _unify(Qs, ls)
                (d1, k1), (d2, k2) = Q1.shape, Q2.shape
                p = d1 * d2
                Wp = W[:, cur : cur + p].reshape(B * K, d1, d2)
                dt = torch.promote_types(Wp.dtype, Q1.dtype)
                Wp, Q1, Q2, l1, l2 = Wp.to(dt), Q1.to(dt), Q2.to(dt), l1.to(dt), l2.to(dt)
                if self.damping:
                    sq = torch.sqrt(delta)
                    Y = _pow_left(Q1, l1, sq, exponent, Wp)
                    Y = _pow_left(Q2, l2, sq, exponent, Y.mT).mT
                else:
                    f = (torch.outer(l1, l2) + delta).pow(exponent)
                    inner = Q1.T @ Wp @ Q2
                    if k1 * k2 < d1 * d2:
                        c = delta.pow(exponent)
                        Y = Q1 @ (inner * (f - c)) @ Q2.T + c * Wp
                    else:
                        Y = Q1 @ (inner * f) @ Q2.T
                out.append(Y.reshape(B * K, p))
            else:
                raise AttributeError("Shape mismatch")
            cur += p
        if cur != P:
            raise ValueError(f"W has {P} parameters but the Kron covers {cur}.")
        return _cat(out).reshape(B, K, P)

    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """``P^exponent @ W`` for ``W`` ``(P,)``, ``(B, P)`` or ``(B, K, P)`` (laplace shapes)."""
        return super().bmm(W, exponent)

    def inv_square_form(self, W: Tensor) -> Tensor:
        """``W P⁻¹ Wᵀ``: ``(B, K, P) -> (B, K, K)`` (a ``(B, P)`` input is ``K = 1``)."""
        if W.ndim == 2:
            W = W.unsqueeze(1)
        SW = self._bmm(W, exponent=-1)
        return torch.bmm(W.to(SW.dtype), SW.transpose(1, 2))

    def diag(self, exponent: float = 1) -> Tensor:
        """Diagonal ``(P,)`` of ``P^exponent`` in ``O(P k)``."""
        diags = []
        for Qs, ls, delta in self._blocks():
            if len(ls) == 1:
                diags.append(_pow_diag(Qs[0], ls[0], delta, exponent))
                continue
            (Q1, Q2), (l1, l2) = _unify(Qs, ls)
            (d1, k1), (d2, k2) = Q1.shape, Q2.shape
            if self.damping:
                sq = torch.sqrt(delta)
                diags.append(
                    torch.outer(
                        _pow_diag(Q1, l1, sq, exponent), _pow_diag(Q2, l2, sq, exponent)
                    ).flatten()
                )
                continue
            f = (torch.outer(l1, l2) + delta).pow(exponent)
            if k1 * k2 < d1 * d2:
                c = delta.pow(exponent)
                D = Q1.square() @ (f - c) @ Q2.square().T + c
            else:
                D = Q1.square() @ f @ Q2.square().T
            diags.append(D.flatten())
        return _cat(diags)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense ``P^exponent`` (tests / small models only)."""
        blocks = []
        for Qs, ls, delta in self._blocks():
            if len(ls) == 1:
                blocks.append(_pow_dense(Qs[0], ls[0], delta, exponent))
                continue
            (Q1, Q2), (l1, l2) = _unify(Qs, ls)
            if self.damping:
                sq = torch.sqrt(delta)
                blocks.append(
                    kron(_pow_dense(Q1, l1, sq, exponent), _pow_dense(Q2, l2, sq, exponent))
                )
                continue
            (d1, k1), (d2, k2) = Q1.shape, Q2.shape
            Q = kron(Q1, Q2)
            f = (torch.outer(l1, l2) + delta).pow(exponent).flatten()
            if k1 * k2 < d1 * d2:
                c = delta.pow(exponent)
                eye = torch.eye(d1 * d2, dtype=Q.dtype, device=Q.device)
                blocks.append((Q * (f - c)) @ Q.T + c * eye)
            else:
                blocks.append((Q * f) @ Q.T)
        dtype = blocks[0].dtype
        for b in blocks[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        return block_diag([b.to(dtype) for b in blocks])


# ---------------------------------------------------------------------- conversions
def to_dense_kron(lrk: Kron) -> Kron:
    """Plain laplace ``Kron`` with every low-rank factor densified (tests / small sides)."""
    return Kron(
        [[H.to_dense() if isinstance(H, LowRankFactor) else H for H in F] for F in lrk.kfacs]
    )


def kron_from_dense(kron: Kron, factor_rank: int | None, threshold: int) -> LowRankKron:
    """``LowRankKron`` from a dense ``Kron``: factors with side ``> threshold`` become
    rank-``factor_rank`` (best approximation via ``eigh``) when ``factor_rank`` is set."""
    kfacs = []
    for F in kron.kfacs:
        row: list[Factor] = []
        for H in F:
            if factor_rank is not None and len(H) > threshold and not isinstance(H, LowRankFactor):
                row.append(LowRankFactor.from_dense(H, factor_rank, dtype=H.dtype))
            else:
                row.append(H)
        kfacs.append(row)
    return LowRankKron(kfacs)
