"""``LoraKronLaplace``: KFAC Laplace over LoRA matrices (``("lora", "kron")``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..compat import Kron, KronDecomposed, KronLaplace
from ..curvature import DEFAULT_RANK_THRESHOLD
from ..guards import check_finite_curvature, check_n_samples
from ..lowrank.auto import FactorRank, any_low_rank
from ..options import FisherType, KfacApprox
from .mixin import LoraLaplaceMixin

__all__ = ["LoraKronLaplace"]


class LoraKronLaplace(LoraLaplaceMixin, KronLaplace):
    """Laplace-LoRA with a Kronecker-factored posterior per LoRA matrix.

    Each LoRA adapter ``BA`` contributes two blocks, ``lora_A`` (``r x d_in``) and
    ``lora_B`` (``d_out x r``), each ``G ⊗ A + δ I`` with KFAC factors ``G`` (out×out)
    and ``A`` (in×in).

    Args:
        model: a PEFT LoRA model, or a module containing one, returning ``(B, C)`` logits
            (see :class:`~laplace_lora_ext.LastTokenChoiceLM`).
        likelihood: ``"classification"``.
        prior_precision: scalar or one value per parameter tensor (``len(la.params)``).
        kfac_approx: ``"expand"`` or ``"reduce"`` for sequence inputs; ``None`` (default):
            ``asdl_fisher_kwargs["kfac_approx"]`` where given, else ``"expand"``.
        fisher_type: ``"exact"`` (default), ``"mc"`` or ``"empirical"``.
        mc_samples: label samples per example for ``fisher_type="mc"``.
        factor_rank: ``"auto"`` (default): factors with a side above ``rank_threshold`` (or
            above a total dense-memory budget) at rank 256, all others dense (see
            :mod:`laplace_lora_ext.lowrank.auto`); an int ``k``: sides above
            ``rank_threshold`` at rank ``k``; ``None``: all dense.
        rank_threshold: side above which a factor is low-rank (default 2048).
        adapter_name: adapter to cover (default: the active one).
        include_extra_params: also cover other trainable ``nn.Linear`` layers, e.g. a
            ``modules_to_save`` classifier head.
        lora_modules: regular expression selecting LoRA layers by module name (default:
            all), e.g. the last block only for last-layer Laplace-LoRA.
        seed: seed of the MC label sampler.
        damping: laplace-torch's damped Kronecker prior (dense factors only).
    """

    _key = ("lora", "kron")
    _structure = "kron"

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        kfac_approx: KfacApprox | None = None,
        fisher_type: FisherType = "exact",
        mc_samples: int = 1,
        factor_rank: FactorRank = "auto",
        rank_threshold: int = DEFAULT_RANK_THRESHOLD,
        adapter_name: str | None = None,
        include_extra_params: bool = False,
        lora_modules: str | None = None,
        seed: int | None = 0,
    ) -> None:
        if damping and factor_rank not in (None, "auto"):
            raise ValueError("damping=True is not supported together with factor_rank.")
        self.damping = damping
        self.H_facs = None
        self._lora_init(
            super().__init__,
            model,
            likelihood,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            backend=backend,
            backend_kwargs=backend_kwargs,
            adapter_name=adapter_name,
            include_extra_params=include_extra_params,
            lora_modules=lora_modules,
            kfac_approx=kfac_approx,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            factor_rank=factor_rank,
            rank_threshold=rank_threshold,
            seed=seed,
            sigma_noise=sigma_noise,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            damping=damping,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
        )
        if damping and any_low_rank(self.params, *self._low_rank):
            raise ValueError(
                "damping=True needs dense Kronecker factors, but factor_rank='auto' keeps the "
                f"factors with a side above {self._low_rank[1]} low-rank for this model; pass "
                "factor_rank=None to force dense factors (memory!) or use damping=False."
            )

    def _init_H(self) -> None:
        rank, threshold = self._low_rank
        if rank is None:
            self.H = Kron.init_from_model(self.params, self._device, self._dtype)
        else:
            from ..lowrank import LowRankKron

            self.H = LowRankKron.init_from_model(
                self.params, self._device, self._dtype, rank, threshold
            )

    def _fit(self, train_loader: Any, override: bool, progress_bar: bool) -> None:
        """Fit KFAC on ``train_loader``; ``override=False`` adds data to the previous fit
        (the input factors, averages over the data, are re-weighted by the data counts)."""
        previous = None if override else self.H_facs
        if previous is not None and any_low_rank(self.params, *self._low_rank):
            warnings.warn(
                "fit(override=False) with low-rank Kronecker factors adds two truncated "
                "fits and truncates again, so it is less accurate than one fit over all the "
                "data (on a small test, 33% off the best rank-k curvature, where one fit was "
                "exact). Fit once over a loader of all the data, or pass factor_rank=None "
                "(dense factors: exact).",
                RuntimeWarning,
                stacklevel=3,
            )
        n_old = self.n_data if previous is not None else 0
        loss_old = self.loss if previous is not None else 0.0
        self._fit_loop(train_loader, override=True, progress_bar=progress_bar)
        if previous is None:
            self.H_facs = self.H
        else:
            n_new = self.n_data
            self.n_data = n_old + n_new
            self.loss = loss_old + self.loss
            self.H_facs = _scale_input_factors(
                previous, n_old / (n_old + n_new)
            ) + _scale_input_factors(self.H, n_new / (n_new + n_old))
        check_finite_curvature(self.H_facs)  # symeig would exit() on NaN
        self.H = self.H_facs.decompose(damping=self.damping)

    def _renormalise(self, H: Kron, factor: float) -> Kron:
        return _scale_input_factors(H, factor)

    def _check_curvature(self, H_batch: Any) -> None:
        kfacs = H_batch.kfacs
        if len(kfacs) != len(self.params):
            raise RuntimeError(
                f"Curvature backend returned {len(kfacs)} factor blocks for "
                f"{len(self.params)} parameter tensors."
            )
        for name, p, F in zip(self.lora_param_names, self.params, kfacs, strict=True):
            expected = [(d, d) for d in p.shape]
            got = [tuple(f.shape) for f in F]
            if got != expected:
                raise RuntimeError(
                    f"Kronecker factors of {name} have shapes {got}, expected {expected} "
                    "(layout [out×out, in×in])."
                )

    @property
    def posterior_precision(self) -> KronDecomposed:
        """``H * factor + prior`` as (LowRank)KronDecomposed, keeping the damping flag."""
        self._check_H_init()
        P = self.H * self._H_factor + self.prior_precision
        P.damping = self.damping
        return P

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        """``log det (H * factor + prior)``, scalar. Before ``fit`` laplace-torch returns the
        prior's log-determinant, which made ``log_det_ratio`` a silent 0; here it raises."""
        return self.posterior_precision.logdet()

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        """``(value − mean)ᵀ P (value − mean)`` for ``value`` ``(P,)``; needs ``fit``."""
        delta = value - self.mean
        return delta @ self.posterior_precision.bmm(delta, exponent=1)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior weight samples ``(n_samples, P)``."""
        check_n_samples(n_samples)
        z = torch.randn(
            n_samples, self.n_params, device=self._device, dtype=self._dtype, generator=generator
        )
        z = self.posterior_precision.bmm(z, exponent=-0.5).reshape(n_samples, self.n_params)
        return self.mean.reshape(1, -1) + z

    def _functional_variance_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        P = self.posterior_precision
        deltas = P.deltas if P.deltas.ndim > 0 else P.deltas.reshape(1)
        f_var = None
        for i, W in enumerate(blocks):
            delta = deltas[i : i + 1] if len(deltas) > 1 else deltas[:1]
            block = type(P)(
                P.eigenvectors[i : i + 1], P.eigenvalues[i : i + 1], delta, damping=P.damping
            )
            contrib = block.inv_square_form(W.to(self._dtype))
            f_var = contrib if f_var is None else f_var + contrib
        return f_var


def _scale_input_factors(kron: Kron, factor: float) -> Kron:
    """A new ``Kron`` with every weight's input factor ``A`` (index 1) times ``factor``
    (``kron`` is left untouched, unlike laplace-torch's in-place ``_rescale_factors``)."""
    return type(kron)([[F[0], F[1] * factor] if len(F) == 2 else list(F) for F in kron.kfacs])
