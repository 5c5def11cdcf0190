"""laplace-torch's curvlinops backends (``backend=CurvlinopsGGN`` / ``CurvlinopsEF``) on the
LoRA matrices, for ``hessian_structure="kron"``.

laplace-torch's LLM documentation passes these backends; here their KFAC (curvlinops'
``KFACLinearOperator``, with ``kfac_approx="expand" | "reduce"``) runs on exactly
``la.params``: each LoRA matrix is an ``nn.Linear``, and a trainable head inside PEFT's
``ModulesToSaveWrapper`` with ``include_extra_params=True`` works too. Its scaling is
laplace-torch's (a sum over the N examples), so without padding it equals
:class:`~laplace_lora_ext.LoraCurvature`'s KFAC to rounding. curvlinops does not know the
``attention_mask``: it would count padding tokens as inputs, so padded batches are refused
(``backend=None`` gives the same KFAC with padding excluded).

Everything else (the GLM predictive, Jacobians) still comes from ``LoraCurvature``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compat import CurvlinopsEF, CurvlinopsGGN, Kron
from ..inputs import attention_mask_of, forward_logits
from .backend import LoraCurvature

__all__ = ["StockKfacCurvature", "stock_fisher_type"]


def stock_fisher_type(backend: type) -> str | None:
    """The ``fisher_type`` a laplace-torch curvlinops backend computes (``None``: not one
    this module runs; ``CurvlinopsHessian`` and ASDL / BackPACK are refused elsewhere)."""
    if isinstance(backend, type) and issubclass(backend, CurvlinopsEF):
        return "empirical"
    if isinstance(backend, type) and issubclass(backend, CurvlinopsGGN):
        return "exact"
    return None


class _BatchCaller(nn.Module):
    """``forward(batch) -> logits (B, C)`` with this package's call convention (what the
    stock backend calls; its module names get a ``model.`` prefix, nothing else changes)."""

    def __init__(self, model: nn.Module, dict_key_y: str) -> None:
        super().__init__()
        self.model = model
        self.dict_key_y = dict_key_y

    def forward(self, x: Any) -> torch.Tensor:
        return forward_logits(self.model, x, self.dict_key_y)


class StockKfacCurvature(LoraCurvature):
    """``LoraCurvature`` whose ``kron`` is a laplace-torch curvlinops backend's KFAC.

    Args:
        stock_backend: ``laplace.curvature.CurvlinopsGGN`` or ``CurvlinopsEF``.
        other arguments: as :class:`~laplace_lora_ext.LoraCurvature`.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        *,
        stock_backend: type,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, likelihood, dict_key_x, dict_key_y, **kwargs)
        self.stock = stock_backend(
            _BatchCaller(model, dict_key_y),
            likelihood,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
        )
        self.stock.params = list(self.params)  # la.params, not every trainable parameter

    def kron(self, x: Any, y: torch.Tensor, N: int, **kwargs: Any) -> tuple[torch.Tensor, Kron]:
        """``(loss, Kron)`` of one batch from the stock backend, in ``la.params`` order."""
        mask = attention_mask_of(x)
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(
                f"backend={type(self.stock).__name__} counts padding tokens as inputs (curvlinops "
                "does not read the attention_mask), and this batch is padded. Use backend=None: "
                "the built-in LoraCurvature computes the same KFAC with padding excluded."
            )
        with torch.no_grad():
            logits = forward_logits(self.model, x, self.dict_key_y)
        y = self._check_labels(logits, y)
        self.n_outputs = logits.shape[-1]
        loss, H = self.stock.kron(x, y, N=N, kfac_approx=self.kfac_approx)
        kfacs = [[f.to(self.curvature_dtype) for f in F] for F in H.kfacs]
        return loss.detach().to(self.curvature_dtype), Kron(kfacs)


def resolve_stock_backend(
    backend: Any, structure: str, fisher_type: str, backend_kwargs: dict[str, Any] | None
) -> tuple[type | None, str]:
    """``(stock backend or None, fisher_type)`` for a ``backend=`` argument.

    Raises:
        ValueError: a curvlinops backend with ``diag``/``full``, with ``backend_kwargs``, or
            with a ``fisher_type`` other than the one it computes.
    """
    stock_type = stock_fisher_type(backend)
    if stock_type is None:
        return None, fisher_type
    name = backend.__name__
    if structure != "kron":
        raise ValueError(
            f"backend={name} is supported with hessian_structure='kron' only; for "
            f"{structure!r} leave backend=None and pass fisher_type={stock_type!r}."
        )
    if backend_kwargs:
        raise ValueError(
            f"backend_kwargs={backend_kwargs!r} are not supported with backend={name}; for a "
            "sampled Fisher leave backend=None and pass fisher_type='mc', mc_samples=..."
        )
    if fisher_type not in ("exact", stock_type):
        raise ValueError(
            f"backend={name} computes fisher_type={stock_type!r}, but fisher_type="
            f"{fisher_type!r} was given; give one of them."
        )
    return backend, stock_type
