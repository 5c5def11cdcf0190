"""``optimize_prior_precision(method="gridsearch", val_loader=...)`` for the ``lora`` classes.

laplace-torch's validation grid, but each validation batch's logit Jacobian blocks are
computed once (:class:`~laplace_lora_ext.jacobian_cache.LogitJacobianCache`) and reused for
every grid value, so the grid costs one GLM pass instead of ``grid_size``; every value sees
the same Monte Carlo draws (common random numbers).
"""

from __future__ import annotations

import torch
import tqdm
from torch.utils.data import DataLoader

from ..jacobian_cache import LogitJacobianCache

__all__ = ["GridSearchMixin", "GRID_CACHE_BYTES"]

#: Validation Jacobian blocks larger than this are recomputed per grid value.
GRID_CACHE_BYTES = 2 * 1024**3


class GridSearchMixin:
    """The validation grid search (needs the Laplace attributes and ``_report_prior`` of
    :class:`~laplace_lora_ext.posterior.tuning.PriorTuningMixin`)."""

    def _optimize_gridsearch(
        self,
        val_loader: DataLoader | None,
        grid: torch.Tensor,
        link_approx: str,
        n_samples: int,
        progress_bar: bool,
        verbose: bool,
    ) -> None:
        if val_loader is None:
            raise ValueError(
                "method='gridsearch' needs val_loader=... (validation data); for a "
                "validation-free prior use the default (method='auto')."
            )
        self._check_H_init()
        cached = LogitJacobianCache(
            self, val_loader, max_bytes=GRID_CACHE_BYTES, in_eigenbasis=True, progress=progress_bar
        )
        if len(cached) == 0:
            raise ValueError(
                "method='gridsearch' got a val_loader that yielded no batches; pass a loader "
                "over at least one validation example. The prior was not changed."
            )
        labels = cached.labels
        scores = []
        for delta in tqdm.tqdm(grid.tolist(), disable=not progress_bar, desc="[Grid search]"):
            self.prior_precision = delta
            gen = torch.Generator(device=self._device).manual_seed(0)  # same draws per value
            scores.append(_mean_nll(cached.probs(self, link_approx, n_samples, gen), labels))
        best = int(torch.tensor(scores).nan_to_num(float("inf")).argmin())
        self.prior_precision = float(grid[best])
        self._report_prior("gridsearch", False, verbose, f"validation NLL {scores[best]:.4f}")


def _mean_nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of ``-log p[label]`` over ``probs`` ``(N, C)`` (floored at 1e-12)."""
    picked = probs.gather(1, labels.long().reshape(-1, 1).to(probs.device))
    return float(-picked.clamp_min(1e-12).log().mean())
