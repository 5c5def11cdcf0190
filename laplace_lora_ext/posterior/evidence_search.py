"""The evidence-based prior searches of the ``lora`` classes: ``"lora_marglik"``,
``"linearised"`` and the convergence check of laplace-torch's ``"marglik"``.

All of them read the softmax's curvature at the training points. Once the MAP has memorised
its training data (mean training NLL below :data:`SATURATED_TRAIN_NLL`) that curvature
vanishes and the evidence's ``lora_B`` prior collapses; the searches say so in a warning,
and the default (``method="auto"``, :mod:`.tuning`) then takes a training-data rule instead.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import tqdm

from .. import adapter_init
from .. import prior as priors

__all__ = ["EvidenceSearchMixin", "SATURATED_TRAIN_NLL", "MARGLIK_GRAD_TOL"]

#: Mean training NLL of the MAP (nats per example) below which the training data count as
#: memorised: the softmax is saturated there (``p(1 - p) ≈ 1 - p_y < 1 %``), the curvature
#: has vanished and the evidence's ``lora_B`` prior collapses (docs/benchmarks.md).
SATURATED_TRAIN_NLL = 0.01
#: |d log Z / d log δ| per data point above which the marglik optimiser has not converged.
MARGLIK_GRAD_TOL = 1e-3
#: ``"lora_marglik"`` runs rounds of ``max(n_steps, 200)`` Adam steps until converged
#: (:data:`MARGLIK_GRAD_TOL`), at most this many; some tensors' evidence is flat enough that
#: one round leaves them short (a diagonal posterior on a SmolLM2 adapter took 1000 steps).
LORA_MARGLIK_ROUNDS = 10


class EvidenceSearchMixin:
    """Evidence searches (needs the Laplace attributes and ``_report_prior`` of
    :class:`~laplace_lora_ext.posterior.tuning.PriorTuningMixin`)."""

    def _train_nll(self) -> float:
        """Mean training NLL of the MAP (nats per example) from the last ``fit``."""
        return float(self.loss) / max(self.n_data, 1)

    def _training_data_memorised(self) -> bool:
        return self._train_nll() < SATURATED_TRAIN_NLL

    def _check_marglik_prior_structure(
        self, method: str, prior_structure: str | None, init_prior_prec: Any = 1.0
    ) -> None:
        """Refuse a ``prior_structure`` laplace-torch's marglik cannot take here, before its
        setter fails with a message that does not name the keyword."""
        if method != "marglik" or prior_structure is None:
            return
        known = ("scalar", "layerwise", "diag")
        if prior_structure not in known:
            raise ValueError(f"prior_structure must be one of {known}, got {prior_structure!r}.")
        if prior_structure == "diag" and self._structure == "kron":
            raise ValueError(
                "prior_structure='diag' (one precision per weight) is not supported with "
                "hessian_structure='kron': its Kronecker factors take a scalar or one "
                "precision per LoRA matrix. Use prior_structure='layerwise', or "
                "hessian_structure='diag'."
            )
        sizes = {"scalar": 1, "layerwise": len(self.params), "diag": self.n_params}
        n_init = torch.as_tensor(init_prior_prec).numel()
        if n_init != 1 and n_init != sizes[prior_structure]:
            raise ValueError(
                f"init_prior_prec has {n_init} values but prior_structure={prior_structure!r} "
                f"takes {sizes[prior_structure]}; laplace-torch would keep the length of "
                "init_prior_prec and ignore prior_structure. Pass one value, or one per "
                "entry of the structure."
            )

    def _optimize_linearised(self, prior_structure: str, n_steps: int, verbose: bool) -> None:
        fit = priors.fit_prior_precision(
            priors.curvature_spectra(self), prior_structure, n_steps=n_steps
        )
        self.prior_precision = fit.deltas.to(self._device, self._dtype)
        self.prior_fit = fit
        self._report_prior("linearised", False, verbose)
        _warn_if_at_upper_bound(fit.deltas, len(self.params))

    def _optimize_lora_marglik(
        self,
        n_steps: int,
        lr: float,
        init: float,
        delta_a: torch.Tensor | None = None,
        default: bool = False,
        progress: bool = False,
    ) -> None:
        """``lora_A``: spread-matched prior; every other tensor: layerwise marglik.

        The ``lora_A`` precisions are fixed at
        :func:`laplace_lora_ext.prior.spread_matched_precision`; the others maximise
        laplace-torch's log marginal likelihood (Adam on ``log δ``, as ``method="marglik"``,
        in rounds of ``n_steps`` until converged, at most :data:`LORA_MARGLIK_ROUNDS`)
        with the ``lora_A`` ones held fixed. ``delta_a`` ``(L,)`` replaces the spread-matched
        precisions (entries at ``lora_A`` positions are used; for studies). ``default``:
        called as the default (``method="auto"``), which has already checked for memorised
        data, so only the warnings of an explicit call are given. ``progress``: a tqdm bar
        over each round's Adam steps.
        """
        fixed = priors.lora_a_mask(self.lora_param_names).to(self._device)
        if bool(fixed.all()):
            raise ValueError("method='lora_marglik' needs parameters other than lora_A.")
        if delta_a is None:
            delta_a = priors.spread_matched_precision(self)
        delta_a = delta_a.to(self._device, self._dtype)
        log_free = torch.full(
            (int((~fixed).sum()),), math.log(init), device=self._device, dtype=self._dtype
        )
        log_free.requires_grad_(True)
        optimizer = torch.optim.Adam([log_free], lr=lr)

        def precision() -> torch.Tensor:
            full = delta_a.clone()
            full[~fixed] = log_free.exp()
            return full

        done = 0
        for r in range(LORA_MARGLIK_ROUNDS):  # until converged: some tensors' evidence is flat
            desc = f"[Evidence, round {r + 1}]"
            for _ in tqdm.tqdm(range(n_steps), desc=desc, leave=False, disable=not progress):
                optimizer.zero_grad()
                (-self.log_marginal_likelihood(prior_precision=precision())).backward()
                optimizer.step()
                _check_search_finite(log_free, lr)
            done += n_steps
            self.prior_precision = precision().detach()
            gradient = self._marglik_gradient(~fixed)
            if gradient[1] <= MARGLIK_GRAD_TOL:
                break
        self._warn_if_marglik_not_converged(
            done, free=~fixed, method="lora_marglik", default=default, stacklevel=4,
            gradient=gradient,
        )  # fmt: skip
        if self._training_data_memorised():
            self._warn_evidence_on_memorised_data(default)

    def _warn_evidence_on_memorised_data(self, default: bool) -> None:
        """The evidence collapses on memorised training data: say so, with the alternative
        this adapter allows (none from the training data after PiSSA, OLoRA, ...)."""
        problem = adapter_init.unsupported_init(self.model)
        if default and problem is None:
            return  # the default has chosen lora_marglik for another reason, and said so
        advice = (
            "Use the default (method='auto') or 'leave_one_out'."
            if problem is None
            else f"The training-data rules do not apply to {problem}; with a validation "
            "split, method='gridsearch' does not collapse."
        )
        warnings.warn(
            "optimize_prior_precision(method='lora_marglik'): the fine-tuned model has "
            f"memorised its training data (mean training NLL {self._train_nll():.2g} < "
            f"{SATURATED_TRAIN_NLL}); the softmax is saturated, its curvature vanishes and "
            "the evidence's lora_B prior collapses, which makes predictions "
            f"underconfident. {advice}",
            RuntimeWarning,
            stacklevel=4,
        )

    def _marglik_gradient(self, free: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """``d log Z / d log δ`` at the current prior (entries ``free`` ``(L,)`` only) and its
        largest magnitude per training example.

        laplace-torch's ``log_marginal_likelihood(prior_precision=...)`` stores the tensor it
        is given as the prior; the current one is put back afterwards, so the chosen prior
        keeps its value and carries no autograd graph.
        """
        current = self.prior_precision.detach().clone()
        log_prec = current.log().requires_grad_(True)
        try:
            lml = self.log_marginal_likelihood(prior_precision=log_prec.exp())
            (grad,) = torch.autograd.grad(lml, log_prec)
        finally:
            self.prior_precision = current
        grad = grad if free is None else grad[free]
        return grad, float(grad.abs().max()) / max(self.n_data, 1)

    def _warn_if_marglik_not_converged(
        self,
        n_steps: int,
        free: torch.Tensor | None = None,
        method: str = "marglik",
        default: bool = False,
        stacklevel: int = 3,
        gradient: tuple[torch.Tensor, float] | None = None,
    ) -> None:
        """Warn if ``|d log Z / d log δ|`` per example exceeds :data:`MARGLIK_GRAD_TOL`.

        ``free`` ``(L,)``: the precisions that were optimised; ``method``: the name the
        warning gives; ``default``: the call was the default (``method="auto"``), so the
        advice does not send the user back to it; ``stacklevel``: frames up to the caller
        of ``optimize_prior_precision``; ``gradient``: :meth:`_marglik_gradient`'s result
        at the current prior, if the caller has it.
        """
        grad, worst = gradient if gradient is not None else self._marglik_gradient(free)
        if worst <= MARGLIK_GRAD_TOL:
            return
        who = (
            f"optimize_prior_precision() (the default, here method={method!r})"
            if default
            else f"optimize_prior_precision(method={method!r})"
        )
        message = (
            f"{who} did not converge in {n_steps} steps: |d log Z/d log δ| = "
            f"{float(grad.abs().max()):.3g} ({worst:.2g} per training example, tolerance "
            f"{MARGLIK_GRAD_TOL:g})."
        )
        if float(grad.sum()) < 0:
            message += (
                " The evidence still rises as the prior precision falls. With a saturated "
                "softmax (training data memorised) it keeps rising and the answer is set by "
                "n_steps, which makes predictions underconfident."
            )
        others = "" if default else "the default (method='auto'), "
        message += (
            f" Pass a larger n_steps, or use {others}method='leave_one_out', or "
            "'gridsearch' with a validation loader."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def _warn_if_at_upper_bound(deltas: torch.Tensor, n_tensors: int) -> None:
    """Say so when the linearised evidence put precisions ``(1,)`` or ``(L,)`` at their
    upper bound: there the posterior is its mean (no uncertainty), not a choice of width."""
    capped = int((deltas >= priors.LINEARISED_MAX_PRECISION * (1 - 1e-9)).sum())
    if capped == 0:
        return
    which = "every tensor's" if capped == deltas.numel() else f"{capped} tensors'"
    warnings.warn(
        f"optimize_prior_precision(method='linearised') put {which} prior precision (of "
        f"{n_tensors}) at its upper bound {priors.LINEARISED_MAX_PRECISION:g}: the data "
        "support no prior variance there, so the posterior is the MAP in those tensors (no "
        "uncertainty). This happens when the softmax's curvature is too small for the "
        "evidence's quadratic model (e.g. memorised training data). Use the default "
        "(method='auto'), or method='gridsearch' with a validation loader.",
        RuntimeWarning,
        stacklevel=4,
    )


def _check_search_finite(log_free: torch.Tensor, lr: float) -> None:
    """Raise a ``FloatingPointError`` naming ``lr`` once an Adam step leaves a precision
    that is not a finite number ``> 0`` (``exp`` of ``log_free`` overflows or underflows)."""
    precision = log_free.detach().exp()
    if not bool(torch.isfinite(precision).all() and (precision > 0).all()):
        raise FloatingPointError(
            f"The evidence search diverged: an Adam step with lr={lr} took a prior precision "
            "to 0 or inf. Use a smaller lr (the default is 0.1); the prior is left as it was."
        )
