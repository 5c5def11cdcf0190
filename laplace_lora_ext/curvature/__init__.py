"""LoRA-aware curvature: hook capture, grad-output vectors, KFAC roots, the backend."""

from .backend import DEFAULT_RANK_THRESHOLD, LoraCurvature

__all__ = ["LoraCurvature", "DEFAULT_RANK_THRESHOLD"]
