"""Validation-free prior precisions for LoRA adapters.

* :func:`spread_matched_precision` and :func:`lora_a_mask`: the ``lora_A`` half of the
  default ``optimize_prior_precision(method="lora_marglik")`` (see
  :mod:`laplace_lora_ext.posterior.tuning`).
* :func:`curvature_spectra`, :func:`linearised_log_evidence`, :func:`fit_prior_precision`:
  ``method="linearised"``, described below. Measured on overfit SmolLM2 adapters it returns
  the MAP (every precision at its upper bound): the curvature of a saturated softmax is so
  small that no direction satisfies ``c_i > 1/h_i``. The quadratic model of the data term
  that it relies on is what fails there, so it is an option, not the default.

Why not laplace-torch's ``marglik``
-----------------------------------
The Laplace evidence of a network trained *without* the prior,

    log Z(δ) = -L(θ*) - δ/2 ‖θ* - θ₀‖² + ½ Σ_i log(δ / (h_i + δ)),

charges the prior for the whole distance ‖θ* - θ₀‖², also in the directions the data do
not inform (curvature ``h_i ≈ 0``). For LoRA that distance is mostly ``lora_A``'s random
start and the optimiser's drift in irrelevant directions, so the optimum
``δ = γ / ‖θ*‖²`` is tiny and the prior variance left in the ~10⁵ uninformed directions
swamps the predictive (underconfidence; see docs/benchmarks.md).

The linearised evidence
-----------------------
Following Antorán et al. (ICML 2022, "Adapting the linearised Laplace model evidence for
modern deep learning"), the evidence should be that of the linearised model at *its own*
regularised optimum. With the data term quadratic around the unregularised MAP θ*
(gradient ≈ 0 there, curvature ``H = Σ h_i u_i u_iᵀ``), the linear model's evidence has a
closed form in the eigenbasis of ``H``; with ``c_i = ⟨u_i, θ* - θ₀⟩²``,

    log Z_lin(δ) = -L(θ*) + Σ_i [ -½ h_i δ / (h_i + δ) · c_i + ½ log(δ / (h_i + δ)) ],

which is the log-density of θ* under ``N(θ₀, H⁻¹ + δ⁻¹ I)`` restricted to ``range(H)``
(up to a constant). Directions with ``h_i = 0`` drop out: weight noise the data never
constrain no longer pulls the prior wide. Per direction the maximiser is
``1/δ = c_i - 1/h_i`` when positive, i.e. the prior variance the data can actually
support. The stationary point satisfies MacKay's fixed point ``δ = γ / m`` with
``γ = Σ h/(h+δ)`` and ``m = Σ (h/(h+δ))² c`` (the squared norm of the linear model's
regularised solution), which is what :func:`fit_prior_precision` iterates.

Everything here works on per-parameter-tensor spectra, so the same code serves the
``kron`` (dense or low-rank factors), ``diag`` and ``full`` posteriors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import distributed, guards
from .inputs import forward_logits, split_batch
from .predictive import logit_jacobian_blocks

__all__ = [
    "lora_a_mask",
    "spread_matched_precision",
    "Spectrum",
    "curvature_spectra",
    "linearised_log_evidence",
    "fit_prior_precision",
    "PriorFit",
    "adapters_disabled",
    "is_lora_b",
    "lora_b_zeroed",
    "function_space_sums",
    "function_space_precision",
    "UnchangedLogitsError",
    "TrainingDataSpentError",
    "agree_on_rule",
]


@dataclass
class Spectrum:
    """Curvature eigenvalues ``h`` ``(k,)`` and squared mean coordinates ``c`` ``(k,)``.

    One per parameter tensor (a "layer" in laplace-torch's layerwise prior). Directions
    outside the listed ``k`` have zero curvature and do not enter the linearised evidence.
    """

    h: Tensor
    c: Tensor

    def gamma(self, delta: Tensor) -> Tensor:
        """Effective number of parameters ``Σ h / (h + δ)``."""
        return (self.h / (self.h + delta)).sum()

    def fitted_sq_norm(self, delta: Tensor) -> Tensor:
        """``‖θ_lin - θ₀‖²``: squared norm of the linear model's regularised solution."""
        shrink = self.h / (self.h + delta)
        return (shrink.square() * self.c).sum()

    def log_evidence(self, delta: Tensor) -> Tensor:
        """This tensor's term of :func:`linearised_log_evidence`."""
        h, c = self.h, self.c
        return (-0.5 * h * delta / (h + delta) * c + 0.5 * torch.log(delta / (h + delta))).sum()


# ------------------------------------------------------------------------ lora_A
def lora_a_mask(param_names: list[str]) -> Tensor:
    """``(L,)`` bool: which parameter tensors are PEFT ``lora_A`` matrices."""
    return torch.tensor([".lora_A." in n or n.startswith("lora_A.") for n in param_names])


def spread_matched_precision(la: Any) -> Tensor:
    """``(L,)``: ``n_l / ‖θ_l - θ₀,l‖²`` per parameter tensor.

    For a ``lora_A`` matrix this is the precision of a zero-mean prior whose variance
    equals the entries' own mean square: PEFT draws ``lora_A`` at random (Kaiming-uniform:
    variance ``1 / (3 d_in)``) and training barely moves it, so its entries are, to a good
    approximation, draws from that distribution. It is the evidence's own answer
    (``δ = γ / ‖θ‖²``) with every entry counted as set by the prior (``γ = n``).
    """
    blocks = _centred_mean_blocks(la)
    return torch.stack([W.numel() / W.square().sum().clamp_min(1e-30) for W in blocks])


# ------------------------------------------------------------------------ spectra
def _centred_mean_blocks(la: Any) -> list[Tensor]:
    """``la.mean - la.prior_mean`` split per parameter tensor, in ``la.params`` order."""
    delta = (la.mean - la.prior_mean).to(la._dtype)
    delta = delta.expand(la.n_params) if delta.numel() == 1 else delta
    blocks, offset = [], 0
    for p in la.params:
        blocks.append(delta[offset : offset + p.numel()].reshape(p.shape))
        offset += p.numel()
    return blocks


def _kron_spectra(la: Any, mean_blocks: list[Tensor]) -> list[Spectrum]:
    """Spectra of a decomposed (possibly low-rank) Kronecker curvature.

    For a weight block ``G ⊗ A`` with eigenpairs ``(Q_G, λ_G)``, ``(Q_A, λ_A)`` (``Q`` may be
    ``d x k`` for a low-rank factor) the eigenvalues are ``λ_G,i λ_A,j`` and the coordinates
    of ``W`` are ``(Q_Gᵀ W Q_A)_ij``.
    """
    H = la.H
    if getattr(H, "damping", False):
        raise ValueError(
            "The linearised evidence needs the undamped Kronecker posterior (damping=False)."
        )
    factor = float(la._H_factor)
    out = []
    for Qs, ls, W in zip(H.eigenvectors, H.eigenvalues, mean_blocks, strict=True):
        if len(ls) == 1:
            (Q,), (lam,) = Qs, ls
            coords = Q.T.to(W.dtype) @ W.reshape(-1)
            h = lam
        else:
            (Q1, Q2), (l1, l2) = Qs, ls
            W2 = W.reshape(Q1.shape[0], Q2.shape[0])
            coords = (Q1.T.to(W.dtype) @ W2 @ Q2.to(W.dtype)).reshape(-1)
            h = torch.outer(l1, l2).reshape(-1)
        out.append(Spectrum(h.clamp_min(0).to(W.dtype) * factor, coords.square()))
    return out


def _diag_spectra(la: Any, mean_blocks: list[Tensor]) -> list[Spectrum]:
    factor = float(la._H_factor)
    out, offset = [], 0
    for W in mean_blocks:
        n = W.numel()
        h = la.H[offset : offset + n].clamp_min(0) * factor
        out.append(Spectrum(h, W.reshape(-1).square()))
        offset += n
    return out


def _full_spectra(la: Any, mean_blocks: list[Tensor]) -> list[Spectrum]:
    """Per-tensor spectra of the dense curvature's diagonal blocks.

    The layerwise prior treats tensors separately, so each diagonal block ``H_ll`` is
    decomposed on its own (the exact evidence couples blocks only through the
    off-diagonal curvature, which this per-tensor evidence ignores, as ``kron`` does).
    """
    factor = float(la._H_factor)
    out, offset = [], 0
    for W in mean_blocks:
        n = W.numel()
        block = la.H[offset : offset + n, offset : offset + n] * factor
        lam, U = torch.linalg.eigh(0.5 * (block + block.T))
        coords = U.T @ W.reshape(-1)
        out.append(Spectrum(lam.clamp_min(0), coords.square()))
        offset += n
    return out


def curvature_spectra(la: Any) -> list[Spectrum]:
    """One :class:`Spectrum` per parameter tensor of a fitted ``lora`` Laplace object."""
    la._check_H_init()
    mean_blocks = _centred_mean_blocks(la)
    structure = la._structure
    if structure == "kron":
        return _kron_spectra(la, mean_blocks)
    if structure == "diag":
        return _diag_spectra(la, mean_blocks)
    if structure == "full":
        return _full_spectra(la, mean_blocks)
    raise ValueError(f"No curvature spectrum for hessian_structure={structure!r}.")


# ------------------------------------------------------------------------ evidence
def linearised_log_evidence(
    spectra: list[Spectrum], deltas: Tensor, loss: float | Tensor = 0.0
) -> Tensor:
    """``log Z_lin(δ)`` (see the module docstring) for per-tensor ``deltas`` ``(L,)``."""
    deltas = deltas.expand(len(spectra)) if deltas.numel() == 1 else deltas
    total = -torch.as_tensor(loss, dtype=deltas.dtype)
    for s, d in zip(spectra, deltas, strict=True):
        total = total + s.log_evidence(d)
    return total


@dataclass
class PriorFit:
    """Result of :func:`fit_prior_precision`: ``deltas`` ``(1,)`` or ``(L,)``, ``converged``."""

    deltas: Tensor
    converged: bool
    n_iter: int
    effective_params: float


def _fixed_point(
    spectra: list[Spectrum], delta: Tensor, max_delta: float, n_steps: int, rtol: float
) -> tuple[Tensor, bool, int]:
    """Iterate ``δ ← γ(δ) / m(δ)`` for spectra sharing one ``δ``; clamp to ``max_delta``."""
    for it in range(1, n_steps + 1):
        gamma = sum(s.gamma(delta) for s in spectra)
        m = sum(s.fitted_sq_norm(delta) for s in spectra)
        new = torch.as_tensor(max_delta, dtype=delta.dtype) if m <= 0 else gamma / m
        new = new.clamp(max=max_delta)
        if torch.abs(torch.log(new) - torch.log(delta)) < rtol:
            return new, True, it
        delta = new
    return delta, False, n_steps


#: Upper bound of the linearised evidence's prior precision (:func:`fit_prior_precision`).
LINEARISED_MAX_PRECISION = 1e8


def fit_prior_precision(
    spectra: list[Spectrum],
    prior_structure: str = "layerwise",
    init: float = 1.0,
    max_delta: float = LINEARISED_MAX_PRECISION,
    n_steps: int = 500,
    rtol: float = 1e-6,
) -> PriorFit:
    """Maximise the linearised evidence over a scalar or per-tensor prior precision.

    Args:
        spectra: from :func:`curvature_spectra`.
        prior_structure: ``"scalar"`` (one δ) or ``"layerwise"`` (one δ per tensor).
        init: starting δ.
        max_delta: upper bound; a tensor whose data support no prior variance at all
            (``c_i ≤ 1/h_i`` in every direction) ends there (posterior ≈ its mean).
        n_steps: fixed-point iterations per δ.
        rtol: convergence tolerance on ``log δ``.

    Returns:
        a :class:`PriorFit`; ``converged`` is False if any δ hit ``n_steps``.
    """
    if prior_structure not in ("scalar", "layerwise"):
        raise ValueError(
            f"prior_structure must be 'scalar' or 'layerwise' for the linearised evidence, "
            f"got {prior_structure!r}."
        )
    dtype = spectra[0].h.dtype
    start = torch.tensor(float(init), dtype=dtype)
    groups = [spectra] if prior_structure == "scalar" else [[s] for s in spectra]
    deltas, converged, n_iter = [], True, 0
    for group in groups:
        d, ok, it = _fixed_point(group, start, max_delta, n_steps, rtol)
        deltas.append(d)
        converged &= ok
        n_iter = max(n_iter, it)
    deltas_t = torch.stack(deltas)
    per_tensor = deltas_t.expand(len(spectra))
    gamma = sum(float(s.gamma(d)) for s, d in zip(spectra, per_tensor, strict=True))
    if not math.isfinite(gamma):
        raise FloatingPointError("The linearised evidence gave a non-finite prior precision.")
    if not converged:
        warnings.warn(
            f"The linearised-evidence prior did not converge in {n_steps} fixed-point steps; "
            "the prior precision may be unreliable.",
            RuntimeWarning,
            stacklevel=3,
        )
    return PriorFit(deltas_t, converged, n_iter, gamma)


# ------------------------------------------------------------------------ function space
@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Every PEFT tuner layer in ``model`` switched off (the base model), then restored.

    Works for any module tree that contains PEFT layers (a ``PeftModel`` or a wrapper such
    as :class:`~laplace_lora_ext.LastTokenChoiceLM`), unlike ``PeftModel.disable_adapter``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("The model has no PEFT adapter layers to disable.")
    was_disabled = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, off in zip(layers, was_disabled, strict=True):
            m.enable_adapters(not off)


def is_lora_b(name: str) -> bool:
    """Whether a parameter name is a PEFT ``lora_B`` (or ``lora_embedding_B``) tensor's."""
    return ".lora_B." in name or ".lora_embedding_B." in name or name.startswith("lora_B.")


@contextmanager
def lora_b_zeroed(la: Any) -> Iterator[None]:
    """Every ``lora_B`` tensor of ``la.params`` set to zero, then restored exactly (also
    when the body raises): the adapter before fine-tuning, with ``lora_A`` as trained."""
    saved = [
        (p, p.detach().clone())
        for p, name in zip(la.params, la.lora_param_names, strict=True)
        if is_lora_b(name)
    ]
    try:
        with torch.no_grad():
            for p, _ in saved:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def _centre(x: Tensor, dim: int) -> Tensor:
    return x - x.mean(dim=dim, keepdim=True)


def function_space_sums(la: Any, loader: Iterable[Any], free: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_n ‖P J_n‖²_F, Σ_n ‖P Δf_n‖²)`` over ``loader``'s examples.

    ``J_n`` stacks the logit Jacobian blocks of the tensors marked by ``free`` ``(L,)``,
    ``Δf_n = f(x_n) - f_base(x_n)`` is the change of the logits ``(C,)`` that the
    posterior's ``lora_B`` tensors make (:func:`lora_b_zeroed` for ``f_base``: adapters
    outside ``la.params``, e.g. with ``lora_modules``, stay as trained), and
    ``P = I - 11ᵀ/C`` centres over classes (a shift of every logit changes no probability).
    Model in eval mode; no gradients kept.
    """
    jac, change = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    with guards.eval_mode(la.model):
        for batch in loader:
            X, _ = split_batch(batch, la.dict_key_y, la._device)
            f_mu, blocks = logit_jacobian_blocks(la.backend, X)
            with torch.no_grad(), lora_b_zeroed(la):
                f_base = forward_logits(la.model, X, la.dict_key_y).to(f_mu.dtype)
            change += _centre(f_mu - f_base, -1).double().square().sum().cpu()
            for keep, W in zip(free.tolist(), blocks, strict=True):
                if keep:
                    jac += _centre(W, 1).double().square().sum().cpu()
    return jac, change


class RuleNotApplicableError(ValueError):
    """A training-data prior rule cannot be used on this posterior (too few training
    examples, parameters other than LoRA matrices, an unchanged adapter, or one that did
    not start at ``lora_B = 0``); the default falls back to ``"lora_marglik"``."""


class UnchangedLogitsError(RuleNotApplicableError):
    """The adapter does not change the logits (``B = 0``): no function-space prior."""


class TrainingDataSpentError(RuleNotApplicableError):
    """``fit``'s loaders yield no batches on a second pass (e.g. a ``DataLoader`` over a
    single-pass ``IterableDataset``): no training-data prior."""


def agree_on_rule(error: BaseException | None, stage: str) -> None:
    """Make a training-data rule's local failure every rank's before its collectives.

    In a data-parallel fit each rank reads its own shard first (a rank with one example, a
    spent loader, ...); a rank that raised alone would leave the others waiting in the
    rule's all-reduce. The ranks exchange their status: if any failed, every rank raises:
    the error itself when every rank failed with the same one (as
    :func:`~laplace_lora_ext.distributed.agree`), else a :class:`RuleNotApplicableError`
    when every failure was one (so the default falls back to the evidence on every rank),
    else a ``DistributedFitError``. One process: ``error`` is raised as it is.
    """
    if not distributed.is_distributed():
        if error is not None:
            raise error
        return
    mine = None
    if error is not None:
        mine = (isinstance(error, RuleNotApplicableError), f"{type(error).__name__}: {error}")
    statuses = distributed.agree(None, stage, payload=mine)
    failed = [(rank, status) for rank, status in enumerate(statuses) if status is not None]
    if not failed:
        return
    if len(failed) == len(statuses) and len({status for _, status in failed}) == 1:
        raise error  # type: ignore[misc]  # the same error on every rank: raise it as it is
    text = "; ".join(f"rank {rank}: {message}" for rank, (_, message) in failed)
    if all(not_applicable for _, (not_applicable, _) in failed):
        raise RuleNotApplicableError(
            f"On {len(failed)} of {len(statuses)} ranks the rule does not apply ({text})."
        ) from error
    raise distributed.DistributedFitError(
        f"Distributed prior search stopped {stage} on all {len(statuses)} ranks: {text}"
    ) from error


def function_space_precision(la: Any, loader: Iterable[Any]) -> Tensor:
    """``(L,)``: the default prior. ``lora_A`` at :func:`spread_matched_precision`; one
    precision ``δ_B`` for every other tensor such that the prior explains the size of the
    function change that fine-tuning made on the training inputs:

        E_prior ‖P J_B (B - 0)‖² = Σ_n ‖P Δf_n‖²  ⇔  δ_B = Σ_n ‖P J_B,n‖²_F / Σ_n ‖P Δf_n‖²

    (linearised; ``B`` starts at zero, so ``Δf`` is what ``B`` has done). It never looks at
    the softmax's curvature, so it does not collapse when the training data are memorised
    (there ``p(1 - p) → 0`` and the evidence's ``δ_B`` falls towards zero, which makes
    predictions underconfident), and it scales with the logits: a longer-trained adapter
    with larger logits gets a proportionally wider prior. Choosing it was done on
    validation splits only (docs/benchmarks.md, "the prior at memorisation").

    Raises:
        UnchangedLogitsError: if the adapter has not changed the logits (``Δf = 0``, e.g.
            ``B = 0``); a ``ValueError``.
    """
    is_a = lora_a_mask(la.lora_param_names)
    delta = spread_matched_precision(la).to(la._dtype)
    error, jac, change = None, None, None
    try:
        jac, change = function_space_sums(la, loader, ~is_a)
    except Exception as e:  # this rank's shard; raised on every rank below
        error = e
    agree_on_rule(error, "reading the training data")
    if distributed.is_distributed():
        both = torch.stack([jac, change]).to(la._device)
        torch.distributed.all_reduce(both)
        jac, change = both.cpu().unbind()
    if not float(change) > 0:
        raise UnchangedLogitsError(
            "The adapter does not change the logits on the training data (B = 0?), so "
            "the function-space prior is undefined; use method='lora_marglik'."
        )
    delta[~is_a] = float(jac / change)
    return delta
