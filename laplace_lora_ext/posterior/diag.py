"""``LoraDiagLaplace``: diagonal GGN Laplace over LoRA matrices (``("lora", "diag")``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compat import DiagLaplace
from ..curvature import DEFAULT_RANK_THRESHOLD
from ..options import FisherType
from .mixin import LoraLaplaceMixin

__all__ = ["LoraDiagLaplace"]


class LoraDiagLaplace(LoraLaplaceMixin, DiagLaplace):
    """Laplace-LoRA with the exact GGN (or Fisher) diagonal over the LoRA parameters.

    Arguments as :class:`~laplace_lora_ext.LoraKronLaplace` without the Kronecker options.
    """

    _key = ("lora", "diag")
    _structure = "diag"

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
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        fisher_type: FisherType = "exact",
        mc_samples: int = 1,
        adapter_name: str | None = None,
        include_extra_params: bool = False,
        lora_modules: str | None = None,
        seed: int | None = 0,
        **kron_only: Any,
    ) -> None:
        _reject_kron_options("diag", kron_only)
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
            asdl_fisher_kwargs=asdl_fisher_kwargs,
        )

    def _init_H(self) -> None:
        self.H = torch.zeros(self.n_params, device=self._device, dtype=self._dtype)

    def _check_curvature(self, H_batch: Any) -> None:
        if tuple(H_batch.shape) != (self.n_params,):
            raise RuntimeError(
                f"Curvature diagonal has shape {tuple(H_batch.shape)}, expected ({self.n_params},)."
            )

    def _functional_variance_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        variance = self.posterior_variance
        f_var, offset = None, 0
        for W in blocks:
            p = W.shape[-1]
            var = variance[offset : offset + p]
            contrib = torch.einsum("bcp,p,bkp->bck", W, var, W)
            f_var = contrib if f_var is None else f_var + contrib
            offset += p
        return f_var


_KRON_DEFAULTS = {
    "kfac_approx": "expand",
    "factor_rank": None,
    "damping": False,
    "rank_threshold": DEFAULT_RANK_THRESHOLD,
}


def _reject_kron_options(structure: str, options: dict[str, Any]) -> None:
    """Clear error for Kronecker-only keywords (non-default) passed to diag/full."""
    unknown = sorted(k for k in options if k not in _KRON_DEFAULTS)
    if unknown:
        raise TypeError(
            f"Unexpected keyword arguments for hessian_structure={structure!r}: {unknown}."
        )
    bad = {
        k: v
        for k, v in options.items()
        if k in _KRON_DEFAULTS
        and v != _KRON_DEFAULTS[k]
        and not (k == "factor_rank" and v == "auto")  # the kron default: nothing to reject
        and not (k == "kfac_approx" and v is None)  # likewise
    }
    if bad:
        raise ValueError(
            f"{sorted(bad)} only apply to hessian_structure='kron', not {structure!r} "
            f"(got {bad}); remove them or use hessian_structure='kron'."
        )
