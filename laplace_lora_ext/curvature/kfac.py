"""Kronecker-factor contributions of one batch, as row matrices ("roots").

For a target layer with inputs ``a`` ``(B, T, d_in)``, token weights ``w`` ``(B, T)``
(1 = real token) and output gradients ``g_k`` ``(B, T, d_out)`` for the grad-output
vectors ``k = 1..K``, KFAC (laplace-torch scaling: the curvature is a *sum* over the N
examples; the input factor is normalised by N) is ``G ⊗ A`` with

* expand: ``A = Σ_n 1/(N T_n) Σ_t a aᵀ``,      ``G = Σ_{k,n,t} g gᵀ``
* reduce: ``A = Σ_n 1/(N T_n²) (Σ_t a)(Σ_t a)ᵀ``, ``G = Σ_{k,n} (Σ_t g)(Σ_t g)ᵀ``

(Eschenhagen et al. 2023), ``T_n`` = number of real tokens of example n. Each factor is
returned as a root ``R`` ``(m, d)`` with factor ``= Rᵀ R``, so that large factors can be
compressed to low rank without ever forming ``d x d``.

Of the real tokens (``w = 1``), :func:`reaching_weights` keeps only the positions whose
output reaches the logits (``g`` above round-off for some ``k``; ``T_n`` counts those). For
a layer whose output is read at one position only (the last block's query projection
behind a last-token head, a head applied to every position before one is picked), ``A`` is
then that position's ``a aᵀ`` and KFAC equals the exact GGN block for one example, instead
of mixing in inputs that carry no curvature. Layers whose gradients stay above the cut-off
at every position are unchanged.
"""

from __future__ import annotations

import torch

from ..options import KFAC_APPROX

__all__ = ["input_root", "output_root", "reaching_weights", "KFAC_APPROX"]


def input_root(a: torch.Tensor, w: torch.Tensor, n_data: int, approx: str) -> torch.Tensor:
    """Root ``(m, d_in)`` of the input factor ``A`` of one batch.

    Args:
        a: layer inputs ``(B, T, d_in)``.
        w: token weights ``(B, T)`` (0 for padding).
        n_data: N, the size of the whole training set.
        approx: ``"expand"`` or ``"reduce"``.
    """
    a = a.to(w.dtype)
    T_n = w.sum(dim=1).clamp_min(1.0)  # (B,)
    if approx == "expand":
        scale = (w / (n_data * T_n.unsqueeze(1))).sqrt()  # (B, T)
        rows = (a * scale.unsqueeze(-1)).reshape(-1, a.shape[-1])
        return rows[w.reshape(-1) > 0]
    if approx == "reduce":
        summed = (a * w.unsqueeze(-1)).sum(dim=1)  # (B, d_in)
        return summed / (T_n.unsqueeze(1) * n_data**0.5)
    raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {approx!r}.")


def output_root(g: torch.Tensor, approx: str) -> torch.Tensor:
    """Root ``(m, d_out)`` of one grad-output vector's contribution to ``G``.

    Args:
        g: output gradients ``(B, T, d_out)`` for one grad-output vector.
        approx: ``"expand"`` (every token a row) or ``"reduce"`` (token sum per example).
    """
    if approx == "expand":
        return g.reshape(-1, g.shape[-1])
    if approx == "reduce":
        return g.sum(dim=1)
    raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {approx!r}.")


#: A position reaches the output if its largest output gradient exceeds this fraction of
#: the sequence's largest: 16 float32 epsilons, whatever the model's dtype. Positions that do
#: not reach it (a first token's query, which attends to itself alone) get exact zeros or
#: round-off of a few float32 epsilons. One cut-off for every dtype keeps a float32 copy of a
#: model and its float64 original on the same positions: float32 cannot tell a gradient this
#: small from round-off, so genuine ones below it (very peaked attention) are dropped in both;
#: their share of the curvature is below (2e-6)².
REACH_RTOL = 16 * torch.finfo(torch.float32).eps


def reaching_weights(w: torch.Tensor, grad_size: torch.Tensor | None) -> torch.Tensor:
    """Token weights ``(B, T)`` restricted to the positions that reach the output.

    Args:
        w: 0/1 weights of real tokens ``(B, T)``.
        grad_size: ``(B, T')`` the largest ``|g|`` at each position over all grad-output
            vectors. If it is ``None`` or ``T'`` differs from ``T``, nothing is restricted.

    A position is kept if its ``grad_size`` exceeds :data:`REACH_RTOL` times its sequence's
    largest. A sequence none of whose real tokens is reached (a saturated softmax whose
    gradients underflow to zero) keeps all of them: it adds nothing to ``G`` and its input
    factor is what it was without the restriction.
    """
    if grad_size is None or grad_size.shape != w.shape:
        return w
    largest = grad_size.amax(dim=1, keepdim=True)
    kept = w * (grad_size > REACH_RTOL * largest).to(w.dtype)
    none = kept.sum(dim=1, keepdim=True) == 0
    return torch.where(none, w, kept)


def drop_zero_rows(rows: torch.Tensor) -> torch.Tensor:
    """Remove all-zero rows (padding, positions that do not reach the output)."""
    keep = rows.abs().amax(dim=1) > 0
    return rows if bool(keep.all()) else rows[keep]
