"""The ``subset_of_weights="lora"`` Laplace classes (one per Hessian structure)."""

from .diag import LoraDiagLaplace
from .full import LoraFullLaplace
from .kron import LoraKronLaplace

__all__ = ["LoraKronLaplace", "LoraDiagLaplace", "LoraFullLaplace"]
