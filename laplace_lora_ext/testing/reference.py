"""Brute-force references ("dense twins"): explicit Jacobians, the exact GGN, KFAC by
explicit loops, dense Kronecker factors and the relative error they are compared with.

Every numerical path of the package is checked against these on tiny float64 models
(``tests/``); ``benchmarks/`` use the same functions on small models. They are slow
(one autograd call per example and output) and dense on purpose: nothing here is clever.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from laplace_lora_ext.inputs import forward_logits

__all__ = [
    "rel",
    "softmax_hessian",
    "explicit_jacobians",
    "exact_ggn",
    "exact_ggn_blocks",
    "ggn_from_jacobians",
    "layer_io_jacobians",
    "kfac_reference",
    "dense_kron_factors",
    "kron_block_dense",
    "kron_frobenius",
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ``||a - b|| / ||b||``, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------- exact GGN
def softmax_hessian(logits: torch.Tensor) -> torch.Tensor:
    """Λ_n = diag(p) - p pᵀ, ``(N, C, C)``."""
    p = torch.softmax(logits, dim=-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def explicit_jacobians(model, batch, params) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, C)`` and Jacobians ``(N, C, P)``, one autograd call per entry."""
    logits = forward_logits(model, batch)
    N, C = logits.shape
    J = torch.zeros(N, C, sum(p.numel() for p in params), dtype=logits.dtype)
    for n in range(N):
        for c in range(C):
            grads = torch.autograd.grad(logits[n, c], params, retain_graph=True, allow_unused=True)
            J[n, c] = torch.cat(
                [
                    torch.zeros(p.numel(), dtype=logits.dtype) if g is None else g.flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
    return logits.detach(), J


def exact_ggn(model, batch, params) -> torch.Tensor:
    """Σ_n J_nᵀ Λ_n J_n ``(P, P)`` from explicit Jacobians.

    Evaluated as ``Σ_n Σ_c p_c J̃_cᵀ J̃_c`` with the centred Jacobian ``J̃ = J - pᵀJ``
    (the same matrix, since Λ = Σ_c p_c (e_c - p)(e_c - p)ᵀ), which avoids the
    cancellation of ``Jᵀ diag(p) J - (pᵀJ)ᵀ(pᵀJ)`` when the rows of J are nearly equal.
    """
    logits, J = explicit_jacobians(model, batch, params)
    return ggn_from_jacobians(logits, J)


def ggn_from_jacobians(logits: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """Σ_n J_nᵀ Λ_n J_n for logits ``(N, C)`` and Jacobians ``(N, C, P)`` (centred form)."""
    p = torch.softmax(logits, dim=-1)
    Jc = J - torch.einsum("nc,ncp->np", p, J).unsqueeze(1)
    return torch.einsum("nc,ncp,ncq->pq", p, Jc, Jc)


def exact_ggn_blocks(model, batch, params) -> list[torch.Tensor]:
    """Diagonal blocks of :func:`exact_ggn`, one ``(P_i, P_i)`` float64 block per parameter
    tensor (only the blocks are formed: the full ``(P, P)`` matrix is never built)."""
    logits, J = explicit_jacobians(model, batch, params)
    J = J.double()
    p = torch.softmax(logits.double(), dim=-1)
    Jc = J - torch.einsum("nc,ncp->np", p, J).unsqueeze(1)
    blocks, cur = [], 0
    for prm in params:
        sl = Jc[:, :, cur : cur + prm.numel()]
        blocks.append(torch.einsum("nc,ncp,ncq->pq", p, sl, sl))
        cur += prm.numel()
    return blocks


# ---------------------------------------------------------------------- KFAC by loops
def layer_io_jacobians(model, batch, modules):
    """Per module: inputs ``(N, T, d_in)`` and output Jacobians ``(N, C, T, d_out)``."""
    inputs, outputs = {}, {}

    def hook(i):
        def f(mod, args, out):
            inputs[i] = args[0] if args[0].ndim == 3 else args[0].unsqueeze(1)
            outputs[i] = out

        return f

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    logits = forward_logits(model, batch)
    for h in handles:
        h.remove()
    N, C = logits.shape
    jacs = []
    for i in range(len(modules)):
        out = outputs[i]
        J = torch.zeros(N, C, *out.reshape(N, -1, out.shape[-1]).shape[1:], dtype=logits.dtype)
        for n in range(N):
            for c in range(C):
                (g,) = torch.autograd.grad(logits[n, c], out, retain_graph=True)
                J[n, c] = g.reshape(N, -1, g.shape[-1])[n]
        jacs.append(J)
    return logits.detach(), [inputs[i].detach() for i in range(len(modules))], jacs


def kfac_reference(model, batch, modules, n_data: int, approx: str, reaching_only: bool = True):
    """[G, A] per module by the formulas of Eschenhagen et al. (explicit loops over n, t),
    over the real positions whose output reaches the logits (see ``curvature.kfac``), or
    over all real positions (``reaching_only=False``: the textbook rule, as ASDL and
    curvlinops compute it)."""
    logits, inputs, jacs = layer_io_jacobians(model, batch, modules)
    Lam = softmax_hessian(logits)
    mask = batch["attention_mask"]
    result = []
    for a, J in zip(inputs, jacs, strict=True):
        N, T, d_in = a.shape
        d_out = J.shape[-1]
        G = torch.zeros(d_out, d_out, dtype=a.dtype)
        A = torch.zeros(d_in, d_in, dtype=a.dtype)
        for n in range(N):
            real = [t for t in range(T) if (mask.shape[1] != T or mask[n, t] == 1)]
            real = reaching_positions(real, J[n], logits[n]) if reaching_only else real
            Tn = len(real)
            if approx == "expand":
                for t in range(T):
                    G += _sandwich(J[n, :, t], Lam[n], logits[n])
                for t in real:
                    A += torch.outer(a[n, t], a[n, t]) / (n_data * Tn)
            else:
                Js = J[n].sum(dim=1)  # (C, d_out)
                G += _sandwich(Js, Lam[n], logits[n])
                s = sum(a[n, t] for t in real)
                A += torch.outer(s, s) / (n_data * Tn**2)
        result.append([G, A])
    return result


def reaching_positions(positions: list[int], Jn: torch.Tensor, logits: torch.Tensor) -> list[int]:
    """The ``positions`` whose layer output moves the class probabilities: the centred
    Jacobian ``(C, T, d_out)`` above ``REACH_RTOL`` of its largest entry (the rule of
    ``curvature.kfac.reaching_weights``); all of them if none does."""
    from laplace_lora_ext.curvature.kfac import REACH_RTOL

    p = torch.softmax(logits, dim=-1)
    Jc = Jn - torch.einsum("c,ctd->td", p, Jn)
    size = Jc.abs().amax(dim=(0, 2))  # (T,)
    reached = [t for t in positions if bool(size[t] > REACH_RTOL * size.max())]
    return reached or positions


def _sandwich(Jt: torch.Tensor, Lam: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Jtᵀ Λ Jt for ``Jt`` ``(C, d)``, in the centred form (see :func:`exact_ggn`)."""
    p = torch.softmax(logits, dim=-1)
    Jc = Jt - p @ Jt
    return torch.einsum("c,cp,cq->pq", p, Jc, Jc)


# ---------------------------------------------------------------------- dense Kronecker
def dense_kron_factors(
    kron: Any, dtype: torch.dtype | None = torch.float64
) -> list[list[torch.Tensor]]:
    """Every block's factors as dense, detached copies in ``dtype`` (``None``: as stored).

    ``kron`` is laplace-torch's ``Kron`` or our ``LowRankKron`` (``.kfacs``: per block
    ``[G (out, out), A (in, in)]`` or ``[D]``); a low-rank factor is expanded with
    ``to_dense()`` and a diagonal ``(d,)`` one to ``(d, d)``. Small sides only.
    """
    from laplace_lora_ext.lowrank import LowRankFactor

    out = []
    for F in kron.kfacs:
        row = []
        for f in F:
            d = f.to_dense() if isinstance(f, LowRankFactor) else f
            d = torch.diag(d) if d.ndim == 1 else d
            row.append(d.detach().to(dtype or d.dtype).clone())
        out.append(row)
    return out


def kron_block_dense(F: list[torch.Tensor]) -> torch.Tensor:
    """One block ``G ⊗ A`` (or the lone factor of a one-factor block) as a dense matrix."""
    return F[0] if len(F) == 1 else torch.kron(F[0], F[1])


def kron_frobenius(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> tuple[float, float]:
    """``(||a - b||_F, ||b||_F)`` for block-diagonal Kronecker matrices given factor-wise
    (``<X⊗Y, X'⊗Y'> = <X,X'><Y,Y'>``; never forms a Kronecker product)."""

    def inner(F: list[torch.Tensor], G: list[torch.Tensor]) -> float:
        v = 1.0
        for x, y in zip(F, G, strict=True):
            v *= float((x * y).sum())
        return v

    diff2, norm2 = 0.0, 0.0
    for F, G in zip(a, b, strict=True):
        ff, gg, fg = inner(F, F), inner(G, G), inner(F, G)
        diff2 += ff + gg - 2 * fg
        norm2 += gg
    return math.sqrt(max(diff2, 0.0)), math.sqrt(norm2)
