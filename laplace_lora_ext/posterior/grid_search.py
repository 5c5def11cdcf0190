"""``optimize_prior_precision(method="gridsearch", val_loader=...)`` for the ``lora`` classes.

laplace-torch's validation grid, but each validation batch's logit Jacobian blocks are
computed once (:class:`~laplace_lora_ext.jacobian_cache.LogitJacobianCache`) and reused for
every grid value, so the grid costs one GLM pass instead of ``grid_size``; every value sees
the same Monte Carlo draws (common random numbers). In a data-parallel run the validation
NLL is summed over the ranks' batches (a sharded loader without its sampler's padded
duplicates) before the best value is chosen, so every rank chooses the same prior whether
the loader is sharded or the same on every rank.
"""

from __future__ import annotations

import torch
import tqdm
from torch.utils.data import DataLoader

from .. import distributed
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
        error, cached = None, None
        try:
            cached = LogitJacobianCache(
                self, distributed.shard_batches(val_loader, self.dict_key_y),
                max_bytes=GRID_CACHE_BYTES, in_eigenbasis=True, progress=progress_bar,
            )  # fmt: skip
        except Exception as e:  # this rank's validation batches; raised on every rank
            error = e
        if distributed.is_distributed():
            distributed.agree(error, "reading the validation data")
        elif error is not None:
            raise error
        totals = self._grid_nll_totals(cached, grid, link_approx, n_samples, progress_bar)
        if not totals[-1] > 0:
            raise ValueError(
                "method='gridsearch' got a val_loader that yielded no batches; pass a loader "
                "over at least one validation example. The prior was not changed."
            )
        scores = (totals[:-1] / totals[-1]).tolist()
        best = int(torch.tensor(scores).nan_to_num(float("inf")).argmin())
        self.prior_precision = float(grid[best])
        self._report_prior("gridsearch", False, verbose, f"validation NLL {scores[best]:.4f}")

    def _grid_nll_totals(
        self,
        cached: LogitJacobianCache,
        grid: torch.Tensor,
        link_approx: str,
        n_samples: int,
        progress_bar: bool,
    ) -> torch.Tensor:
        """``(G + 1,)`` float64: the summed validation NLL at each of the ``G`` grid values,
        then the number of examples, summed over ranks in a data-parallel run (a sharded
        validation loader scores all of its shards; a rank's shard may be empty)."""
        totals = torch.zeros(len(grid) + 1, dtype=torch.float64)
        error = None
        try:
            if len(cached):
                labels = cached.labels
                for i, delta in enumerate(
                    tqdm.tqdm(grid.tolist(), disable=not progress_bar, desc="[Grid search]")
                ):
                    self.prior_precision = delta
                    gen = torch.Generator(device=self._device).manual_seed(0)  # same draws
                    probs = cached.probs(self, link_approx, n_samples, gen)
                    totals[i] = _sum_nll(probs, labels)
                totals[-1] = len(labels)
        except Exception as e:  # raised on every rank below, before the all-reduce
            error = e
        if not distributed.is_distributed():
            if error is not None:
                raise error
            return totals
        distributed.agree(error, "scoring the validation grid")
        totals = totals.to(self._device)
        torch.distributed.all_reduce(totals)
        return totals.cpu()


def _sum_nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of ``-log p[label]`` over ``probs`` ``(N, C)`` (floored at 1e-12), in float64."""
    picked = probs.gather(1, labels.long().reshape(-1, 1).to(probs.device))
    return float(-picked.double().clamp_min(1e-12).log().sum())
