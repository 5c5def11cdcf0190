"""``LoraFullLaplace``: dense GGN Laplace over LoRA matrices (``("lora", "full")``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compat import FullLaplace
from ..options import FisherType
from .diag import _reject_kron_options
from .mixin import LoraLaplaceMixin

__all__ = ["LoraFullLaplace"]


class LoraFullLaplace(LoraLaplaceMixin, FullLaplace):
    """Laplace-LoRA with the exact dense GGN (or Fisher) over the LoRA parameters.

    Memory is ``P x P``: for small adapters and as a reference. Arguments as
    :class:`~laplace_lora_ext.LoraKronLaplace` without the Kronecker options.
    """

    _key = ("lora", "full")
    _structure = "full"

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        *,
        fisher_type: FisherType = "exact",
        mc_samples: int = 1,
        adapter_name: str | None = None,
        include_extra_params: bool = False,
        lora_modules: str | None = None,
        seed: int | None = 0,
        **kron_only: Any,
    ) -> None:
        _reject_kron_options("full", kron_only)
        self._posterior_scale = None
        self._lora_init(
            super().__init__,
            model,
            likelihood,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            backend=backend,
            backend_kwargs=backend_kwargs,
            adapter_name=adapter_name,
            include_extra_params=include_extra_params,
            lora_modules=lora_modules,
            kfac_approx="expand",
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            factor_rank=None,
            rank_threshold=0,
            seed=seed,
            sigma_noise=sigma_noise,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
        )

    def _init_H(self) -> None:
        self.H = torch.zeros(self.n_params, self.n_params, device=self._device, dtype=self._dtype)

    def _fit(self, train_loader: Any, override: bool, progress_bar: bool) -> None:
        self._posterior_scale = None
        self._fit_loop(train_loader, override, progress_bar)

    def _check_curvature(self, H_batch: Any) -> None:
        if tuple(H_batch.shape) != (self.n_params, self.n_params):
            raise RuntimeError(
                f"Curvature matrix has shape {tuple(H_batch.shape)}, expected "
                f"({self.n_params}, {self.n_params})."
            )

    def _functional_variance_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        W = torch.cat(blocks, dim=-1)
        return torch.einsum("bcp,pq,bkq->bck", W, self.posterior_covariance, W)
