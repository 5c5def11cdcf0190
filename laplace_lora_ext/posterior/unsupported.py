"""Clear errors for ``hessian_structure`` values laplace-torch has but LoRA does not.

laplace-torch's ``Laplace`` factory looks classes up by ``_key`` and, for a pair it does not
know, raises "Unsupported Laplace combination: lora, lowrank." without a hint. Its factory
offers no other hook, so the pairs a laplace-torch user is likely to try are registered
here as classes whose constructor raises a ``ValueError`` that names the fix.
"""

from __future__ import annotations

from typing import Any, NoReturn

from laplace.baselaplace import BaseLaplace

__all__ = ["LoraLowRankLaplace", "LoraGPLaplace"]

_SUPPORTED = "hessian_structure='kron' (the default), 'diag' or 'full'"


class LoraLowRankLaplace(BaseLaplace):
    """``("lora", "lowrank")``: raises; low-rank curvature is ``kron`` with ``factor_rank``."""

    _key = ("lora", "lowrank")

    def __init__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(
            "subset_of_weights='lora' has no hessian_structure='lowrank'. For low-rank "
            "curvature use hessian_structure='kron' with factor_rank=<int> (low-rank Kronecker "
            f"factors; 'auto' is the default). Supported: {_SUPPORTED}."
        )


class LoraGPLaplace(BaseLaplace):
    """``("lora", "gp")``: raises; the function-space Laplace needs all weights."""

    _key = ("lora", "gp")

    def __init__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(
            "subset_of_weights='lora' has no hessian_structure='gp' (laplace-torch's "
            f"function-space Laplace covers all weights). Supported: {_SUPPORTED}."
        )
