"""Low-rank PSD Kronecker factors ``U diag(s) Uᵀ`` that never form the dense ``d x d`` matrix.

A :class:`LowRankFactor` stands for the PSD matrix ``F = U diag(s) Uᵀ`` of side ``dim``
(``U``: ``(dim, k)`` with orthonormal columns, ``s``: ``(k,)`` with ``s >= 0``,
``k <= max_rank``). On the orthogonal complement of ``span(U)`` the matrix is zero, so every
operation here is *exact* for the represented matrix; the only approximation happens when a
sum is truncated back to ``max_rank`` columns (best rank-``max_rank`` approximation).

Sums are *deferred*: ``F + G`` only appends ``G``'s root columns to a pending buffer
(or, for a side small enough that its Gram is no bigger than a buffer, adds ``R Rᵀ`` to a
pending ``d x d`` Gram). The represented matrix ``U diag(s) Uᵀ + P Pᵀ (+ Gram)`` stays exact;
it is compressed to ``max_rank`` (one thin QR + a small eigendecomposition) only when the
buffer holds more than :func:`buffer_columns` columns, or when the factor is first read
(``U``, ``s``, ``rank``, any product). A fit thus compresses once per ``buffer`` root
columns, not twice per batch.

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

__all__ = ["LowRankFactor", "buffer_columns", "compute_dtype", "merge_columns"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The package's one dtype rule: curvature, decompositions and predictive moments are
    computed in ``dtype`` promoted to at least ``float32`` (float16 / bfloat16 -> float32,
    float64 stays float64; a non-float dtype gives the default dtype)."""
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    if torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def buffer_columns(max_rank: int) -> int:
    """Root columns merged per compression (and deferred before one): ``max(256, 2 max_rank)``."""
    return max(256, 2 * int(max_rank))


CUDA_MERGE_COLUMNS = 2048
"""Root columns one QR + eigh may merge on a GPU (see :func:`merge_columns`)."""


def merge_columns(max_rank: int, device: torch.device | str) -> int:
    """Columns that :meth:`LowRankFactor.from_root` merges per thin QR + ``eigh``.

    On a CPU, :func:`buffer_columns` (cost ``O(d c²)`` per chunk of ``c``: small chunks are
    cheapest). On CUDA at least ``CUDA_MERGE_COLUMNS``: there the QR and ``eigh`` of a few
    hundred columns are bound by latency, not arithmetic (H200, side 4096, fp32: ``eigh``
    of 512² took 13 ms and of 1280² 14 ms; ``benchmarks/results/gpu_fit_profile_*.txt``),
    so one merge of a whole batch costs half of three chunked ones. Both are the same
    incremental truncation; fewer chunks truncate less often.
    """
    chunk = buffer_columns(max_rank)
    if torch.device(device).type == "cuda":
        return max(chunk, CUDA_MERGE_COLUMNS)
    return chunk


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
        self._U: Tensor = U
        self._s: Tensor = s
        self.max_rank: int = max_rank
        self._pending: Tensor | None = None  # (d, m) root, compute dtype
        self._gram: Tensor | None = None  # (d, d) Gram, compute dtype (small sides only)
        self._gram_cols = 0  # root columns folded into _gram

    @property
    def U(self) -> Tensor:
        """``(d, k)`` orthonormal eigenvectors (compresses pending sums first)."""
        self.compress()
        return self._U

    @property
    def s(self) -> Tensor:
        """``(k,)`` non-negative eigenvalues (compresses pending sums first)."""
        self.compress()
        return self._s

    def stored_tensors(self) -> list[Tensor]:
        """The tensors held now (``U``, ``s`` and any pending root / Gram), without
        compressing: for cheap checks (e.g. finiteness) that must not force a truncation."""
        return [t for t in (self._U, self._s, self._pending, self._gram) if t is not None]

    @property
    def pending_columns(self) -> int:
        """Root columns added since the last compression (not yet truncated)."""
        m = 0 if self._pending is None else self._pending.shape[1]
        return m + self._gram_cols

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
    def from_root(
        cls,
        R: Tensor,
        max_rank: int,
        dtype: torch.dtype | None = None,
        chunk: int | None = None,
    ) -> LowRankFactor:
        """Best rank-``max_rank`` approximation of ``R Rᵀ``, for ``R`` ``(d, m)``.

        Keeps ``k = min(max_rank, d, m)`` eigenpairs (zero eigenvalues included, so the
        shape only depends on the input shapes). The columns of ``R`` are merged in chunks
        of at most ``chunk`` (and fewer than ``d - k``): each merge is a thin QR of
        ``[current root, chunk]`` and an eigendecomposition of its small triangle's Gram,
        re-truncated to ``max_rank``. Cost ``O(d m c)`` time and ``O(d c)`` memory for
        chunk size ``c``; no ``d x d`` matrix, however many rows a batch has. Exact
        whenever ``max_rank`` is at least the rank of ``R Rᵀ`` (otherwise the usual
        incremental truncation).

        Args:
            R: root ``(d, m)``; any floating dtype, computed in at least float32.
            max_rank: number of eigenpairs kept.
            dtype: storage dtype; defaults to the compute dtype.
            chunk: columns per merge; defaults to :func:`merge_columns` for ``R``'s device.
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
        chunk = int(chunk) if chunk is not None else merge_columns(max_rank, R.device)
        if chunk <= 0:
            raise ValueError(f"from_root needs chunk > 0, got {chunk}.")
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
    def deferred(cls, R: Tensor, max_rank: int, dtype: torch.dtype | None = None) -> LowRankFactor:
        """``R Rᵀ`` for a root ``R`` ``(d, m)``, kept exactly until it is read or until more
        than :func:`buffer_columns` columns are pending (then as :meth:`from_root`).

        Use it for per-batch contributions that are summed: the sum is compressed once per
        buffer instead of once per batch. Stored in ``dtype`` (default: the compute dtype).
        """
        if R.ndim != 2:
            raise ValueError(f"deferred needs a (d, m) root, got shape {tuple(R.shape)}.")
        dtype = dtype or compute_dtype(R.dtype)
        zero = cls.zeros(R.shape[0], max_rank, device=R.device, dtype=dtype)
        return zero._accumulate([R], None, 0)

    @property
    def _gram_ok(self) -> bool:
        """Whether this side may hold a ``d x d`` Gram (as :meth:`from_root` may form one)."""
        return self.dim <= buffer_columns(self.max_rank) + self.max_rank

    def _accumulate(
        self, roots: list[Tensor], gram: Tensor | None, gram_cols: int
    ) -> LowRankFactor:
        """A new factor ``self + Σ R Rᵀ + gram``, deferred (see the module docstring)."""
        cdt = compute_dtype(self.dtype)
        parts = [] if self._pending is None else [self._pending]
        parts += [R.to(self.device, cdt) for R in roots if R.shape[1] > 0]
        P = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]) if parts else None
        G, n_gram = self._gram, self._gram_cols
        if gram is not None:
            gram = gram.to(self.device, cdt)
            G, n_gram = (gram if G is None else G + gram), n_gram + gram_cols
        m = 0 if P is None else P.shape[1]
        if P is not None and self._gram_ok and (G is not None or m > self._buffer):
            G = P @ P.T if G is None else torch.addmm(G, P, P.T)
            P, n_gram = None, n_gram + m
        out = LowRankFactor(self._U, self._s, self.max_rank)
        out._pending, out._gram, out._gram_cols = P, G, n_gram
        if P is not None and P.shape[1] > out._buffer:
            out.compress()
        return out

    @property
    def _buffer(self) -> int:
        return buffer_columns(self.max_rank)

    def compress(self) -> LowRankFactor:
        """Truncate the pending sum to ``max_rank`` in place (best rank-``max_rank``
        approximation of the whole represented matrix); returns ``self``."""
        if self._pending is None and self._gram is None:
            return self
        dtype, U, s = self._U.dtype, self._U, self._s
        cdt = compute_dtype(dtype)
        root = (U * s.clamp_min(0).sqrt()).to(cdt)
        if self._gram is not None:
            M = self._gram + root @ root.T
            if self._pending is not None:
                M = M + self._pending @ self._pending.T
            k = min(self.max_rank, self.dim, U.shape[1] + self.pending_columns)
            L, Q = torch.linalg.eigh(M)  # ascending
            U, s = Q[:, M.shape[0] - k :].flip(1), L[M.shape[0] - k :].flip(0).clamp_min(0)
            U, s = U.to(dtype), s.to(dtype)
        else:
            R = torch.cat([root, self._pending], dim=1)
            F = LowRankFactor.from_root(R, self.max_rank, dtype=dtype)
            U, s = F._U, F._s
        self._U, self._s = U, s
        self._pending, self._gram, self._gram_cols = None, None, 0
        return self

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
        return self._U.shape[0]

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
        return self._U.dtype

    @property
    def device(self) -> torch.device:
        return self._U.device

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
            f"LowRankFactor(dim={self.dim}, rank={self._U.shape[1]}, "
            f"pending={self.pending_columns}, max_rank={self.max_rank}, dtype={self.dtype}, "
            f"device={self.device})"
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
            dtype = torch.promote_types(self.dtype, other.dtype)
            out = self._recast(dtype, max(self.max_rank, other.max_rank))
            roots = [other._pending] if other._pending is not None else []
            if other._U.shape[1] > 0:
                roots.insert(0, other._U * other._s.clamp_min(0).sqrt())
            return out._accumulate(roots, other._gram, other._gram_cols)
        if isinstance(other, Tensor):
            self._check_dense_shape(other)
            if _is_zero(other):
                return self._recast(self.dtype, self.max_rank)
            if other.ndim == 0:
                raise ValueError("Can only add 0, a (d, d) / (d,) tensor or a LowRankFactor.")
            dtype = torch.promote_types(self.dtype, other.dtype)
            root = self._dense_root(other.to(self.device), dtype)
            return self._recast(dtype, self.max_rank)._accumulate([root], None, 0)
        if _is_zero(other):
            return self._recast(self.dtype, self.max_rank)
        return NotImplemented

    def _recast(self, dtype: torch.dtype, max_rank: int) -> LowRankFactor:
        """A copy in ``dtype`` with ``max_rank``, keeping the pending (deferred) sum."""
        out = LowRankFactor(self._U.to(dtype), self._s.to(dtype), max_rank)
        cdt = compute_dtype(dtype)
        out._pending = None if self._pending is None else self._pending.to(cdt)
        out._gram = None if self._gram is None else self._gram.to(cdt)
        out._gram_cols = self._gram_cols
        return out

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
        out = LowRankFactor(self._U, self._s * c, self.max_rank)
        if self._pending is not None:
            out._pending = self._pending * (c.sqrt() if isinstance(c, Tensor) else math.sqrt(c))
        if self._gram is not None:
            out._gram = self._gram * c
        out._gram_cols = self._gram_cols
        return out

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
    ``c <= d``: thin QR, then ``eigh`` of the ``(c, c)`` product ``T Tᵀ`` of its triangle
    (about twice as fast as an SVD of ``T``; the eigenvalues are ``S²`` either way)."""
    Q, T = torch.linalg.qr(R, mode="reduced")
    L, V = torch.linalg.eigh(T @ T.mT)  # ascending; R Rᵀ = Q (T Tᵀ) Qᵀ
    c = L.shape[0]
    k = min(k, c)
    return Q @ V[:, c - k :].flip(1), L[c - k :].flip(0).clamp_min(0)
