"""Link approximations: from a Gaussian over logits ``N(f_mu, f_var)`` to class probabilities.

All functions take ``f_mu`` ``(B, C)`` and ``f_var`` ``(B, C, C)`` and return ``(B, C)``
probabilities.

* ``"mc"``: joint Monte Carlo over the logits (Cholesky factor of each ``C x C``
  covariance), averaging softmax *probabilities*.
* ``"mc_indep"``: Monte Carlo with the diagonal of ``f_var`` only (the paper's "MC indep").

Both Monte Carlo links draw antithetic pairs (``z`` and ``-z``; :func:`antithetic_normal`).
The estimate stays unbiased, and with two classes and an even ``n_samples`` its argmax is
the MAP's, as is the exact integral's: ``σ(m + a) + σ(m - a) > 1`` iff ``m > 0`` (float64
can only tie the two, when both draws of a pair saturate the softmax).
Plain draws flip near-tied examples at random when the logit variance is large (measured
on a memorised adapter: 7 of 100 validation answers with 100 samples, 2.6 with 1000;
``benchmarks/mc_antithetic_check.py``).
* ``"probit"``: ``softmax(f_mu / sqrt(1 + π/8 diag(f_var)))``.
* ``"bridge"`` / ``"bridge_norm"``: the Laplace bridge to a Dirichlet (Hobbhahn et al.,
  2022), optionally with the variance normalisation; returns the Dirichlet mean.

Why not laplace-torch's own (``BaseLaplace._glm_forward_call``, 0.3): there they are
methods of a fitted ``Laplace`` object, not functions of ``(f_mu, f_var)``; its "mc" samples
through ``torch.linalg.cholesky``, which raises on the singular (PSD) logit covariances a
LoRA posterior gives (e.g. when a logit does not depend on the adapters), reuses one normal
draw for every example of the batch, and drops the caller's ``generator``; its bridge
updates ``f_mu`` and ``f_var`` in place and fills NaN rows with 1 (not ``1/C``); and the
paper's "MC indep" is missing. The formulas are short, and each is tested against a
brute-force reference (``tests/test_links.py``).
"""

from __future__ import annotations

import math

import torch

from .options import LINK_APPROXIMATIONS

__all__ = [
    "LINK_APPROXIMATIONS",
    "antithetic_normal",
    "apply_link",
    "probit",
    "laplace_bridge",
    "mc_joint",
    "mc_indep",
]


def probit(f_mu: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
    """Probit (extended MacKay) approximation of ``E[softmax(f)]``."""
    kappa = (1.0 + math.pi / 8.0 * f_var.diagonal(dim1=-2, dim2=-1)).rsqrt()
    return torch.softmax(kappa * f_mu, dim=-1)


def laplace_bridge(
    f_mu: torch.Tensor, f_var: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """Mean of the Dirichlet given by the Laplace bridge of ``N(f_mu, f_var)``.

    The Gaussian is first projected onto zero-sum logits (softmax is invariant to a common
    shift). With ``normalize=True`` the logits are rescaled so that the mean of the
    diagonal variance is ``sqrt(C / 2)`` times smaller (the "bridge_norm" variant).
    """
    C = f_mu.shape[-1]
    row = f_var.sum(dim=-1)  # (B, C)
    total = row.sum(dim=-1, keepdim=True)  # (B, 1)
    mu = f_mu - row * f_mu.sum(dim=-1, keepdim=True) / total
    var = f_var.diagonal(dim1=-2, dim2=-1) - row.square() / total
    if normalize:
        scale = var.mean(dim=-1, keepdim=True) / math.sqrt(C / 2.0)
        mu = mu / scale.sqrt()
        var = var / scale
    sum_exp = torch.exp(-mu).sum(dim=-1, keepdim=True)
    alpha = (1.0 - 2.0 / C + mu.exp() * sum_exp / C**2) / var
    return torch.nan_to_num(alpha / alpha.sum(dim=-1, keepdim=True), nan=1.0 / C)


def _psd_sqrt(f_var: torch.Tensor) -> torch.Tensor:
    """A factor ``L`` with ``L Lᵀ = f_var`` ``(B, C, C)`` (Cholesky, eigen fallback)."""
    L, info = torch.linalg.cholesky_ex(f_var)
    if bool((info == 0).all()):
        return L
    evals, evecs = torch.linalg.eigh(f_var)
    return evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)


def antithetic_normal(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal draws ``shape = (S, *rest)`` in antithetic pairs along dim 0.

    Rows ``2i`` and ``2i + 1`` are ``z_i`` and ``-z_i``; an odd ``S`` ends with one unpaired
    draw.
    """
    n_pairs = (shape[0] + 1) // 2
    z = torch.randn((n_pairs, *shape[1:]), generator=generator, device=device, dtype=dtype)
    return torch.stack((z, -z), dim=1).flatten(0, 1)[: shape[0]]


def mc_joint(
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Joint Monte Carlo: ``mean_s softmax(f_mu + L z_s)`` with ``L Lᵀ = f_var`` and
    antithetic ``z_s``."""
    L = _psd_sqrt(f_var)
    z = antithetic_normal((n_samples, *f_mu.shape), generator, f_mu.device, f_mu.dtype)
    samples = f_mu + torch.einsum("bij,sbj->sbi", L, z)
    return torch.softmax(samples, dim=-1).mean(dim=0)


def mc_indep(
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte Carlo with independent logits (diagonal of ``f_var`` only), antithetic draws."""
    std = f_var.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()
    z = antithetic_normal((n_samples, *f_mu.shape), generator, f_mu.device, f_mu.dtype)
    return torch.softmax(f_mu + std * z, dim=-1).mean(dim=0)


def apply_link(
    link_approx: str,
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch to the link approximation named ``link_approx``."""
    if link_approx == "probit":
        return probit(f_mu, f_var)
    if link_approx == "bridge":
        return laplace_bridge(f_mu, f_var)
    if link_approx == "bridge_norm":
        return laplace_bridge(f_mu, f_var, normalize=True)
    if link_approx == "mc":
        return mc_joint(f_mu, f_var, n_samples, generator)
    if link_approx == "mc_indep":
        return mc_indep(f_mu, f_var, n_samples, generator)
    raise ValueError(
        f"Unsupported link_approx {link_approx!r}; choose one of {LINK_APPROXIMATIONS}."
    )
