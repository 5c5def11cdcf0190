"""``factor_rank="auto"``: which Kronecker factors are kept dense and which low-rank.

The rule, applied once per posterior from the parameter shapes (no data needed):

1. a factor of side ``d <= rank_threshold`` (default 2048) is dense, a larger one is kept at
   rank :data:`AUTO_RANK` (256);
2. if the dense factors would still take more than :data:`AUTO_DENSE_BUDGET` bytes
   (256 MiB) in the curvature dtype, the threshold is lowered to the next smaller factor
   side, repeatedly, but never below :data:`AUTO_MIN_SIDE` (512): the largest sides become
   low-rank first.

Small models therefore keep exact dense factors (nothing changes below the threshold), and
no factor above the threshold is ever formed densely (the low-rank path never forms
``d x d``). At LLaMA-2-7B shapes (LoRA r=8 on q, v and ``lm_head``) every 4096- and
32000-sided factor is rank 256: about 0.55 GB of factors in float32 (see
:func:`factor_bytes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch

__all__ = [
    "DEFAULT_RANK_THRESHOLD",
    "AUTO_RANK",
    "AUTO_DENSE_BUDGET",
    "AUTO_MIN_SIDE",
    "FactorRank",
    "factor_sides",
    "resolve_factor_rank",
    "any_low_rank",
    "factor_bytes",
]

DEFAULT_RANK_THRESHOLD = 2048
"""Default ``rank_threshold``: factor sides above it are low-rank when ``factor_rank`` is set
(the one definition; the backend, the posteriors and ``LowRankKron`` use it)."""
AUTO_RANK = 256
"""Rank of a low-rank factor under ``factor_rank="auto"``."""
AUTO_DENSE_BUDGET = 256 * 2**20
"""Bytes that all dense factors together may take under ``"auto"`` (before the
eigendecomposition, which doubles them)."""
AUTO_MIN_SIDE = 512
"""``"auto"`` never makes a factor of this side or smaller low-rank for the budget."""

FactorRank = int | Literal["auto"] | None
"""``factor_rank`` option: a rank, ``"auto"`` (default) or ``None`` (all dense)."""


def _shape(p: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(p.shape) if hasattr(p, "shape") else tuple(p)


def factor_sides(params: Iterable[torch.Tensor | Sequence[int]]) -> list[list[int]]:
    """Kronecker factor sides per parameter tensor, as ``Kron.init_from_model``: a weight
    ``(d_out, d_in, ...)`` gives ``[d_out, prod(d_in, ...)]``, a 1-D tensor ``[d]``."""
    sides = []
    for p in params:
        shape = _shape(p)
        if len(shape) == 1:
            sides.append([shape[0]])
        else:
            sides.append([shape[0], int(np.prod(shape[1:]))])
    return sides


def _dense_bytes(sides: list[int], threshold: int, itemsize: int) -> int:
    return sum(d * d for d in sides if d <= threshold) * itemsize


def resolve_factor_rank(
    factor_rank: FactorRank,
    rank_threshold: int,
    params: Iterable[torch.Tensor | Sequence[int]],
    dtype: torch.dtype = torch.float32,
) -> tuple[int | None, int]:
    """``(rank, threshold)``: factors of side ``> threshold`` are kept at ``rank`` (``None``:
    all dense). An int or ``None`` is returned unchanged; ``"auto"`` follows the module's
    rule for these parameters (tensors or shapes) and the curvature ``dtype``."""
    if factor_rank != "auto":
        return factor_rank, rank_threshold
    sides = [d for s in factor_sides(params) for d in s]
    itemsize = torch.empty((), dtype=dtype).element_size()
    threshold = rank_threshold
    while _dense_bytes(sides, threshold, itemsize) > AUTO_DENSE_BUDGET:
        dense_big = [d for d in sides if AUTO_MIN_SIDE < d <= threshold]
        if not dense_big:
            break
        largest = max(dense_big)
        threshold = max([d for d in sides if AUTO_MIN_SIDE <= d < largest] + [AUTO_MIN_SIDE])
    return AUTO_RANK, threshold


def any_low_rank(
    params: Iterable[torch.Tensor | Sequence[int]], rank: int | None, threshold: int
) -> bool:
    """Whether ``(rank, threshold)`` (from :func:`resolve_factor_rank`) makes any factor of
    these parameters low-rank."""
    return rank is not None and any(d > threshold for s in factor_sides(params) for d in s)


def factor_bytes(
    params: Iterable[torch.Tensor | Sequence[int]],
    factor_rank: FactorRank = "auto",
    rank_threshold: int = DEFAULT_RANK_THRESHOLD,
    dtype: torch.dtype = torch.float32,
) -> dict[str, int]:
    """Bytes of the fitted Kronecker factors for these parameters (tensors or shapes).

    Returns ``{"dense": ..., "low_rank": ..., "total": ..., "largest_dense_side": ...}``:
    a dense factor ``d x d``, a low-rank one ``U`` ``(d, min(k, d))`` and ``s``. The
    eigendecomposition of a low-rank factor shares its tensors; a dense factor's
    eigenvectors take as much again (not counted).
    """
    params = list(params)
    rank, threshold = resolve_factor_rank(factor_rank, rank_threshold, params, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    dense = low = largest = 0
    for d in (d for s in factor_sides(params) for d in s):
        if rank is None or d <= threshold:
            dense += d * d * itemsize
            largest = max(largest, d)
        else:
            k = min(rank, d)
            low += (d * k + k) * itemsize
    return {"dense": dense, "low_rank": low, "total": dense + low, "largest_dense_side": largest}
