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

__all__ = ["FISHER_TYPES", "exact_fisher_factor", "grad_output_vectors"]


def grad_output_vectors(
    logits: torch.Tensor,
    y: torch.Tensor,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Vectors ``V`` ``(K, B, C)`` with ``Σ_k V_k V_kᵀ ≈ diag(p) - p pᵀ`` per example.

    * ``"exact"``: ``K = C - 1`` columns of an exact factor of ``Λ`` (the exact GGN; see
      :func:`exact_fisher_factor`), so one backward pass fewer than classes.
    * ``"mc"``: ``K = mc_samples``, ``V_s = (p - e_{y_s}) / sqrt(S)``, ``y_s ~ Cat(p)``.
    * ``"empirical"``: ``K = 1``, ``V = p - e_y`` (empirical Fisher, uses the labels).
    """
    p = torch.softmax(logits.detach().to(compute_dtype(logits.dtype)), dim=-1)
    B, C = p.shape
    eye = torch.eye(C, dtype=p.dtype, device=p.device)
    if fisher_type == "exact":
        return exact_fisher_factor(p)
    if fisher_type == "mc":
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
        draws = torch.multinomial(p, mc_samples, replacement=True, generator=generator)
        onehot = eye[draws.T]  # (S, B, C)
        return (p.unsqueeze(0) - onehot) / mc_samples**0.5
    if fisher_type == "empirical":
        return (p - eye[y]).unsqueeze(0)
    raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}.")


def exact_fisher_factor(p: torch.Tensor) -> torch.Tensor:
    """``V`` ``(C - 1, B, C)`` with ``Σ_k V_k[n] V_k[n]ᵀ = diag(p_n) - p_n p_nᵀ`` exactly.

    ``Λ = D^{1/2} (I - q qᵀ) D^{1/2}`` with ``q = √p`` (a unit vector) and ``D = diag(p)``.
    The Householder reflection ``H`` that swaps ``q`` and ``e_m`` gives
    ``I - q qᵀ = H (I - e_m e_mᵀ) H``, so ``Λ = M Mᵀ`` with ``M = D^{1/2} H`` without its
    column ``m``: ``C - 1`` vectors where ``diag(√p)(I - p 1ᵀ)`` needs ``C`` (``Λ`` has
    rank ``C - 1``: ``Λ 1 = 0``). ``m`` is the least probable class, so
    ``‖q - e_m‖² = 2 - 2√p_m ≥ 2 - 2/√C`` stays away from 0.

    Args:
        p: class probabilities ``(B, C)``, ``C ≥ 2``.
    """
    B, C = p.shape
    q = p.sqrt()
    m = p.argmin(dim=-1)  # (B,)
    w = q.clone()
    w[torch.arange(B, device=p.device), m] -= 1.0  # q - e_m
    H = torch.eye(C, dtype=p.dtype, device=p.device) - 2.0 * (w.unsqueeze(-1) * w.unsqueeze(-2)) / (
        w * w
    ).sum(-1).reshape(B, 1, 1)
    M = q.unsqueeze(-1) * H  # (B, C, C): row i scaled by √p_i; column k = √p ⊙ H e_k
    keep = torch.ones(B, C, dtype=torch.bool, device=p.device)
    keep[torch.arange(B, device=p.device), m] = False
    cols = M.transpose(1, 2)[keep].reshape(B, C - 1, C)  # (B, C - 1, C): kept columns
    return cols.transpose(0, 1).contiguous()
