"""Grad-output vectors on the logits whose outer products give the Fisher / GGN.

For softmax cross-entropy, the loss Hessian w.r.t. the logits ``f`` of one example is
``Λ = diag(p) - p pᵀ``. Each function returns ``V`` of shape ``(K, B, C)`` such that
``Σ_k V_k[n] V_k[n]ᵀ`` equals (``"exact"``), estimates (``"mc"``), or replaces by the
empirical Fisher (``"empirical"``) ``Λ_n``.
"""

from __future__ import annotations

import torch

from ..lowrank.factor import compute_dtype
from ..options import FISHER_TYPES

__all__ = ["FISHER_TYPES", "grad_output_vectors"]


def grad_output_vectors(
    logits: torch.Tensor,
    y: torch.Tensor,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Vectors ``V`` ``(K, B, C)`` with ``Σ_k V_k V_kᵀ ≈ diag(p) - p pᵀ`` per example.

    * ``"exact"``: ``K = C``, ``V_c = sqrt(p_c) (e_c - p)`` (exact GGN).
    * ``"mc"``: ``K = mc_samples``, ``V_s = (p - e_{y_s}) / sqrt(S)``, ``y_s ~ Cat(p)``.
    * ``"empirical"``: ``K = 1``, ``V = p - e_y`` (empirical Fisher, uses the labels).
    """
    p = torch.softmax(logits.detach().to(compute_dtype(logits.dtype)), dim=-1)
    B, C = p.shape
    eye = torch.eye(C, dtype=p.dtype, device=p.device)
    if fisher_type == "exact":
        diff = eye.unsqueeze(1) - p.unsqueeze(0)  # (C, B, C): e_c - p
        return p.T.sqrt().unsqueeze(-1) * diff
    if fisher_type == "mc":
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
        draws = torch.multinomial(p, mc_samples, replacement=True, generator=generator)
        onehot = eye[draws.T]  # (S, B, C)
        return (p.unsqueeze(0) - onehot) / mc_samples**0.5
    if fisher_type == "empirical":
        return (p - eye[y]).unsqueeze(0)
    raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}.")
