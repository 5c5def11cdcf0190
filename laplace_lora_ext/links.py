"""Link approximations: from a Gaussian over logits ``N(f_mu, f_var)`` to class probabilities.

All functions take ``f_mu`` ``(B, C)`` and ``f_var`` ``(B, C, C)`` and return ``(B, C)``
probabilities.

* ``"mc"``: joint Monte Carlo over the logits (Cholesky factor of each ``C x C``
  covariance), averaging softmax *probabilities*.
* ``"mc_indep"``: Monte Carlo with the diagonal of ``f_var`` only (the paper's "MC indep").

Without ``n_samples`` (``None``) the Monte Carlo links draw :func:`default_draws` per input:
10,000 for up to 14 classes, fewer as ``C²`` grows, never below laplace-torch's 100. A
wide posterior makes each draw's softmax nearly one-hot, and with more than two classes
the estimate's top class then depends on the draws. On 18 SmolLM2 checkpoints with 3 or 5
classes (50 validation inputs each), 100 draws gave another top class than the predictive
they estimate (200,000 draws) on up to 8.8 inputs (mean over seeds), 1000 draws on up to
4.2 and 10,000 on up to 2.2 (``benchmarks/mc_draws_check.py``). The draws are
accumulated in chunks of :data:`CHUNK_DRAWS`, so memory does not grow with their number;
up to that many, the draws are those of one call.

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
from collections.abc import Callable

import torch

from .options import LINK_APPROXIMATIONS

__all__ = [
    "LINK_APPROXIMATIONS",
    "antithetic_normal",
    "psd_sqrt",
    "apply_link",
    "default_draws",
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

    The Gaussian is first conditioned on zero-sum logits (``Σ_k f_k = 0``; softmax is
    invariant to a common shift): mean ``μ - Σ1 (1ᵀμ) / 1ᵀΣ1``, covariance
    ``Σ - Σ11ᵀΣ / 1ᵀΣ1``. That is not the orthogonal projection, so variance shared by every
    logit still changes the answer, as it does laplace-torch's, which skips this step and
    reads the raw diagonal (the two differ by up to 0.5 in probability on a tiny model).
    With ``normalize=True`` the logits are rescaled so that the mean of the
    diagonal variance is ``sqrt(C / 2)`` times smaller (the "bridge_norm" variant).

    The Dirichlet's ``α_k = n_k / v_k`` (``v``: conditioned variances) is undefined where a
    ``v_k`` is zero (a logit that does not depend on the adapters, or a covariance that is
    only a common shift; laplace-torch returns NaN there). Such rows, with every ``v_k`` at
    or below :func:`_zero_variance` (round-off of the conditioning), get the bridge's limit as
    those variances go to zero: the mean ``n_k`` normalised over the zero-variance classes
    (all ``C`` of them: the isotropic limit, the same as at ``f_var = ε I``; with
    ``normalize`` the rescaled logits grow without bound there and the limit is one-hot on
    the largest logit). The bridge does not tend to ``softmax(f_mu)`` as the variance
    vanishes; use ``"mc"`` or ``"probit"`` where that matters.
    """
    C = f_mu.shape[-1]
    row = f_var.sum(dim=-1)  # (B, C)
    total = row.sum(dim=-1, keepdim=True)  # (B, 1)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    mu = f_mu - row * f_mu.sum(dim=-1, keepdim=True) / safe_total
    var = f_var.diagonal(dim1=-2, dim2=-1) - row.square() / safe_total
    zero = var <= _zero_variance(f_var)  # (B, C)
    if normalize:
        scale = var.clamp_min(0.0).mean(dim=-1, keepdim=True) / math.sqrt(C / 2.0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        mu = mu / scale.sqrt()
        var = var / scale
    # log α_k = log n_k - log v_k with n_k = 1 - 2/C + e^{μ_k} Σ_j e^{-μ_j} / C², in logs
    # so that a sharply normalised or very confident row does not overflow
    shared = torch.logsumexp(-mu, dim=-1, keepdim=True) - 2.0 * math.log(C)
    log_n = torch.logaddexp(
        torch.full_like(mu, math.log1p(-2.0 / C) if C > 2 else -math.inf), mu + shared
    )
    log_alpha = log_n - var.where(~zero, 1.0).log()
    neg_inf = torch.full_like(log_n, -math.inf)
    limit = torch.where(zero, log_n, neg_inf)  # the zero-variance classes' limit
    if normalize:  # rescaled to vanishing variance, the logits grow without bound: argmax
        argmax = torch.where(mu == mu.amax(dim=-1, keepdim=True), 0.0, neg_inf)
        limit = torch.where(zero.all(dim=-1, keepdim=True), argmax, limit)
    log_alpha = torch.where(zero.any(dim=-1, keepdim=True), limit, log_alpha)
    return torch.softmax(log_alpha, dim=-1)


def _zero_variance(f_var: torch.Tensor) -> torch.Tensor:
    """``(B, 1)`` threshold below which a conditioned variance counts as zero: the round-off
    of the conditioning, ``C`` machine epsilons times the largest diagonal entry."""
    diag = f_var.diagonal(dim1=-2, dim2=-1)
    eps = torch.finfo(f_var.dtype).eps
    return f_var.shape[-1] * eps * diag.abs().amax(dim=-1, keepdim=True)


def psd_sqrt(f_var: torch.Tensor) -> torch.Tensor:
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


#: Most draws per input :func:`default_draws` gives (few classes).
MAX_DEFAULT_DRAWS = 10_000
#: Fewest draws per input :func:`default_draws` gives: laplace-torch's ``n_samples``.
MIN_DEFAULT_DRAWS = 100
#: :func:`default_draws` keeps ``draws · C²`` (the multiply-adds of ``L z`` per input) below this.
DEFAULT_DRAW_WORK = 2_000_000
#: Draws held at once (an even number, so antithetic pairs never straddle two chunks).
CHUNK_DRAWS = 2048


def default_draws(n_classes: int) -> int:
    """Monte Carlo draws per input when ``n_samples`` is not given: ``10,000`` for
    ``C ≤ 14``, then ``2·10⁶ / C²`` (the ``L z`` products' cost), at least ``100``."""
    budget = DEFAULT_DRAW_WORK // max(n_classes, 1) ** 2
    return max(MIN_DEFAULT_DRAWS, min(MAX_DEFAULT_DRAWS, budget))


def _mc_mean(
    f_mu: torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor],
    n_samples: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``mean_s softmax(f_mu + noise(z_s))`` ``(B, C)`` over ``n_samples`` antithetic draws
    ``z_s`` ``(B, C)`` (``None``: :func:`default_draws`), in chunks of :data:`CHUNK_DRAWS`."""
    n = default_draws(f_mu.shape[-1]) if n_samples is None else n_samples
    total = torch.zeros_like(f_mu)
    for start in range(0, n, CHUNK_DRAWS):
        size = min(CHUNK_DRAWS, n - start)
        z = antithetic_normal((size, *f_mu.shape), generator, f_mu.device, f_mu.dtype)
        total += torch.softmax(f_mu + noise(z), dim=-1).sum(dim=0)
    return total / n


def mc_joint(
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Joint Monte Carlo: ``mean_s softmax(f_mu + L z_s)`` with ``L Lᵀ = f_var`` and
    antithetic ``z_s`` (``n_samples=None``: :func:`default_draws`)."""
    L = psd_sqrt(f_var)
    return _mc_mean(f_mu, lambda z: torch.einsum("bij,sbj->sbi", L, z), n_samples, generator)


def mc_indep(
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte Carlo with independent logits (diagonal of ``f_var`` only), antithetic draws
    (``n_samples=None``: :func:`default_draws`)."""
    std = f_var.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()
    return _mc_mean(f_mu, lambda z: std * z, n_samples, generator)


def apply_link(
    link_approx: str,
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch to the link approximation named ``link_approx`` (``n_samples`` for the
    Monte Carlo links; ``None``: :func:`default_draws`)."""
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
