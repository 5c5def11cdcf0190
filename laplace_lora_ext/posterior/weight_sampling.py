"""Weight samples and the sampling ("nn") predictive of the ``lora`` Laplace classes.

laplace-torch writes each weight sample into the model with ``vector_to_parameters``,
which leaves the model's parameters as views of ``la.mean``; this mixin writes samples in
place and afterwards puts back the caller's own weights (see :func:`_callers_weights`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .. import guards
from ..inputs import forward_logits, to_device
from ..links import psd_sqrt

__all__ = ["NN_SAMPLES", "WeightSamplingMixin"]

#: Network samples of ``la(x, pred_type="nn")`` without ``n_samples`` (laplace-torch's 100;
#: each is a forward pass, unlike the GLM links' draws).
NN_SAMPLES = 100


class WeightSamplingMixin:
    """Posterior weight samples and network-sample logits (needs the Laplace attributes
    ``params``, ``mean``, ``model``, ``dict_key_y`` and ``_dtype``)."""

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior weight samples ``(n_samples, P)`` (``n_samples >= 1``)."""
        guards.check_n_samples(n_samples)
        return super().sample(n_samples, generator=generator)

    def _glm_functional_samples(
        self,
        f_mu: torch.Tensor,
        f_var: torch.Tensor,
        n_samples: int,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """GLM logit samples ``(n_samples, B, C)`` from ``f_mu`` ``(B, C)`` and ``f_var``
        ``(B, C, C)``: independent draws for every example, and a square root that also
        serves a singular covariance (:func:`~laplace_lora_ext.links.psd_sqrt`).

        Replaces laplace-torch's version, which draws one ``z`` for the whole batch (every
        example's samples moved together: correlation 1 where the GLM gives 0.16) and
        fails in a Cholesky factorisation when a row's covariance is singular (a one-token
        row under a last-layer ``q_proj`` posterior), where ``la(x, link_approx="mc")``
        works. Checks ``n_samples`` for both GLM sample methods (laplace-torch's would
        return an empty tensor for 0, whose mean is NaN, and fail deep inside for
        negatives); their ``"nn"`` paths check it in :meth:`_nn_functional_samples`.
        """
        guards.check_n_samples(n_samples)
        if diagonal_output:
            f_var = torch.diag_embed(f_var.diagonal(dim1=-2, dim2=-1))
        L = psd_sqrt(f_var)
        z = torch.randn(
            (n_samples, *f_mu.shape), generator=generator, device=f_mu.device, dtype=f_mu.dtype
        )
        return f_mu + torch.einsum("bij,sbj->sbi", L.to(f_mu.dtype), z)

    def _nn_predictive_classification(
        self,
        X: Any,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Average of softmax outputs over posterior weight samples ``(B, C)``."""
        logits = self._nn_functional_samples(X, n_samples, generator, **model_kwargs)
        return torch.softmax(logits, dim=-1).mean(dim=0)

    def _nn_functional_samples(
        self,
        X: Any,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Logits ``(n_samples, B, C)`` of the network at posterior weight samples.

        Replaces laplace-torch's version (behind ``functional_samples`` /
        ``predictive_samples(..., pred_type="nn")`` and ``la(x, pred_type="nn")``): the
        model is called as in ``fit`` (``model_kwargs`` go to the model), and afterwards
        the LoRA weights are exactly the caller's, not ``la.mean``, and own their storage
        (laplace-torch's ``vector_to_parameters`` leaves them as views of ``la.mean``).
        """
        self._check_H_init()
        guards.check_n_samples(n_samples)
        samples = self.sample(n_samples, generator=generator)
        logits = []
        keep = _callers_weights(self.params, self.mean)
        X = to_device(X, self._device)  # as fit moves its batches
        with torch.no_grad(), guards.eval_mode(self.model), keep:
            for sample in samples:
                _write_params(sample, self.params)
                f = forward_logits(self.model, X, self.dict_key_y, model_kwargs)
                logits.append(f.to(self._dtype))
        return torch.stack(logits)


@contextlib.contextmanager
def _callers_weights(params: list[torch.Tensor], mean: torch.Tensor) -> Iterator[None]:
    """Run the block, then put back the exact values ``params`` had before it.

    Parameters that share storage with ``mean`` (laplace-torch's ``vector_to_parameters``
    makes them views of ``la.mean``) first get their own copy, so that writing samples
    into them cannot change the posterior mean.
    """
    mean_storage = mean.untyped_storage().data_ptr()
    for p in params:
        if p.untyped_storage().data_ptr() == mean_storage:
            p.data = p.data.clone()
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)


def _write_params(vector: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Copy a flat vector into ``params`` in place (keeps each parameter's dtype)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vector[offset : offset + n].view_as(p))
            offset += n
