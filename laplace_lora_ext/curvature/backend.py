"""``LoraCurvature``: the LoRA-aware curvature backend (a laplace-torch ``CurvatureInterface``).

Each LoRA adapter ``BA`` is treated as two linear layers (``lora_A``: d_in -> r,
``lora_B``: r -> d_out) with their own Kronecker factors. Inputs and output gradients are
captured with autograd hooks (see :mod:`.capture`); ``kron`` returns KFAC with correct
sequence scaling (expand or reduce), ``diag``/``full`` the exact GGN (or empirical /
MC Fisher) diagonal / matrix over the LoRA parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from ..compat import CurvatureInterface, Kron
from ..guards import check_class_labels
from ..inputs import attention_mask_of, forward_logits
from ..lowrank.auto import DEFAULT_RANK_THRESHOLD, FactorRank, resolve_factor_rank
from ..lowrank.factor import compute_dtype
from ..options import FisherType, KfacApprox
from ..targets import LoraTarget, target_params
from ..wrappers import check_not_vocabulary_logits
from .capture import Captured, capture_forward, output_gradients, token_weights
from .fisher import FISHER_TYPES, grad_output_vectors
from .kfac import KFAC_APPROX, drop_zero_rows, input_root, output_root, reaching_weights

__all__ = ["LoraCurvature", "DEFAULT_RANK_THRESHOLD"]


class LoraCurvature(CurvatureInterface):
    """Curvature of a classification loss w.r.t. LoRA matrices, via autograd hooks.

    Args:
        model: the (wrapped) PEFT model returning logits ``(B, C)``.
        likelihood: only ``"classification"``.
        targets: the posterior's layers (see :func:`laplace_lora_ext.targets.collect_targets`).
        kfac_approx: ``"expand"`` (default) or ``"reduce"``.
        fisher_type: ``"exact"`` (default; ``C - 1`` backward passes per batch), ``"mc"`` or
            ``"empirical"``.
        mc_samples: label samples per example for ``fisher_type="mc"``.
        factor_rank: if set, Kronecker factors with a side above ``rank_threshold`` are kept
            as rank-``factor_rank`` approximations; ``"auto"``: see
            :mod:`laplace_lora_ext.lowrank.auto`.
        rank_threshold: side length above which a factor is low-rank.
        seed: seed of the generator used for ``fisher_type="mc"``.
        curvature_dtype: dtype to accumulate in (default: float64 for float64 models,
            otherwise float32).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        *,
        targets: list[LoraTarget],
        kfac_approx: KfacApprox = "expand",
        fisher_type: FisherType = "exact",
        mc_samples: int = 1,
        factor_rank: FactorRank = None,
        rank_threshold: int = DEFAULT_RANK_THRESHOLD,
        seed: int | None = 0,
        curvature_dtype: torch.dtype | None = None,
    ) -> None:
        if likelihood != "classification":
            raise ValueError(
                f"LoraCurvature supports likelihood='classification' only, got {likelihood!r}."
            )
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}.")
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}.")
        super().__init__(model, likelihood, dict_key_x=dict_key_x, dict_key_y=dict_key_y)
        self.targets = targets
        self.params = target_params(targets)
        self.kfac_approx = kfac_approx
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.seed = seed
        self._generator: torch.Generator | None = None
        model_dtype = self.params[0].dtype
        self.curvature_dtype = curvature_dtype or compute_dtype(model_dtype)
        # "auto" -> (rank, threshold) for these parameter shapes (lowrank/auto.py)
        self.factor_rank, self.rank_threshold = resolve_factor_rank(
            factor_rank, rank_threshold, self.params, self.curvature_dtype
        )

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def generator(self) -> torch.Generator | None:
        """Seeded generator for MC label sampling (created on first use)."""
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._generator

    def reset_generator(self) -> None:
        """Start the MC label draws again from ``seed`` (each fresh ``fit``; a fit with
        ``override=False`` continues the stream)."""
        self._generator = None

    def capture(self, x: torch.Tensor | MutableMapping[str, Any]) -> Captured:
        """Forward ``x`` recording every target's input and output."""
        return capture_forward(lambda: forward_logits(self.model, x, self.dict_key_y), self.targets)

    def _check_labels(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` as ``(B,)`` class indices on ``logits``' device (:func:`check_class_labels`),
        after refusing whole-vocabulary logits (:func:`check_not_vocabulary_logits`)."""
        check_not_vocabulary_logits(self.model, logits.shape[-1])
        return check_class_labels(y, len(logits), logits.shape[-1]).to(logits.device)

    def _batch(
        self, x: Any, y: torch.Tensor
    ) -> tuple[Captured, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Forward, loss, grad-output vectors ``(K, B, C)`` and token weights per target."""
        cap = self.capture(x)
        y = self._check_labels(cap.logits, y)
        logits = cap.logits.detach().to(self.curvature_dtype)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        V = grad_output_vectors(cap.logits, y, self.fisher_type, self.mc_samples, self.generator())
        mask = attention_mask_of(x)
        weights = [token_weights(mask, a).to(self.curvature_dtype) for a in cap.inputs]
        self.n_outputs = cap.logits.shape[-1]
        return cap, loss, V, weights

    def _is_low_rank(self, side: int) -> bool:
        return self.factor_rank is not None and side > self.rank_threshold

    def _factor(self, rows: list[torch.Tensor], side: int) -> Any:
        """Dense ``RᵀR`` or a low-rank factor from root rows ``(m, side)``."""
        R = torch.cat(rows) if rows else torch.zeros(0, side, device=self.device)
        R = R.to(self.curvature_dtype)
        if self._is_low_rank(side):
            from ..lowrank import LowRankFactor

            # deferred: the batch roots are summed exactly and compressed once per buffer
            return LowRankFactor.deferred(drop_zero_rows(R).T, self.factor_rank)
        return R.T @ R

    # ------------------------------------------------------------------ curvature
    def kron(self, x: Any, y: torch.Tensor, N: int, **kwargs: Any) -> tuple[torch.Tensor, Kron]:
        """KFAC of one batch: ``(loss, Kron)`` with factors ``[G (out×out), A (in×in)]``
        per weight and ``[M]`` per bias, in ``self.params`` order."""
        cap, loss, V, weights = self._batch(x, y)
        g_rows: list[list[torch.Tensor]] = [[] for _ in self.targets]
        grad_size: list[torch.Tensor | None] = [None] * len(self.targets)  # (B, T') each
        for grads in output_gradients(cap, V, self.targets):
            for i, g in enumerate(grads):
                g = g.to(self.curvature_dtype)
                size = g.abs().amax(dim=-1)
                grad_size[i] = size if grad_size[i] is None else torch.maximum(grad_size[i], size)
                g_rows[i].append(drop_zero_rows(output_root(g, self.kfac_approx)))
        kfacs: list[list[Any]] = []
        for i, t in enumerate(self.targets):
            a = cap.inputs[i].to(self.curvature_dtype)
            w = reaching_weights(weights[i], grad_size[i])
            A_rows = input_root(a, w, N, self.kfac_approx)
            d_out, d_in = t.module.weight.shape
            G = self._factor(g_rows[i], d_out)
            kfacs.append([G, self._factor([A_rows], d_in)])
            if t.with_bias:
                kfacs.append([self._factor(g_rows[i], d_out)])
        return loss.detach(), self._kron_cls()(kfacs)

    def _kron_cls(self) -> type:
        if self.factor_rank is None:
            return Kron
        from ..lowrank import LowRankKron

        return LowRankKron

    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians ``(B, C, P)`` of the logits and the logits ``(B, C)``.

        Over the posterior's parameters only (``la.params`` order), not every trainable
        parameter as laplace-torch's ``torch.func`` version: a trainable head left out of the
        posterior has no columns. Built from the hook-captured per-example gradients.
        """
        if enable_backprop:
            raise ValueError("enable_backprop=True is not supported by LoraCurvature.jacobians.")
        from ..predictive import logit_jacobian_blocks

        f, blocks = logit_jacobian_blocks(self, x)
        return torch.cat(blocks, dim=-1), f

    def logit_output_gradients(self, cap: Captured) -> Iterator[list[torch.Tensor]]:
        """Yield, for each class ``c`` of the captured logits ``(B, C)``, the gradients of
        every example's logit ``c`` with respect to each target's output ``(B, T', d_out)``
        (``C`` backward passes; feed each to :meth:`per_example_gradients`)."""
        B, C = cap.logits.shape
        eye = torch.eye(C, dtype=self.curvature_dtype, device=cap.logits.device)
        yield from output_gradients(cap, eye.unsqueeze(1).expand(C, B, C), self.targets)

    def per_example_gradients(self, cap: Captured, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-example gradients ``φ_l`` ``(B, p_l)`` of every parameter tensor, from one
        grad-output vector: ``φ = vec(Σ_t g aᵀ)`` (all positions), bias ``Σ_t g``."""
        phis = []
        for t, a, g in zip(self.targets, cap.inputs, grads, strict=True):
            g = g.to(self.curvature_dtype)
            phi = torch.einsum("bto,bti->boi", g, a.to(self.curvature_dtype))
            phis.append(phi.reshape(len(phi), -1))
            if t.with_bias:
                phis.append(g.sum(dim=1))
        return phis

    def diag(
        self, x: Any, y: torch.Tensor, N: int, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal of the GGN / Fisher of one batch: ``(loss, (P,))``."""
        cap, loss, V, _ = self._batch(x, y)
        diag = None
        for grads in output_gradients(cap, V, self.targets):
            phi = torch.cat(self.per_example_gradients(cap, grads), dim=1)
            contrib = phi.square().sum(dim=0)
            diag = contrib if diag is None else diag + contrib
        return loss.detach(), diag

    def full(
        self, x: Any, y: torch.Tensor, N: int, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense GGN / Fisher of one batch: ``(loss, (P, P))``."""
        cap, loss, V, _ = self._batch(x, y)
        H = None
        for grads in output_gradients(cap, V, self.targets):
            phi = torch.cat(self.per_example_gradients(cap, grads), dim=1)
            contrib = phi.T @ phi
            H = contrib if H is None else H + contrib
        return loss.detach(), H
