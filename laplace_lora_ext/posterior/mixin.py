"""Shared behaviour of the ``subset_of_weights="lora"`` Laplace classes.

The mixin goes first in the MRO of each concrete class (``LoraKronLaplace(LoraLaplaceMixin,
KronLaplace)``) and replaces what laplace-torch does differently for PEFT models:
parameter selection (LoRA matrices only), the curvature backend, ``fit`` on HF dict
batches, the Jacobian-free GLM predictive and the link approximations. Its bases add the
prior search (:mod:`.tuning`), weight samples and the ``"nn"`` predictive
(:mod:`.weight_sampling`) and saving and loading (:mod:`.persistence`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import tqdm
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from .. import distributed, guards  # issue 8
from ..compat import Likelihood
from ..curvature import LoraCurvature
from ..curvature.stock import StockKfacCurvature, resolve_stock_backend
from ..inputs import split_batch, to_device
from ..links import LINK_APPROXIMATIONS, apply_link
from ..lowrank.auto import FactorRank, any_low_rank, resolve_factor_rank
from ..lowrank.factor import compute_dtype
from ..options import (
    FisherType,
    KfacApprox,
    LinkApprox,
    PredType,
    check_backend,
    check_backend_kwargs,
    check_unsupported_keywords,
    resolve_kfac_approx,
    validate_lora_options,
)
from ..predictive import logit_jacobian_blocks
from ..targets import (
    check_same_device,
    collect_targets,
    param_names,
    target_params,
    warn_untracked,
)
from .persistence import FIT_STATE, PosteriorPersistenceMixin
from .tuning import PriorTuningMixin
from .weight_sampling import NN_SAMPLES, WeightSamplingMixin

__all__ = ["LoraLaplaceMixin"]


class LoraLaplaceMixin(PriorTuningMixin, WeightSamplingMixin, PosteriorPersistenceMixin):
    """Mixin for Laplace over LoRA matrices (see the concrete classes for the arguments)."""

    _structure: str = ""

    # ------------------------------------------------------------------ set-up
    def _lora_init(
        self,
        base_init: Any,
        model: nn.Module,
        likelihood: str,
        *,
        prior_precision: float | torch.Tensor,
        prior_mean: float | torch.Tensor,
        backend: type | None,
        backend_kwargs: dict[str, Any] | None,
        adapter_name: str | None,
        include_extra_params: bool,
        kfac_approx: KfacApprox | None,
        fisher_type: FisherType,
        mc_samples: int,
        factor_rank: FactorRank,
        rank_threshold: int,
        seed: int | None,
        lora_modules: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        if likelihood != Likelihood.CLASSIFICATION:
            raise ValueError(
                f"subset_of_weights='lora' supports likelihood='classification' only, got "
                f"{likelihood!r}. For regression use laplace-torch's own classes."
            )
        # laplace-torch's CurvlinopsGGN / CurvlinopsEF run on the LoRA matrices (kron only)
        stock, fisher_type = resolve_stock_backend(
            backend, self._structure, fisher_type, backend_kwargs
        )
        if stock is None:
            check_backend(backend, LoraCurvature)
        check_unsupported_keywords(
            enable_backprop=base_kwargs.get("enable_backprop", False),
            dict_key_x=base_kwargs.get("dict_key_x", "input_ids"),
        )
        # laplace-torch's idiom asdl_fisher_kwargs={"kfac_approx": ...}; nothing is left to
        # forward to the backend's kron() after this
        kfac_approx = resolve_kfac_approx(
            kfac_approx, base_kwargs.pop("asdl_fisher_kwargs", None), self._structure
        )
        validate_lora_options(
            kfac_approx=kfac_approx,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            factor_rank=factor_rank,
            rank_threshold=rank_threshold,
            seed=seed,
        )
        self._maybe_prepare_quantized(model)
        targets = collect_targets(model, adapter_name, include_extra_params, lora_modules)
        warn_untracked(model, targets)
        params = target_params(targets)
        check_same_device(params)
        self.lora_targets = targets
        self.lora_param_names = param_names(targets)
        self.kfac_approx = kfac_approx
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.factor_rank = factor_rank
        self.rank_threshold = rank_threshold
        self._curvature_dtype = compute_dtype(params[0].dtype)
        # "auto" -> (rank, threshold) for these parameter shapes (lowrank/auto.py)
        self._low_rank = resolve_factor_rank(
            factor_rank, rank_threshold, params, self._curvature_dtype
        )
        if stock is not None:
            if any_low_rank(params, *self._low_rank):
                raise ValueError(
                    f"backend={stock.__name__} computes dense Kronecker factors, but "
                    f"factor_rank={factor_rank!r} keeps some low-rank for this model; pass "
                    "factor_rank=None (dense) or leave backend=None."
                )
            self._low_rank = (None, self._low_rank[1])
        kwargs = dict(
            targets=targets,
            kfac_approx=kfac_approx,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            factor_rank=self._low_rank[0],
            rank_threshold=self._low_rank[1],
            seed=seed,
            curvature_dtype=self._curvature_dtype,
        )
        if stock is not None:
            kwargs["stock_backend"] = stock
        check_backend_kwargs(backend_kwargs, [*kwargs, "stock_backend"])
        kwargs.update(backend_kwargs or {})
        self.H = None  # keep ParametricLaplace from initialising H before params are set
        base_init(
            model,
            likelihood,
            prior_precision=1.0,
            prior_mean=0.0,
            backend=StockKfacCurvature if stock is not None else backend or LoraCurvature,
            backend_kwargs=kwargs,
            **base_kwargs,
        )
        self.params = params
        self.n_params = sum(p.numel() for p in params)
        self.n_layers = len(params)
        self.is_subset_params = True
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self.mean = self.prior_mean

    @staticmethod
    def _maybe_prepare_quantized(model: nn.Module) -> None:
        from .. import quant

        if quant.is_quantized_4bit(model):
            if not quant.bitsandbytes_available():
                raise ImportError(
                    "The model has bitsandbytes 4-bit layers but bitsandbytes is not "
                    'installed: pip install "laplace-lora-ext[quant]".'
                )
            quant.prepare_4bit_for_laplace(model)

    @property
    def _dtype(self) -> torch.dtype:
        """Dtype of the curvature, prior and posterior (float32 or better)."""
        return self._curvature_dtype

    # ------------------------------------------------------------------ checked scalars
    @property
    def prior_precision(self) -> torch.Tensor:
        """Prior precision: scalar ``(1,)``, per parameter tensor or (not kron) per weight."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | torch.Tensor) -> None:
        """Refuses ``<= 0``, NaN, inf and wrong lengths; a refused value is not stored."""
        guards.check_positive("prior_precision", value)
        with guards.restore_on_error(self, ("_prior_precision", "_posterior_scale")):
            super(LoraLaplaceMixin, type(self)).prior_precision.fset(self, value)

    @property
    def prior_mean(self) -> torch.Tensor:
        """Prior mean: a scalar or one value per LoRA weight ``(P,)``."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | torch.Tensor) -> None:
        """Refuses NaN and inf (the evidence and the scatter would turn NaN, and the prior
        search would then blame the prior precision); laplace-torch checks the rest."""
        if isinstance(value, (int, float)) or torch.is_tensor(value):
            if not bool(torch.isfinite(torch.as_tensor(value)).all()):
                raise ValueError(
                    "prior_mean must be finite, got NaN or inf; pass 0 (the default) or the "
                    "weights the prior is centred at."
                )
        super(LoraLaplaceMixin, type(self)).prior_mean.fset(self, value)

    @property
    def temperature(self) -> float | torch.Tensor:
        """Likelihood temperature (> 0; the curvature is divided by it)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float | torch.Tensor) -> None:
        """Refuses ``<= 0``, NaN, inf and more than one value (a vector would scale the
        curvature's columns unevenly and make the evidence a vector)."""
        guards.check_positive("temperature", value)
        if torch.is_tensor(value) and value.numel() != 1:
            raise ValueError(
                f"temperature must be one number, got a tensor of shape {tuple(value.shape)}."
            )
        self._temperature = value
        if hasattr(self, "_posterior_scale"):  # full: the cached covariance factor is stale
            self._posterior_scale = None

    @property
    def sigma_noise(self) -> torch.Tensor:
        """Observation noise of regression; always 1 for classification."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | torch.Tensor) -> None:
        """Refuses any value but 1: the ``lora`` classes are classification posteriors, and
        laplace-torch would divide the curvature and the log-likelihood by ``σ²``."""
        if bool(torch.any(torch.as_tensor(value) != 1)):
            raise ValueError(
                f"sigma_noise is the observation noise of regression; a classification "
                f"posterior keeps sigma_noise=1, got {value!r}. To soften the predictions use "
                "la.temperature or the prior precision."
            )
        super(LoraLaplaceMixin, type(self)).sigma_noise.fset(self, value)

    # ------------------------------------------------------------------ fitting
    def fit(
        self, train_loader: DataLoader, override: bool = True, progress_bar: bool = False
    ) -> None:
        """Fit the curvature on ``train_loader`` (dict batches with labels, or ``(X, y)``).

        N is the number of examples the loader actually yields (counted; a ``drop_last``
        loader, a subset sampler or an ``IterableDataset`` without ``__len__`` are fine).
        The fit is atomic: if it raises (a bad batch, NaN/inf, a failing loader), the
        previous posterior (curvature, loss, ``n_data``, mean, prior) is left exactly as it
        was. The model runs in eval mode; its modules' modes and ``.grad`` are left as they
        were.

        Args:
            train_loader: an iterable of dict batches (labels under ``dict_key_y``) or
                ``(X, y)`` pairs, usually a ``DataLoader``.
            override: start afresh (``True``) or add to the previous fit.
            progress_bar: show a tqdm progress bar over batches.

        Raises:
            NonFiniteError: NaN or inf in a batch's logits, layer inputs, output gradients,
                loss or curvature (the message names the batch).
            ValueError: a LoRA layer whose inputs do not start with the batch (a
                mixture-of-experts block, a sequence-first layer), at the first batch.
            RuntimeError: inside ``torch.inference_mode()`` (``torch.no_grad()`` is fine).
        """
        guards.check_autograd_available("fit")
        reset = getattr(self.backend, "reset_generator", None)
        if override and reset is not None:  # a fresh fit draws the same MC labels per seed
            reset()  # (KFAC's _fit always sums afresh, so this is keyed on the caller's call)
        with guards.restore_on_error(self, FIT_STATE), guards.eval_mode(self.model):
            self._fit(train_loader, override, progress_bar)
        # kept (a reference, no copy) for optimize_prior_precision(method="function_space");
        # a one-shot iterator is spent by now, so nothing is kept (None: data unavailable)
        previous = [] if override else getattr(self, "_fit_loaders", [])
        data_lost = previous is None or isinstance(train_loader, Iterator)
        self._fit_loaders = None if data_lost else [*previous, train_loader]

    def _fit(self, train_loader: DataLoader, override: bool, progress_bar: bool) -> None:
        self._fit_loop(train_loader, override, progress_bar)

    def _renormalise(self, H: Any, factor: float) -> Any:
        """Curvature fitted with the input normalisation ``1/N`` rescaled to ``factor/N``
        (only KFAC input factors depend on N)."""
        return H

    def _fit_loop(self, train_loader: DataLoader, override: bool, progress_bar: bool) -> None:
        shard = self._start_fit(train_loader, override)
        N = shard.n_total or 1  # None: no __len__ (N is counted below)
        # a previous fit (override=False) is kept aside and added after the ranks are
        # combined, so that only the new terms are summed across ranks
        previous = None if override or self.H is None else (self.H, self.loss)
        if previous is None:
            self.n_data = 0
        self._init_H()
        self.loss = 0.0
        self.mean = parameters_to_vector(self.params).detach().to(self._dtype)
        error, n_seen = None, 0
        try:
            n_seen = self._accumulate(shard, N, progress_bar)
        except Exception as e:  # in a distributed fit: reported to every rank below
            if not shard.active:
                raise
            error = e
        if shard.active:
            distributed.agree(error, "while fitting the batches")
        self.H, self.loss = shard.combine(self.H, self.loss)
        if not shard.active and n_seen != N:
            # the loader yielded another number of examples than len(dataset) (drop_last,
            # a subset sampler, no __len__): N is what was seen
            self.H = self._renormalise(self.H, N / n_seen)
            N = n_seen
        if previous is not None:
            self.H, self.loss = previous[0] + self.H, previous[1] + self.loss
        self.n_data += N

    def _start_fit(self, train_loader: DataLoader, override: bool) -> distributed.FitShard:
        """This rank's :class:`~laplace_lora_ext.distributed.FitShard` (N, batches).

        In a distributed fit this is the first collective: every rank's set-up error and
        :func:`~laplace_lora_ext.distributed.fingerprint` (model, options, weights) are
        exchanged, so a failure or a mismatch on any rank raises on all of them.
        """
        if not distributed.is_distributed():
            _dataset_size(train_loader)  # clear errors for loaders without data
            return distributed.FitShard(train_loader, self.dict_key_y)
        shard, error = None, None
        try:
            _dataset_size(train_loader)
            shard = distributed.FitShard(train_loader, self.dict_key_y)
        except Exception as e:
            error = e
        length = getattr(shard, "shard_length", None)
        payload = (distributed.fingerprint(self, override), length)
        gathered = distributed.agree(error, "before fitting", payload)
        distributed.check_consistent([g[0] for g in gathered])
        if length is not None:  # mark_sharded: N is the sum of the shard lengths
            shard.set_shard_lengths([g[1] for g in gathered])
        return shard

    def _accumulate(self, shard: distributed.FitShard, N: int, progress_bar: bool) -> int:
        """Add every batch's loss and curvature to ``self.loss`` / ``self.H``; returns the
        number of examples seen."""
        n_batches = n_seen = 0
        bar = tqdm.tqdm(shard.batches(), disable=not progress_bar, desc="[Computing Hessian]")
        for batch in bar:
            X, y = split_batch(batch, self.dict_key_y, self._device)
            try:
                loss_batch, H_batch = self._curv_closure(X, y, N=N)
                guards.check_finite_curvature(H_batch, loss_batch)
            except guards.NonFiniteError as e:
                raise guards.NonFiniteError(
                    f"Batch {n_batches} of train_loader (examples {n_seen}.."
                    f"{n_seen + _n_examples(y) - 1} in loader order): {e}"
                ) from None
            if n_batches == 0:
                self._check_curvature(H_batch)
                self.n_outputs = self.backend.n_outputs
            self.loss += loss_batch
            self.H += H_batch
            n_batches += 1
            n_seen += _n_examples(y)
        if n_batches == 0:
            raise ValueError("train_loader yielded no batches; cannot fit on empty data.")
        return n_seen

    def _check_curvature(self, H_batch: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ prediction
    def predictive_moments(
        self, x: torch.Tensor | Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian over the logits of the linearised (GLM) model: mean and covariance.

        ``f(x) ~ N(f_mu, f_var)`` with ``f_mu = f(x; θ_MAP)`` (the model's own logits) and
        ``f_var = J Σ Jᵀ``, ``J = ∂f/∂θ`` over the LoRA parameters and ``Σ`` the posterior
        covariance. One forward and ``C`` backward passes; the full ``(B, C, P)`` Jacobian is
        never built. Every link approximation (:func:`laplace_lora_ext.links.apply_link`)
        turns these moments into probabilities, so one call serves several links.

        This method owns the GLM predictive: ``la(x)`` and laplace-torch's
        ``_glm_predictive_distribution`` call it. The Jacobian blocks come from
        :func:`laplace_lora_ext.predictive.logit_jacobian_blocks`; each posterior class
        contracts them with its covariance in ``_functional_variance_blocks``.

        Args:
            x: a dict batch (labels are ignored) or an input tensor; moved to the model's
                device (``la._device``), as ``fit`` moves its batches.

        Returns:
            ``f_mu`` ``(B, C)`` and ``f_var`` ``(B, C, C)``, in the posterior's dtype
            (float32, or float64 for a float64 model), detached.

        Raises:
            AttributeError: if the posterior has not been fitted (call ``fit`` first).
            RuntimeError: inside ``torch.inference_mode()`` (``torch.no_grad()`` is fine).
        """
        self._check_H_init()
        guards.check_autograd_available("The GLM predictive (la(x), predictive_moments)")
        with guards.eval_mode(self.model):  # dropout off; the caller's modes come back
            f_mu, blocks = logit_jacobian_blocks(self.backend, to_device(x, self._device))
        self._check_n_outputs(f_mu.shape[-1])
        with torch.no_grad():  # detached also when the prior carries a graph (a user's loop)
            return f_mu.detach(), self._functional_variance_blocks(blocks)

    def _check_n_outputs(self, n_outputs: int) -> None:
        """Refuse a model whose outputs differ from those the posterior was fitted with
        (e.g. a state dict loaded into a ``LastTokenChoiceLM`` with other ``target_ids``)."""
        fitted = getattr(self, "n_outputs", None)
        if fitted is not None and int(fitted) != n_outputs:
            raise ValueError(
                f"The posterior was fitted on a model with {int(fitted)} outputs, but the model "
                f"now returns {n_outputs} (other target_ids or num_labels?). Its curvature "
                "belongs to the other outputs: refit with la.fit(train_loader)."
            )

    @property
    def scatter(self) -> torch.Tensor:
        """``(mean − prior_mean)ᵀ P₀ (mean − prior_mean)``, scalar. The mean is the fitted
        LoRA weights, so this needs ``fit`` (laplace-torch fails inside a matmul instead)."""
        self._check_H_init()
        return super().scatter

    def _glm_predictive_distribution(
        self, X: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """laplace-torch's hook: :meth:`predictive_moments` (``f_var`` diagonal on request)."""
        if joint:
            raise ValueError("joint=True (covariance across the batch) is not supported.")
        f_mu, f_var = self.predictive_moments(X)
        if diagonal_output:
            f_var = f_var.diagonal(dim1=-2, dim2=-1)
        return f_mu, f_var

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        """``J Σ Jᵀ`` ``(B, C, C)`` for Jacobians ``Js`` ``(B, C, P)`` over ``la.params``.

        ``Js`` is what ``la.backend.jacobians(x)`` returns: columns in ``la.params`` order,
        only the posterior's parameters (a trainable head left out with
        ``include_extra_params=False`` has no columns).

        Raises:
            ValueError: if ``Js`` does not have ``la.n_params`` columns.
        """
        if Js.ndim != 3 or Js.shape[-1] != self.n_params:
            raise ValueError(
                f"Js has shape {tuple(Js.shape)}; expected (batch, outputs, {self.n_params}) "
                "with one column per posterior parameter (la.params order), as returned by "
                "la.backend.jacobians(x)."
            )
        sizes = [p.numel() for p in self.params]
        return self._functional_variance_blocks(list(Js.to(self._dtype).split(sizes, dim=-1)))

    def _functional_variance_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """``Σ_l W_l Σ_l W_lᵀ`` ``(B, C, C)`` for the Jacobian blocks ``W_l`` ``(B, C, p_l)``.

        The one structure-specific step of the GLM predictive (``blocks`` in ``la.params``
        order, ``Σ_l`` this posterior's covariance block of parameter tensor ``l``); each
        concrete class implements it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement _functional_variance_blocks"
        )

    def __call__(
        self,
        x: torch.Tensor | Mapping[str, Any],
        pred_type: PredType = "glm",
        joint: bool = False,
        link_approx: LinkApprox = "probit",
        n_samples: int | None = None,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Posterior predictive class probabilities ``(B, C)``.

        Args:
            x: a dict batch (labels are ignored) or an input tensor.
            pred_type: ``"glm"`` (linearised model, default) or ``"nn"`` (sampling weights).
            link_approx: ``"probit"`` (default), ``"mc"`` (joint MC over logits),
                ``"mc_indep"``, ``"bridge"`` or ``"bridge_norm"``; ``"nn"`` needs ``"mc"``.
            n_samples: Monte Carlo samples. ``None`` (default): 100 network samples for
                ``pred_type="nn"`` (laplace-torch's default); for the GLM links
                ``links.default_draws(C)`` draws of the logits (10,000 for up to 14 classes),
                which cost little beside the Jacobians.
            generator: random generator for reproducible sampling.
        """
        if pred_type not in ("glm", "nn"):
            raise ValueError(f"pred_type must be 'glm' or 'nn', got {pred_type!r}.")
        if link_approx not in LINK_APPROXIMATIONS:
            raise ValueError(
                f"Unsupported link_approx {link_approx!r}; choose one of {LINK_APPROXIMATIONS}."
            )
        if pred_type == "nn" and link_approx != "mc":
            raise ValueError("pred_type='nn' supports link_approx='mc' only.")
        if joint:
            raise ValueError("joint=True is only meaningful for regression; not supported here.")
        if n_samples is not None:
            guards.check_n_samples(n_samples)
        if pred_type == "nn":
            n_samples = NN_SAMPLES if n_samples is None else n_samples
            return self._nn_predictive_classification(x, n_samples, generator, **model_kwargs)
        if model_kwargs:
            raise TypeError(
                f"Keyword arguments {sorted(model_kwargs)} are passed to the model with "
                "pred_type='nn' only (as in laplace-torch); for the GLM predictive put them "
                "in the batch dict or in your model wrapper."
            )
        f_mu, f_var = self._glm_predictive_distribution(x)
        if diagonal_output:
            f_var = torch.diag_embed(f_var.diagonal(dim1=-2, dim2=-1))
        return apply_link(link_approx, f_mu, f_var, n_samples, generator)


def _dataset_size(loader: DataLoader) -> int | None:
    """``len(loader.dataset)`` (``None`` when unknown); an empty dataset is an error."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(type(dataset), "__len__"):
        return None
    N = len(dataset)
    if N == 0:
        raise ValueError("train_loader's dataset is empty; cannot fit on empty data.")
    return N


def _n_examples(y: Any) -> int:
    """Number of examples in a batch's labels."""
    return int(y.shape[0]) if torch.is_tensor(y) and y.ndim > 0 else len(y)
