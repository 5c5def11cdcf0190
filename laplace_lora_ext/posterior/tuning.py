"""``optimize_prior_precision`` for the ``lora`` classes: the validation-free default and
laplace-torch's two methods.

* ``method=None`` / ``"auto"`` (default): ``"lora_marglik"``, unless the MAP has memorised
  its training data (mean training NLL below :data:`SATURATED_TRAIN_NLL`), then
  ``"leave_one_out"``. The evidence needs the softmax's curvature at the training points;
  once they are memorised that curvature vanishes and the evidence's ``lora_B`` prior
  collapses (δ_B 7.9 → 0.29 → 0.155 on a SmolLM2 adapter, predictions underconfident).
  The leave-one-out rule does not use that curvature; it asks how well the linearised
  adapter predicts each training example from the others. On 12 memorised SmolLM2
  checkpoints it had a lower validation NLL than the function-space rule (the previous
  default) on most (docs/benchmarks.md). Neither needs validation data.
* ``method="lora_marglik"``: ``lora_A``'s prior is matched to its own spread
  (PEFT draws ``lora_A`` at random and training barely moves it; see
  :func:`laplace_lora_ext.prior.spread_matched_precision`), every other tensor's prior
  precision maximises laplace-torch's evidence with those held fixed.
  Plain ``"marglik"`` spends most of the prior's budget on ``lora_A``'s random start
  (‖θ‖² is dominated by it) and leaves a wide prior in directions that only feed noise
  into the predictive; on overfit SmolLM2 adapters this lowered the validation
  NLL and ECE against ``"marglik"`` (docs/benchmarks.md).
* ``method="leave_one_out"``: ``lora_A`` as above; one ``lora_B`` precision whose
  predictive, centred at kernel leave-one-out logits of the training examples, has the
  lowest NLL on their labels (:mod:`laplace_lora_ext.loo_prior`; two more GLM passes). The
  kernel is taken at ``B = 0`` with ``lora_A`` redrawn from PEFT's initialisation (the
  mean kernel over 8 draws): the trained ``lora_A`` has seen every training example, the
  left-out one too.
* ``method="function_space"``: ``lora_A`` as above; one ``lora_B`` precision chosen so that
  the prior explains the size of the logit change fine-tuning made on the training data
  (:func:`laplace_lora_ext.prior.function_space_precision`; one more pass over them).
* ``method="linearised"``: the linearised evidence (:mod:`laplace_lora_ext.prior`). Kept as
  an option: on saturated (memorising) adapters the curvature collapses and it returns
  the MAP (prior precision at its upper bound), so it is not the default.
* ``method="marglik"``: laplace-torch's own optimiser, unchanged, followed by a
  convergence check: on a saturated softmax (memorised training data) its evidence keeps
  rising as the prior precision falls and the answer is set by ``n_steps``; we warn.
* ``method="gridsearch"``: laplace-torch's validation grid, but each validation batch's
  logit Jacobian blocks are computed once and reused for every grid value (the grid
  then costs one GLM pass instead of ``grid_size``), with common random numbers for MC.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import tqdm
from torch.utils.data import DataLoader

from .. import adapter_init, distributed, guards, loo_prior
from .. import prior as priors
from . import search_options
from .evidence_search import SATURATED_TRAIN_NLL, EvidenceSearchMixin
from .grid_search import GridSearchMixin
from .search_options import TUNING_METHODS

__all__ = ["PriorTuningMixin", "TUNING_METHODS", "DEFAULT_METHOD", "SATURATED_TRAIN_NLL"]

#: What ``optimize_prior_precision()`` does without ``method``: ``"auto"`` picks
#: ``"leave_one_out"`` on memorised training data, else ``"lora_marglik"`` (module docstring).
DEFAULT_METHOD = "auto"
#: Monte Carlo draws of ``"gridsearch"``'s predictive when ``n_samples`` is not given
#: (laplace-torch's default; the leave-one-out rule takes the predictive's default draws).
GRIDSEARCH_SAMPLES = 100
#: The start of laplace-torch's warning about ``link_approx`` in its
#: ``optimize_prior_precision``, silenced around its evidence search (a regex).
STOCK_LINK_WARNING = r"By default `link_approx` is `probit`"


@contextmanager
def _prior_restored_on_error(la: Any) -> Iterator[None]:
    """``la.prior_precision`` as it was if the body raises or is interrupted, so that a
    failed search never leaves the posterior at a value it was only trying."""
    saved = la.prior_precision.detach().clone()
    try:
        yield
    except BaseException:
        la.prior_precision = saved
        raise


def _prior_ranges(prior: torch.Tensor, names: list[str]) -> str:
    """``"lora_A a–b, others c–d"``: the range of a layerwise prior ``(L,)`` on the
    ``lora_A`` tensors among ``names`` and on the rest (a scalar prior: its value)."""
    prior = prior.detach().cpu().reshape(-1)
    if prior.numel() == 1:
        return f"{float(prior):.4g}"
    is_a = priors.lora_a_mask(names)
    parts = {"lora_A": prior[is_a], "others": prior[~is_a]}
    return ", ".join(
        f"{name} {float(v.min()):.4g}–{float(v.max()):.4g}" for name, v in parts.items() if len(v)
    )


class PriorTuningMixin(EvidenceSearchMixin, GridSearchMixin):
    """Adds the ``lora`` classes' ``optimize_prior_precision`` (see the module docstring)."""

    def optimize_prior_precision(
        self,
        pred_type: str = "glm",
        method: str | None = None,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: str | None = None,
        val_loader: DataLoader | None = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: str = "mc",
        n_samples: int | None = None,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Set ``la.prior_precision`` (laplace-torch's signature; defaults differ, see below).

        Args:
            method: ``None`` or ``"auto"`` (the default, no validation data):
                ``"leave_one_out"`` if the MAP has memorised the training data (mean
                training NLL below :data:`SATURATED_TRAIN_NLL`), else ``"lora_marglik"``;
                or one of ``"leave_one_out"``, ``"function_space"``, ``"lora_marglik"``,
                ``"linearised"``,
                ``"marglik"`` (laplace-torch's evidence, unchanged) and ``"gridsearch"``
                (needs ``val_loader``).
            prior_structure: ``"layerwise"`` (the default of ``"linearised"``: one precision
                per parameter tensor, so ``lora_A`` and ``lora_B`` get their own) or
                ``"scalar"``; with ``"marglik"`` laplace-torch's default and ``"diag"`` too.
            n_steps: Adam steps (``"marglik"``; ``"lora_marglik"`` and the default's
                evidence take at least 200 per round) or fixed-point iterations per precision
                (``"linearised"``, at least 500, stopping early once converged). Not read by
                ``"function_space"``, ``"leave_one_out"`` or ``"gridsearch"``.
            link_approx, n_samples: predictive used to score the grid (``"gridsearch"``);
                default ``"mc"``, the link this package recommends for choice logits.
                ``n_samples`` also sets the draws of the leave-one-out rule's grid. ``None``:
                the rule takes the predictive's default draws
                (:func:`laplace_lora_ext.links.default_draws`, chosen on validation data by
                ``benchmarks/prior_loo_mc_draws_check.py``) and ``"gridsearch"``
                laplace-torch's :data:`GRIDSEARCH_SAMPLES`.
            progress_bar: tqdm bars over the passes over data (``fit``'s training data for
                ``"leave_one_out"`` and ``"function_space"``, ``val_loader`` for
                ``"gridsearch"``), over the grids and over the evidence's Adam steps.
            verbose: print the method used (for the default, which rule and why) and the
                prior it chose; ``"marglik"`` prints laplace-torch's own output.
            Others: as in laplace-torch's ``BaseLaplace.optimize_prior_precision``.

        Raises:
            ValueError: unknown ``method``, ``"gridsearch"`` without ``val_loader``, a
                ``prior_structure`` the method does not support, an ``n_samples`` that
                is not an int ``>= 1``, a ``val_loader`` or grid options (``grid_size``,
                ``log_prior_prec_*``) without ``"gridsearch"``, ``lr`` or
                ``init_prior_prec`` with ``"gridsearch"`` or ``"linearised"``, ``n_steps``
                with ``"gridsearch"``, a
                ``pred_type`` other than ``"glm"`` (laplace-torch's ``"marglik"``
                ignores it too), a ``link_approx`` other
                than ``"mc"`` except with ``"gridsearch"`` (there, one it does not know), or
                ``n_samples`` with a method that scores no predictive (the evidence and
                function-space methods).
            RuleNotApplicableError: an explicit ``"leave_one_out"`` / ``"function_space"``
                that cannot be used here (e.g. ``TrainingDataSpentError``: ``fit``'s loader
                yields nothing again); the default falls back to the evidence instead.
            FloatingPointError: the evidence search diverged (too large an ``lr``).
            RuntimeError: inside ``torch.inference_mode()`` (``torch.no_grad()`` is fine).

        A failed search leaves the prior as it was.
        """
        method = "auto" if method is None else method
        default = method == "auto"
        if method not in TUNING_METHODS:
            raise ValueError(f"method must be one of {list(TUNING_METHODS)}, got {method!r}.")
        search_options.refuse_ignored_options(
            method, prior_structure, loss, pred_type, link_approx, val_loader, n_samples
        )
        search_options.refuse_unused_search_options(
            method,
            {
                "grid_size": grid_size,
                "log_prior_prec_min": log_prior_prec_min,
                "log_prior_prec_max": log_prior_prec_max,
                "log_prior_prec_base": log_prior_prec_base,
                "lr": lr,
                "n_steps": n_steps,
                "init_prior_prec": init_prior_prec,
            },
            _search_defaults(),
        )
        search_options.check_search_values(method, grid_size, n_steps, init_prior_prec)
        self._check_marglik_prior_structure(method, prior_structure, init_prior_prec)
        if n_samples is not None:
            guards.check_n_samples(n_samples)
        guards.check_autograd_available("optimize_prior_precision")
        # a failed search leaves the prior as it was; the evidence steps need autograd also
        # under a caller's torch.no_grad()
        with _prior_restored_on_error(self), torch.enable_grad():
            if default:
                method = self._default_method()
            if method in ("function_space", "leave_one_out"):
                if self._optimize_from_training_data(
                    method, n_samples, fall_back=default, progress=progress_bar
                ):
                    self._report_prior(method, default, verbose)
                    return
                method = "lora_marglik"
            if method == "lora_marglik":
                self._optimize_lora_marglik(
                    max(n_steps, 200),
                    lr,
                    float(init_prior_prec),
                    default=default,
                    progress=progress_bar,
                )
                self._report_prior(method, default, verbose)
            elif method == "linearised":
                self._optimize_linearised(
                    prior_structure or "layerwise", max(n_steps, 500), verbose
                )
            elif method == "marglik":
                structure = {} if prior_structure is None else {"prior_structure": prior_structure}
                with warnings.catch_warnings():
                    # laplace-torch's "By default `link_approx` is `probit`" is wrong here:
                    # the evidence uses no link, and this class's searches default to "mc".
                    warnings.filterwarnings("ignore", message=STOCK_LINK_WARNING)
                    super().optimize_prior_precision(
                        pred_type,
                        method="marglik",
                        n_steps=n_steps,
                        lr=lr,
                        init_prior_prec=init_prior_prec,
                        verbose=verbose,
                        progress_bar=progress_bar,
                        **structure,
                    )
                self._warn_if_marglik_not_converged(n_steps, stacklevel=3)
            else:
                self._optimize_gridsearch(
                    val_loader,
                    torch.logspace(
                        log_prior_prec_min, log_prior_prec_max, grid_size, base=log_prior_prec_base
                    ),
                    link_approx,
                    GRIDSEARCH_SAMPLES if n_samples is None else n_samples,
                    progress_bar,
                    verbose,
                )

    # ------------------------------------------------------------------ function space
    def _default_method(self) -> str:
        """``"leave_one_out"`` if the MAP has memorised the training data (mean NLL below
        :data:`SATURATED_TRAIN_NLL`) and ``fit``'s loaders are at hand, else
        ``"lora_marglik"``."""
        self._check_H_init()
        if self._training_data_memorised() and self._has_training_data():
            return "leave_one_out"
        return "lora_marglik"

    def _has_training_data(self) -> bool:
        """Whether the default can use ``"leave_one_out"``: ``fit`` kept its loaders (not
        so for a posterior restored from a state dict). Warns when it cannot."""
        if getattr(self, "_fit_loaders", None):
            return True
        warnings.warn(
            "optimize_prior_precision(): the default leave-one-out prior needs the training "
            "data of fit(), which this posterior does not have (restored from a state "
            "dict, or fitted on a one-shot iterator?); using method='lora_marglik' instead. "
            "Call la.fit(train_loader) with a re-iterable loader (a DataLoader or a list of "
            "batches) to use the default.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False

    def _fit_batches(self, loaders: list[DataLoader]) -> Iterator[Any]:
        """The batches ``fit`` counted: each rank's shard without a DistributedSampler's
        padded duplicates (:class:`~laplace_lora_ext.distributed.FitShard`).

        Raises:
            TrainingDataSpentError: once exhausted, if the loaders gave no batch (a loader
                that ``fit`` emptied, which the default then replaces by the evidence).
        """
        n_batches = 0
        for loader in loaders:
            for batch in distributed.FitShard(loader, self.dict_key_y).batches():
                n_batches += 1
                yield batch
        if not n_batches:
            raise priors.TrainingDataSpentError(
                "The training loaders given to fit() yield no batches on a second pass (a "
                "DataLoader over a single-pass IterableDataset?), so the training-data prior "
                "cannot read them; pass fit() a re-iterable loader (a DataLoader over a "
                "map-style dataset, or a list of batches)."
            )

    def _optimize_from_training_data(
        self,
        method: str,
        n_samples: int | None = None,
        fall_back: bool = False,
        progress: bool = False,
    ) -> bool:
        """``"function_space"`` (:func:`laplace_lora_ext.prior.function_space_precision`)
        or ``"leave_one_out"`` (:func:`laplace_lora_ext.loo_prior.loo_precision`) on the
        loaders of ``fit``.

        Returns ``True`` once the prior is set. With ``fall_back`` (the default method), a
        rule that does not apply (:class:`~laplace_lora_ext.prior.RuleNotApplicableError`:
        an adapter that has not changed the logits or did not start at ``lora_B = 0`` on the
        unchanged base weights, a posterior over more than LoRA matrices, a single training
        example) warns and returns ``False`` (the caller then uses ``"lora_marglik"``)
        instead of raising. ``progress``: tqdm bars over the passes.
        """
        loaders = getattr(self, "_fit_loaders", None)
        if not loaders:
            raise ValueError(
                f"method={method!r} reads the training data given to fit() again; call "
                "la.fit(train_loader) first, with a re-iterable loader (a DataLoader or a "
                "list of batches, not a one-shot iterator)."
            )
        batches = self._fit_batches(loaders)
        try:
            _check_adapter_init(self.model, method)
            _check_lora_only(self.lora_targets, method)
            if method == "leave_one_out":
                delta = loo_prior.loo_precision(self, batches, n_samples, progress=progress)
            else:
                bar = tqdm.tqdm(
                    batches, desc="[Function-space pass]", leave=False, disable=not progress
                )
                delta = priors.function_space_precision(self, bar)
        except priors.RuleNotApplicableError as e:  # unchanged or non-zero-B adapter, ...
            if not fall_back:
                raise
            warnings.warn(
                f"optimize_prior_precision(): {e} Using method='lora_marglik' instead.",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        self.prior_precision = delta.to(self._device, self._dtype)
        return True

    def _report_prior(self, method: str, default: bool, verbose: bool, score: str = "") -> None:
        """With ``verbose``, print ``method``, why the default took it, the prior's range on
        ``lora_A`` and on the other tensors, and ``score`` (the criterion's best value,
        if the method has one to show)."""
        if not verbose:
            return
        why, nll = "", f"mean training NLL {self._train_nll():.3g}"
        if default and not self._training_data_memorised():
            why = f" (the default: {nll} >= {SATURATED_TRAIN_NLL})"
        elif default:
            why = f" (the default: {nll} < {SATURATED_TRAIN_NLL}, training data memorised"
            why += (
                ")"
                if method == "leave_one_out"
                else "; leave-one-out did not apply, see the warning)"
            )
        ranges = _prior_ranges(self.prior_precision, self.lora_param_names)
        line = f"optimize_prior_precision: method={method!r}{why}; prior precision {ranges}"
        print(f"{line}; {score}" if score else line)


def _check_lora_only(targets: list[Any], method: str) -> None:
    """Raise :class:`~laplace_lora_ext.prior.RuleNotApplicableError` when the posterior
    covers parameters other than LoRA matrices (``include_extra_params=True``): the rules
    explain the logit change fine-tuning made from ``lora_B = 0``, and a trainable head's
    change cannot be separated (PEFT's ``disable_adapter`` leaves ``modules_to_save`` on,
    and its starting weights are not kept), while its Jacobian would dominate the sums
    (measured: ``lora_B``'s prior 170 times too precise on a RoBERTa head)."""
    extra = [t.name for t in targets if t.kind == "extra"]
    if extra:
        raise priors.RuleNotApplicableError(
            f"method={method!r} needs a posterior over LoRA matrices only, but it also covers "
            f"{extra} (include_extra_params=True). Use method='lora_marglik', or "
            "method='gridsearch' with a val_loader."
        )


def _check_adapter_init(model: torch.nn.Module, method: str) -> None:
    """Raise :class:`~laplace_lora_ext.adapter_init.AdapterInitError` if an active adapter
    of ``model`` did not start at ``lora_B = 0`` on the unchanged base weights, which the
    training-data rules ``method`` assume (:mod:`laplace_lora_ext.adapter_init`)."""
    problem = adapter_init.unsupported_init(model)
    if problem is not None:
        raise adapter_init.AdapterInitError(
            f"method={method!r} takes the change fine-tuning made to be the logits minus "
            f"those with the adapters switched off, from lora_B = 0, but {problem} started "
            "elsewhere (it moves part of the base weight into the adapter, or starts from "
            "lora_B != 0). Use method='lora_marglik', or method='gridsearch' with a "
            "val_loader."
        )


def _search_defaults() -> dict[str, Any]:
    """``optimize_prior_precision``'s defaults of the keywords that only some methods read
    (:data:`~laplace_lora_ext.posterior.search_options.READ_BY`), from its signature."""
    params = inspect.signature(PriorTuningMixin.optimize_prior_precision).parameters
    return {name: params[name].default for name in search_options.READ_BY}
