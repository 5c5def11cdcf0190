"""Low-rank PSD Kronecker factors ``U diag(s) Uᵀ`` that never form the dense ``d x d`` matrix.

A :class:`LowRankFactor` stands for the PSD matrix ``F = U diag(s) Uᵀ`` of side ``dim``
(``U``: ``(dim, k)`` with orthonormal columns, ``s``: ``(k,)`` with ``s >= 0``,
``k <= max_rank``). On the orthogonal complement of ``span(U)`` the matrix is zero, so every
operation here is *exact* for the represented matrix; the only approximation happens when a
sum is truncated back to ``max_rank`` columns (best rank-``max_rank`` approximation).

Dtypes: decompositions are computed in at least ``float32`` (``bfloat16``/``float16`` roots
are upcast; ``float64`` stays ``float64``). By default the result is stored in that compute
dtype; pass ``dtype=`` to store it otherwise.
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Any

import torch
from torch import Tensor

__all__ = ["LowRankFactor", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype used for decompositions: ``dtype`` promoted to at least ``float32``."""
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    if torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def _check_scalar(scalar: Any) -> Tensor | float:
    """Validate a multiplier: a python real or a one-element tensor, non-negative."""
    if isinstance(scalar, Tensor):
        if scalar.numel() != 1:
            raise ValueError(
                f"Can only multiply by a scalar, got a tensor of shape {scalar.shape}."
            )
        value = float(scalar.detach())
        scalar = scalar.reshape(())
    elif isinstance(scalar, Number) and not isinstance(scalar, complex):
        value = float(scalar)
    else:
        raise ValueError(f"Can only multiply by a real scalar, got {type(scalar).__name__}.")
    if value < 0 or math.isnan(value):
        raise ValueError(f"Scaling a PSD factor needs a non-negative scalar, got {value}.")
    return scalar


def _is_zero(x: Any) -> bool:
    if isinstance(x, Tensor):
        return not bool(torch.any(x != 0))
    return isinstance(x, Number) and x == 0


class LowRankFactor:
    """PSD matrix ``U diag(s) Uᵀ`` of side ``dim`` with at most ``max_rank`` columns.

    Args:
        U: ``(dim, k)`` eigenvectors with orthonormal columns (not checked).
        s: ``(k,)`` non-negative eigenvalues.
        max_rank: the largest number of columns kept by sums; ``k <= max_rank``.

    Behaves enough like a dense ``(dim, dim)`` tensor for laplace-torch's bookkeeping:
    ``len(F) == dim``, ``F.ndim == 2``, ``F.shape == (dim, dim)``, ``F * c``, ``F + G``,
    ``F @ X`` and ``X @ F``.
    """

    def __init__(self, U: Tensor, s: Tensor, max_rank: int) -> None:
        if U.ndim != 2 or s.ndim != 1 or U.shape[1] != s.shape[0]:
            raise ValueError(
                f"LowRankFactor needs U (d, k) and s (k,), got U {tuple(U.shape)}, "
                f"s {tuple(s.shape)}."
            )
        max_rank = int(max_rank)
        if max_rank < 0:
            raise ValueError(f"max_rank must be >= 0, got {max_rank}.")
        if U.shape[1] > max_rank:
            raise ValueError(f"U has {U.shape[1]} columns but max_rank is {max_rank}.")
        self.U: Tensor = U
        self.s: Tensor = s
        self.max_rank: int = max_rank

    # ------------------------------------------------------------------ constructors
    @classmethod
    def zeros(
        cls,
        dim: int,
        max_rank: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankFactor:
        """The zero matrix of side ``dim``: ``U`` ``(dim, 0)``, ``s`` ``(0,)``."""
        dtype = dtype or torch.get_default_dtype()
        U = torch.zeros(int(dim), 0, device=device, dtype=dtype)
        return cls(U, torch.zeros(0, device=device, dtype=dtype), max_rank)

    @classmethod
    def from_root(cls, R: Tensor, max_rank: int, dtype: torch.dtype | None = None) -> LowRankFactor:
        """Best rank-``max_rank`` approximation of ``R Rᵀ``, for ``R`` ``(d, m)``.

        Keeps ``k = min(max_rank, d, m)`` eigenpairs (zero eigenvalues included, so the
        shape only depends on the input shapes). The columns of ``R`` are merged in chunks
        of at most ``max(256, 2 max_rank)`` (and fewer than ``d - k``): each merge is a thin QR
        of ``[current root, chunk]`` and an SVD of its small triangle, re-truncated to
        ``max_rank``. Cost ``O(d m c)`` time and ``O(d c)`` memory for chunk size ``c``; no
        ``d x d`` matrix, however many rows a batch has. Exact whenever ``max_rank`` is at
        least the rank of ``R Rᵀ`` (otherwise the usual incremental truncation).

        Args:
            R: root ``(d, m)``; any floating dtype, computed in at least float32.
            max_rank: number of eigenpairs kept.
            dtype: storage dtype; defaults to the compute dtype.
        """
        if R.ndim != 2:
            raise ValueError(f"from_root needs a (d, m) root, got shape {tuple(R.shape)}.")
        d, m = R.shape
        cdt = compute_dtype(R.dtype)
        dtype = dtype or cdt
        k = min(int(max_rank), d, m)
        if k <= 0:
            return cls.zeros(d, max_rank, device=R.device, dtype=dtype)
        R = R.to(cdt)
        chunk = max(256, 2 * int(max_rank))
        if m <= min(d, chunk):  # one thin QR: the exact best rank-k approximation
            U, s = _truncated_root(R, k)
            return cls(U.to(dtype), s.to(dtype), max_rank)
        if d <= chunk + k:  # a small side: its d x d Gram is no bigger than a chunk
            L, Q = torch.linalg.eigh(R @ R.T)  # ascending
            U, s = Q[:, -k:].flip(1), L[-k:].flip(0).clamp_min(0)
            return cls(U.to(dtype), s.to(dtype), max_rank)
        U, s = _truncated_root(R[:, :chunk], k)
        for start in range(chunk, m, chunk):
            stacked = torch.cat([U * s.sqrt(), R[:, start : start + chunk]], dim=1)
            U, s = _truncated_root(stacked, min(int(max_rank), d, stacked.shape[1]))
        k_final = min(int(max_rank), d, m)
        return cls(U[:, :k_final].to(dtype), s[:k_final].to(dtype), max_rank)

    @classmethod
    def from_dense(
        cls, M: Tensor, max_rank: int, dtype: torch.dtype | None = None
    ) -> LowRankFactor:
        """Best rank-``max_rank`` PSD approximation of a dense symmetric ``M`` ``(d, d)``
        (or a diagonal ``(d,)``); negative eigenvalues are clipped to 0. Forms no more than
        ``M`` itself (small sides / tests)."""
        if M.ndim == 1:
            M = torch.diag(M)
        if M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"from_dense needs a square matrix, got shape {tuple(M.shape)}.")
        d = M.shape[0]
        cdt = compute_dtype(M.dtype)
        dtype = dtype or cdt
        k = min(int(max_rank), d)
        if k <= 0:
            return cls.zeros(d, max_rank, device=M.device, dtype=dtype)
        L, Q = torch.linalg.eigh(M.to(cdt))
        U = Q[:, -k:].flip(1)
        s = L[-k:].flip(0).clamp_min(0)
        return cls(U.to(dtype), s.to(dtype), max_rank)

    @staticmethod
    def _dense_root(M: Tensor, dtype: torch.dtype) -> Tensor:
        """A root ``(d, r)`` of the PSD part of a dense ``M`` (positive eigenvalues only)."""
        if M.ndim == 1:
            M = torch.diag(M)
        L, Q = torch.linalg.eigh(M.to(compute_dtype(dtype)))
        keep = L > 0
        return (Q[:, keep] * L[keep].sqrt()).to(dtype)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Side ``d`` of the represented ``(d, d)`` matrix."""
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        """Number of stored columns ``k`` (eigenvalues may include exact zeros)."""
        return self.U.shape[1]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.dim, self.dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    @property
    def device(self) -> torch.device:
        return self.U.device

    @property
    def T(self) -> LowRankFactor:
        """Symmetric: the transpose is ``self``."""
        return self

    mT = T

    def __len__(self) -> int:
        return self.dim

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return (
            f"LowRankFactor(dim={self.dim}, rank={self.rank}, max_rank={self.max_rank}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ algebra
    def root(self, dtype: torch.dtype | None = None) -> Tensor:
        """``U diag(sqrt(s))`` ``(d, k)``, so that ``F = root rootᵀ``."""
        r = self.U * self.s.clamp_min(0).sqrt()
        return r if dtype is None else r.to(dtype)

    def __add__(self, other: LowRankFactor | Tensor | float) -> LowRankFactor:
        """``self + other``, re-truncated to ``max(self.max_rank, other.max_rank)``.

        ``other`` may be a :class:`LowRankFactor`, ``0`` / a zero tensor (returns an
        equivalent of ``self``), or a dense PSD ``(d, d)`` (or diagonal ``(d,)``) tensor,
        which is eigendecomposed and merged (its negative eigenvalues are dropped).
        """
        if isinstance(other, LowRankFactor):
            if other.dim != self.dim:
                raise ValueError(
                    f"Cannot add LowRankFactors of different sides {self.dim} and {other.dim}."
                )
            max_rank = max(self.max_rank, other.max_rank)
            dtype = torch.promote_types(self.dtype, other.dtype)
            if other.rank == 0:
                return LowRankFactor(self.U.to(dtype), self.s.to(dtype), max_rank)
            if self.rank == 0:
                return LowRankFactor(
                    other.U.to(self.device, dtype), other.s.to(self.device, dtype), max_rank
                )
            R = torch.cat([self.root(dtype), other.root(dtype).to(self.device)], dim=1)
            return LowRankFactor.from_root(R, max_rank, dtype=dtype)
        if isinstance(other, Tensor):
            self._check_dense_shape(other)
            if _is_zero(other):
                return LowRankFactor(self.U, self.s, self.max_rank)
            if other.ndim == 0:
                raise ValueError("Can only add 0, a (d, d) / (d,) tensor or a LowRankFactor.")
            dtype = torch.promote_types(self.dtype, other.dtype)
            R = torch.cat([self.root(dtype), self._dense_root(other.to(self.device), dtype)], 1)
            return LowRankFactor.from_root(R, self.max_rank, dtype=dtype)
        if _is_zero(other):
            return LowRankFactor(self.U, self.s, self.max_rank)
        return NotImplemented

    def _check_dense_shape(self, M: Tensor) -> None:
        if M.ndim == 0:
            return
        ok = (M.ndim == 1 and M.shape[0] == self.dim) or (
            M.ndim == 2 and tuple(M.shape) == (self.dim, self.dim)
        )
        if not ok:
            raise ValueError(
                f"Cannot add a tensor of shape {tuple(M.shape)} to a LowRankFactor of side "
                f"{self.dim}."
            )

    __radd__ = __add__
    add = __add__

    def __mul__(self, scalar: float | Tensor) -> LowRankFactor:
        """Scale the eigenvalues by a non-negative scalar."""
        try:
            c = _check_scalar(scalar)
        except ValueError:
            if isinstance(scalar, (Tensor, Number)):
                raise
            return NotImplemented
        return LowRankFactor(self.U, self.s * c, self.max_rank)

    __rmul__ = __mul__

    def __matmul__(self, X: Tensor) -> Tensor:
        """``F @ X`` for ``X`` ``(..., d, n)`` (or ``(d,)``) in ``O(d k n)``."""
        if X.ndim == 1:
            return self.U @ (self.s * (self.U.T @ X))
        return self.U @ (self.s.unsqueeze(-1) * (self.U.T @ X))

    def __rmatmul__(self, X: Tensor) -> Tensor:
        """``X @ F`` for ``X`` ``(..., n, d)`` (or ``(d,)``)."""
        return ((X @ self.U) * self.s) @ self.U.T

    def to_dense(self) -> Tensor:
        """The dense ``(d, d)`` matrix (tests / small sides only)."""
        return (self.U * self.s) @ self.U.T

    def diagonal(self) -> Tensor:
        """Diagonal ``(d,)`` without forming ``d x d``."""
        return (self.U.square() * self.s).sum(dim=1)

    diag = diagonal

    def trace(self) -> Tensor:
        return self.s.sum()

    def eigh(self) -> tuple[Tensor, Tensor]:
        """``(s (k,), U (d, k))``: the non-trivial eigenpairs; all others are 0."""
        return self.s, self.U

    # ------------------------------------------------------------------ tensor-likes
    def to(self, *args: Any, **kwargs: Any) -> LowRankFactor:
        """Like ``Tensor.to`` (device and/or dtype)."""
        return LowRankFactor(self.U.to(*args, **kwargs), self.s.to(*args, **kwargs), self.max_rank)

    def detach(self) -> LowRankFactor:
        return LowRankFactor(self.U.detach(), self.s.detach(), self.max_rank)

    def clone(self) -> LowRankFactor:
        return LowRankFactor(self.U.clone(), self.s.clone(), self.max_rank)

    def state(self) -> dict[str, Any]:
        """Plain dict of tensors and ints (loadable with ``torch.load(weights_only=True)``)."""
        return {"U": self.U, "s": self.s, "max_rank": self.max_rank}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LowRankFactor:
        return cls(state["U"], state["s"], int(state["max_rank"]))


def _truncated_root(R: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs ``(U (d, k), s (k,))`` of ``R Rᵀ`` for a tall ``R`` ``(d, c)``,
    ``c <= d``: thin QR, then the SVD of the ``(c, c)`` triangle."""
    Q, T = torch.linalg.qr(R, mode="reduced")
    V, S, _ = torch.linalg.svd(T)
    k = min(k, S.shape[0])
    return Q @ V[:, :k], S[:k].square()
