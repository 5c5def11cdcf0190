"""laplace-lora-ext: Laplace-LoRA for laplace-torch.

Importing this package registers ``subset_of_weights="lora"`` with laplace-torch, so that
``laplace.Laplace(peft_model, "classification", subset_of_weights="lora",
hessian_structure="kron" | "diag" | "full")`` returns a posterior over the LoRA matrices.
"""

from .curvature import LoraCurvature
from .evaluation import (
    calibration_bins,
    choice_token_ids,
    classification_metrics,
    evaluate,
    reliability_diagram,
)
from .posterior import LoraDiagLaplace, LoraFullLaplace, LoraKronLaplace
from .targets import collect_targets
from .wrappers import LastTokenChoiceLM, SequenceClassifier

__version__ = "0.1.0"

__all__ = [
    "LoraKronLaplace",
    "LoraDiagLaplace",
    "LoraFullLaplace",
    "LoraCurvature",
    "LastTokenChoiceLM",
    "SequenceClassifier",
    "collect_targets",
    "evaluate",
    "classification_metrics",
    "calibration_bins",
    "reliability_diagram",
    "choice_token_ids",
]
