"""The ``subset_of_weights="lora"`` Laplace classes (one per Hessian structure)."""

from .diag import LoraDiagLaplace
from .full import LoraFullLaplace
from .kron import LoraKronLaplace
from .unsupported import LoraGPLaplace, LoraLowRankLaplace  # noqa: F401  (registers _keys)

__all__ = ["LoraKronLaplace", "LoraDiagLaplace", "LoraFullLaplace"]
