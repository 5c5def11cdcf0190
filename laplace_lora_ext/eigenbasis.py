"""Logit Jacobian blocks in a Kronecker posterior's eigenbasis: many priors, one rotation.

Prior searches (``gridsearch`` and the leave-one-out rule) score one set of Jacobian blocks
at dozens of prior precisions. For a dense KFAC block the posterior precision is
``s (G ⊗ A) + δ I = U diag(s λ + δ) Uᵀ`` with ``U = Q_G ⊗ Q_A`` and ``λ = λ_G ⊗ λ_A``
(``s``: ``la._H_factor``, the temperature and noise scale), so the block's share of the
functional variance of a Jacobian block ``W`` ``(B, C, d_out·d_in)`` is

    W Σ Wᵀ = R diag(1 / (s λ + δ)) Rᵀ,    R = W U,

and ``R`` depends on neither ``δ`` nor ``s``. Rotating once costs what one prior value
costs in :meth:`LoraKronLaplace._functional_variance_blocks
<laplace_lora_ext.LoraKronLaplace._functional_variance_blocks>` (``O(B C p (d_out + d_in))``
per block); each further value then costs ``O(B C² p)``.

Only dense, undamped Kronecker posteriors have this form: with ``damping=True`` the
eigenvalues are ``(λ_G + √δ)(λ_A + √δ)``, low-rank factors (large sides under
``factor_rank="auto"``) add a complement with eigenvalue ``δ`` (not handled here), a diagonal
posterior needs no rotation and a full one has a per-tensor prior that does not commute
with its eigenbasis. :func:`supports` says which; callers fall back to the blocks as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .compat import KronDecomposed

__all__ = ["supports", "rotate", "variance"]


def supports(la: Any) -> bool:
    """Whether ``la``'s curvature is an undamped ``KronDecomposed`` with dense factors only
    (square eigenvector matrices; ``factor_rank="auto"`` keeps a factor dense up to a side
    of 2048 while the dense factors fit its memory budget, :mod:`laplace_lora_ext.lowrank.auto`),
    see the module docstring."""
    H = getattr(la, "H", None)
    if not isinstance(H, KronDecomposed) or getattr(la, "damping", False):
        return False
    return all(Q.ndim == 2 and Q.shape[0] == Q.shape[1] for Qs in H.eigenvectors for Q in Qs)


def rotate(H: KronDecomposed, blocks: list[Tensor]) -> list[Tensor]:
    """``R_l = W_l U_l`` ``(B, C, p_l)`` for each block ``W_l`` ``(B, C, p_l)``, where ``U_l``
    holds the eigenvectors of ``H``'s ``l``-th Kronecker block (``Q_G ⊗ Q_A``, or ``Q``)."""
    rotated = []
    for W, Qs in zip(blocks, H.eigenvectors, strict=True):
        if len(Qs) == 1:
            rotated.append(W @ Qs[0].to(W))
            continue
        Q_out, Q_in = (Q.to(W) for Q in Qs)
        B, C, _ = W.shape
        W4 = W.reshape(B, C, len(Q_out), len(Q_in))
        rotated.append(torch.einsum("bcoi,oa,ij->bcaj", W4, Q_out, Q_in).reshape(B, C, -1))
    return rotated


def _spectrum(eigenvalues: list[Tensor]) -> Tensor:
    """``λ_G ⊗ λ_A`` flattened ``(p,)`` (row-major, like the rotated block), or ``λ``."""
    if len(eigenvalues) == 1:
        return eigenvalues[0]
    return torch.outer(eigenvalues[0], eigenvalues[1]).reshape(-1)


def variance(la: Any, H: KronDecomposed, rotated: list[Tensor]) -> Tensor:
    """Functional variance ``(B, C, C)`` of ``la`` at its current prior precision and
    ``_H_factor`` from blocks rotated by :func:`rotate` with the same ``H``."""
    deltas = la.prior_precision.reshape(-1).to(la._dtype)
    deltas = deltas.expand(len(rotated)) if len(deltas) == 1 else deltas
    f_var = None
    for R, lam, delta in zip(rotated, H.eigenvalues, deltas, strict=True):
        weight = 1.0 / (la._H_factor * _spectrum(lam).to(R) + delta)
        contrib = torch.einsum("bkp,p,blp->bkl", R, weight, R)
        f_var = contrib if f_var is None else f_var + contrib
    return f_var
