"""Shared behaviour of the ``subset_of_weights="lora"`` Laplace classes.

The mixin goes first in the MRO of each concrete class (``LoraKronLaplace(LoraLaplaceMixin,
KronLaplace)``) and replaces what laplace-torch does differently for PEFT models:
parameter selection (LoRA matrices only), the curvature backend, ``fit`` on HF dict
batches, the Jacobian-free GLM predictive and the link approximations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import tqdm
from laplace.utils.enums import Likelihood
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from .. import distributed  # issue 8
from ..curvature import LoraCurvature
from ..inputs import forward_logits, split_batch
from ..links import LINK_APPROXIMATIONS, apply_link
from ..predictive import glm_predictive_moments
from ..targets import check_same_device, collect_targets, param_names, target_params

__all__ = ["LoraLaplaceMixin"]


class LoraLaplaceMixin:
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
        kfac_approx: str,
        fisher_type: str,
        mc_samples: int,
        factor_rank: int | None,
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
        if backend is not None and not (
            isinstance(backend, type) and issubclass(backend, LoraCurvature)
        ):
            raise ValueError(
                f"backend={getattr(backend, '__name__', backend)} is not supported with "
                "subset_of_weights='lora'; leave backend=None (LoraCurvature is used)."
            )
        if factor_rank is not None and (not isinstance(factor_rank, int) or factor_rank < 1):
            raise ValueError(f"factor_rank must be a positive int or None, got {factor_rank!r}.")
        self._maybe_prepare_quantized(model)
        targets = collect_targets(model, adapter_name, include_extra_params, lora_modules)
        params = target_params(targets)
        check_same_device(params)
        self.lora_targets = targets
        self.lora_param_names = param_names(targets)
        self.kfac_approx = kfac_approx
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.factor_rank = factor_rank
        self.rank_threshold = rank_threshold
        self._curvature_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        kwargs = dict(
            targets=targets,
            kfac_approx=kfac_approx,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            factor_rank=factor_rank,
            rank_threshold=rank_threshold,
            seed=seed,
            curvature_dtype=self._curvature_dtype,
        )
        kwargs.update(backend_kwargs or {})
        self.H = None  # keep ParametricLaplace from initialising H before params are set
        base_init(
            model,
            likelihood,
            prior_precision=1.0,
            prior_mean=0.0,
            backend=backend or LoraCurvature,
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

    # ------------------------------------------------------------------ fitting
    def fit(
        self, train_loader: DataLoader, override: bool = True, progress_bar: bool = False
    ) -> None:
        """Fit the curvature on ``train_loader`` (dict batches with labels, or ``(X, y)``).

        Args:
            train_loader: loader whose ``dataset`` has a length (N, the data size).
            override: start afresh (``True``) or add to the previous fit.
            progress_bar: show a tqdm progress bar over batches.
        """
        self._fit_loop(train_loader, override, progress_bar)

    def _fit_loop(self, train_loader: DataLoader, override: bool, progress_bar: bool) -> None:
        _dataset_size(train_loader)  # clear errors for loaders without data
        # this rank's shard and the true total N (a pass-through outside torch.distributed,
        # see laplace_lora_ext/distributed.py)
        shard = distributed.FitShard(train_loader, self.dict_key_y)
        N = shard.n_total
        # a previous fit (override=False) is kept aside and added after the ranks are
        # combined, so that only the new terms are summed across ranks
        previous = None if override or self.H is None else (self.H, self.loss)
        if previous is None:
            self.n_data = 0
        self._init_H()
        self.loss = 0.0
        self.model.eval()
        self.mean = parameters_to_vector(self.params).detach().to(self._dtype)
        n_batches = 0
        bar = tqdm.tqdm(shard.batches(), disable=not progress_bar, desc="[Computing Hessian]")
        for batch in bar:
            X, y = split_batch(batch, self.dict_key_y, self._device)
            self.model.zero_grad(set_to_none=True)
            loss_batch, H_batch = self._curv_closure(X, y, N=N)
            if n_batches == 0:
                self._check_curvature(H_batch)
                self.n_outputs = self.backend.n_outputs
            self.loss += loss_batch
            self.H += H_batch
            n_batches += 1
        if n_batches == 0:
            raise ValueError("train_loader yielded no batches; cannot fit on empty data.")
        self.H, self.loss = shard.combine(self.H, self.loss)
        if previous is not None:
            self.H, self.loss = previous[0] + self.H, previous[1] + self.loss
        self.n_data += N

    def _check_curvature(self, H_batch: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ prediction
    def _glm_predictive_distribution(
        self, X: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM predictive mean ``(B, C)`` and covariance ``(B, C, C)`` (no full Jacobian)."""
        if joint:
            raise ValueError("joint=True (covariance across the batch) is not supported.")
        self._check_H_init()
        f_mu, f_var = glm_predictive_moments(self, X)
        if diagonal_output:
            f_var = f_var.diagonal(dim1=-2, dim2=-1)
        return f_mu, f_var

    def _functional_variance_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """``Σ_l W_l Σ_l W_lᵀ`` for per-parameter-tensor Jacobian blocks ``W_l`` (B, C, p_l)."""
        raise NotImplementedError

    def __call__(
        self,
        x: torch.Tensor | Mapping[str, Any],
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
        n_samples: int = 100,
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
            n_samples: Monte Carlo samples.
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
        if pred_type == "nn":
            return self._nn_predictive_classification(x, n_samples, generator)
        f_mu, f_var = self._glm_predictive_distribution(x)
        if diagonal_output:
            f_var = torch.diag_embed(f_var.diagonal(dim1=-2, dim2=-1))
        return apply_link(link_approx, f_mu, f_var, n_samples, generator)

    def _nn_predictive_classification(
        self, X: Any, n_samples: int = 100, generator: torch.Generator | None = None, **_: Any
    ) -> torch.Tensor:
        """Average of softmax outputs over posterior weight samples ``(B, C)``."""
        self._check_H_init()
        probs = 0.0
        try:
            with torch.no_grad():
                for sample in self.sample(n_samples, generator=generator):
                    _write_params(sample, self.params)
                    logits = forward_logits(self.model, X, self.dict_key_y)
                    probs = probs + torch.softmax(logits.to(self._dtype), dim=-1) / n_samples
        finally:
            _write_params(self.mean, self.params)
        return probs

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lora_config"] = {
            "param_names": self.lora_param_names,
            "kfac_approx": self.kfac_approx,
            "fisher_type": self.fisher_type,
            "factor_rank": self.factor_rank,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        config = state_dict.get("lora_config")
        if config is not None and config.get("factor_rank") != self.factor_rank:
            raise ValueError(
                f"The saved posterior has factor_rank={config.get('factor_rank')} but this "
                f"object was built with factor_rank={self.factor_rank}; build it with the same "
                "factor_rank (and rank_threshold) before load_state_dict."
            )
        if config is not None and config["param_names"] != self.lora_param_names:
            raise ValueError(
                "The saved posterior covers different LoRA parameters than this model "
                f"({len(config['param_names'])} vs {len(self.lora_param_names)} tensors); "
                "rebuild the model with the same LoraConfig and adapter."
            )
        super().load_state_dict(state_dict)


def _write_params(vector: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Copy a flat vector into ``params`` in place (keeps each parameter's dtype)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vector[offset : offset + n].view_as(p))
            offset += n


def _dataset_size(loader: DataLoader) -> int:
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise TypeError("fit needs a DataLoader with a .dataset (its length is N).")
    N = len(dataset)
    if N == 0:
        raise ValueError("train_loader's dataset is empty; cannot fit on empty data.")
    return N
