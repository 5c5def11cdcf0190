"""Brute-force references: explicit Jacobians, exact GGN, KFAC by explicit loops."""

from __future__ import annotations

import torch

from laplace_lora_ext.inputs import forward_logits


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


def kfac_reference(model, batch, modules, n_data: int, approx: str):
    """[G, A] per module by the formulas of Eschenhagen et al. (explicit loops over n, t)."""
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


def _sandwich(Jt: torch.Tensor, Lam: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Jtᵀ Λ Jt for ``Jt`` ``(C, d)``, in the centred form (see :func:`exact_ggn`)."""
    p = torch.softmax(logits, dim=-1)
    Jc = Jt - p @ Jt
    return torch.einsum("c,cp,cq->pq", p, Jc, Jc)
