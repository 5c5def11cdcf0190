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

Low-rank factors (large sides under ``factor_rank="auto"``) leave a complement of the
eigenvectors' span where the precision is ``δ``: ``W Σ Wᵀ`` gains ``W (I - U Uᵀ) Wᵀ / δ``.
:func:`rotate` appends a ``C``-column factor of that ``(C, C)`` Gram matrix per example, as
directions of eigenvalue 0, so the same re-weighting covers it. Only undamped Kronecker
posteriors have this form: with ``damping=True`` the eigenvalues are ``(λ_G + √δ)(λ_A + √δ)``,
a diagonal posterior needs no rotation and a full one has a per-tensor prior that does not
commute with its eigenbasis. :func:`supports` says which; callers fall back to the blocks as
they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .compat import KronDecomposed

__all__ = ["supports", "rotate", "variance"]


def supports(la: Any) -> bool:
    """Whether ``la``'s curvature is an undamped ``KronDecomposed`` (dense or low-rank
    factors), see the module docstring."""
    H = getattr(la, "H", None)
    return isinstance(H, KronDecomposed) and not getattr(la, "damping", False)


def rotate(H: KronDecomposed, blocks: list[Tensor]) -> list[Tensor]:
    """``R_l = W_l U_l`` ``(B, C, k_l)`` for each block ``W_l`` ``(B, C, p_l)``, where ``U_l``
    ``(p_l, k_l)`` holds the eigenvectors of ``H``'s ``l``-th Kronecker block (``Q_G ⊗ Q_A``,
    or ``Q``). If they do not span the block (low-rank factors, ``k_l < p_l``), ``C`` columns
    ``L`` with ``L Lᵀ = W (I - U Uᵀ) Wᵀ`` follow: the complement, whose eigenvalue is 0
    (:func:`variance` pads the spectrum with zeros for them)."""
    rotated = []
    for W, Qs in zip(blocks, H.eigenvectors, strict=True):
        B, C, p = W.shape
        if len(Qs) == 1:
            R = W @ Qs[0].to(W)
        else:
            Q_out, Q_in = (Q.to(W) for Q in Qs)
            W4 = W.reshape(B, C, len(Q_out), len(Q_in))
            R = torch.einsum("bcoi,oa,ij->bcaj", W4, Q_out, Q_in).reshape(B, C, -1)
        if R.shape[-1] < p:
            R = torch.cat([R, _complement_factor(W, R)], dim=-1)
        rotated.append(R)
    return rotated


def _complement_factor(W: Tensor, R: Tensor) -> Tensor:
    """``L`` ``(B, C, C)`` with ``L Lᵀ = W Wᵀ - R Rᵀ`` (in float64; eigenvalues that rounding
    made negative are set to 0)."""
    gram = W.double() @ W.double().mT - R.double() @ R.double().mT
    e, V = torch.linalg.eigh(gram)
    return (V * e.clamp_min(0).sqrt().unsqueeze(-2)).to(W)


def _spectrum(eigenvalues: list[Tensor], width: int) -> Tensor:
    """``λ_G ⊗ λ_A`` flattened (row-major, like the rotated block), or ``λ``, padded with
    zeros to ``width`` (the complement columns of :func:`rotate`)."""
    lam = eigenvalues[0] if len(eigenvalues) == 1 else torch.outer(*eigenvalues).reshape(-1)
    return torch.cat([lam, lam.new_zeros(width - len(lam))])


def variance(la: Any, H: KronDecomposed, rotated: list[Tensor]) -> Tensor:
    """Functional variance ``(B, C, C)`` of ``la`` at its current prior precision and
    ``_H_factor`` from blocks rotated by :func:`rotate` with the same ``H``."""
    deltas = la.prior_precision.reshape(-1).to(la._dtype)
    deltas = deltas.expand(len(rotated)) if len(deltas) == 1 else deltas
    f_var = None
    for R, lam, delta in zip(rotated, H.eigenvalues, deltas, strict=True):
        weight = 1.0 / (la._H_factor * _spectrum(lam, R.shape[-1]).to(R) + delta)
        contrib = torch.einsum("bkp,p,blp->bkl", R, weight, R)
        f_var = contrib if f_var is None else f_var + contrib
    return f_var
