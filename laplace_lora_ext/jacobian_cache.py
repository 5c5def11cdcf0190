"""``LogitJacobianCache``: one pass over a split, scored at many prior precisions.

The GLM predictive's costly half (the logits and the logit Jacobian blocks, see
:mod:`laplace_lora_ext.predictive`) does not depend on the prior precision, and the cheap
half (``_functional_variance_blocks``) does. Grid searches, benchmark methods and prior
studies therefore compute the blocks once per split and re-score them; this class is that
cache, shared by ``optimize_prior_precision(method="gridsearch")``, the calibration
benchmark and the prior studies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import tqdm

from . import eigenbasis, guards
from .inputs import split_batch
from .links import apply_link
from .predictive import logit_jacobian_blocks

__all__ = ["LogitJacobianCache"]

Batch = tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]
"""MAP logits ``(B, C)``, Jacobian blocks (one ``(B, C, p_l)`` per tensor of
``la.params``), labels ``(B,)``."""


class LogitJacobianCache:
    """MAP logits, labels and logit Jacobian blocks of every batch of ``loader``.

    Iterating yields one :data:`Batch` per loader batch. Blocks beyond ``max_bytes`` are
    not kept: those batches keep their inputs and their blocks are recomputed whenever they
    are read (same numbers, one more pass).

    Args:
        la: a fitted ``lora`` posterior (its backend forms the blocks).
        loader: dict batches with labels under ``la.dict_key_y``, or ``(X, y)`` pairs.
        max_bytes: memory budget for the kept blocks (default: keep all).
        block_dtype: store the blocks in this dtype (e.g. ``torch.float32`` to halve a
            float64 cache); default: as computed.
        progress: show a tqdm bar over batches.
        in_eigenbasis: keep the blocks rotated into ``la``'s Kronecker eigenbasis when its
            posterior allows (:mod:`laplace_lora_ext.eigenbasis`): then each prior value
            scores in ``O(B C² P)`` instead of a rotation per value, and only ``la``, with
            the same curvature, can be scored. For prior searches.
    """

    def __init__(
        self,
        la: Any,
        loader: Iterable[Any],
        max_bytes: float = math.inf,
        block_dtype: torch.dtype | None = None,
        progress: bool = False,
        in_eigenbasis: bool = False,
    ) -> None:
        self._la = la
        self._block_dtype = block_dtype
        self._basis = la.H if in_eigenbasis and eigenbasis.supports(la) else None
        self._items: list[tuple[torch.Tensor, list[torch.Tensor] | None, Any, torch.Tensor]] = []
        size = 0
        with guards.eval_mode(la.model):
            for batch in tqdm.tqdm(loader, desc="GLM pass", leave=False, disable=not progress):
                X, y = split_batch(batch, la.dict_key_y, la._device)
                f_mu, blocks = self._blocks(X)
                y = guards.check_class_labels(y, len(f_mu), f_mu.shape[-1])
                size += sum(b.numel() * b.element_size() for b in blocks)
                keep = size <= max_bytes
                self._items.append((f_mu, blocks if keep else None, None if keep else X, y))

    def _blocks(self, X: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f_mu, blocks = logit_jacobian_blocks(self._la.backend, X)
        if self._basis is not None:
            blocks = eigenbasis.rotate(self._basis, [b.to(self._la._dtype) for b in blocks])
        dtype = self._block_dtype
        return f_mu, blocks if dtype is None else [b.to(dtype) for b in blocks]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Batch]:
        for f_mu, blocks, X, y in self._items:
            if blocks is None:  # the stored logits stand (see ``with_logits``)
                with guards.eval_mode(self._la.model):
                    _, blocks = self._blocks(X)
            yield f_mu, blocks, y

    def with_logits(self, logits: torch.Tensor) -> LogitJacobianCache:
        """A copy that shares this cache's Jacobian blocks and labels but centres the
        predictive at ``logits`` ``(N, C)`` instead of the MAP's (e.g. leave-one-out
        logits, :mod:`laplace_lora_ext.loo_prior`)."""
        if logits.shape != self.logits.shape:
            raise ValueError(f"logits must have shape {tuple(self.logits.shape)}.")
        out = LogitJacobianCache.__new__(LogitJacobianCache)
        out._la, out._block_dtype, out._basis = self._la, self._block_dtype, self._basis
        out._items, start = [], 0
        for f_mu, blocks, X, y in self._items:
            new = logits[start : start + len(f_mu)].to(f_mu)
            out._items.append((new, blocks, X, y))
            start += len(f_mu)
        return out

    @property
    def logits(self) -> torch.Tensor:
        """MAP logits ``(N, C)``."""
        return torch.cat([f for f, _, _, _ in self._non_empty()])

    @property
    def labels(self) -> torch.Tensor:
        """Labels ``(N,)``."""
        return torch.cat([y for _, _, _, y in self._non_empty()])

    def _non_empty(self) -> list[tuple[torch.Tensor, list[torch.Tensor] | None, Any, torch.Tensor]]:
        if not self._items:
            raise ValueError("The loader yielded no batches: there are no logits or labels.")
        return self._items

    def probs(
        self,
        la: Any,
        link_approx: str = "mc",
        n_samples: int | None = 100,
        generator: torch.Generator | None = None,
        keep: set[int] | None = None,
    ) -> torch.Tensor:
        """Predictive probabilities ``(N, C)`` of ``la``'s posterior at its current prior.

        Args:
            la: the posterior to score (any ``lora`` structure over the same ``la.params``
                as the posterior that built the cache; with ``in_eigenbasis`` only that
                posterior, with the curvature it had).
            link_approx, n_samples, generator: as for ``la(x)`` (``n_samples=None``: the
                default draws); one ``generator`` draws for every batch in turn.
            keep: indices into ``la.params`` whose posterior variance counts (e.g. the last
                block only); default: all.
        """
        if self._basis is not None and la.H is not self._basis:
            raise ValueError(
                "This cache holds Jacobian blocks in another posterior's eigenbasis (built "
                "with in_eigenbasis=True before a refit, or by another posterior); build a new "
                "LogitJacobianCache for this one."
            )
        out = []
        for f_mu, blocks, _ in self:
            blocks = [
                b.to(la._dtype)
                if keep is None or i in keep
                else b.new_zeros(b.shape, dtype=la._dtype)
                for i, b in enumerate(blocks)
            ]
            if self._basis is None:
                f_var = la._functional_variance_blocks(blocks)
            else:
                f_var = eigenbasis.variance(la, self._basis, blocks)
            out.append(apply_link(link_approx, f_mu.to(la._dtype), f_var, n_samples, generator))
        return torch.cat(out)
