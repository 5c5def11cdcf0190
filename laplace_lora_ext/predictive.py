"""Jacobian-free linearised (GLM) predictive for the LoRA posteriors: the Jacobian half.

Who owns what:

* :meth:`LoraLaplaceMixin.predictive_moments
  <laplace_lora_ext.posterior.mixin.LoraLaplaceMixin.predictive_moments>` owns the GLM
  predictive. It is the public entry point (laplace-torch's ``_glm_predictive_distribution``
  and ``la(x)`` go through it) and combines the two halves below.
* This module computes the half that does not depend on the posterior structure, from a
  :class:`~laplace_lora_ext.LoraCurvature` backend: the logits ``f_mu`` ``(B, C)`` and the
  Jacobian of the logits split into one block ``W_l`` ``(B, C, p_l)`` per parameter tensor
  ``l`` (in ``la.params`` order).
* Each posterior class implements the other half, ``_functional_variance_blocks(blocks)``
  ``= Σ_l W_l Σ_l W_lᵀ`` ``(B, C, C)`` with its own covariance blocks ``Σ_l`` (Kronecker,
  diagonal or dense). This mirrors laplace-torch, where ``backend.jacobians`` feeds
  ``functional_variance``.

How the blocks are formed: one forward with hooks, then one backward per output ``c``
(``C`` is small after restricting to choice tokens). For every parameter tensor the
per-example gradients ``φ_{l,c}`` ``(B, p_l)`` come from the captured layer inputs and
output gradients (``Σ_t g aᵀ``; ``p_l = r·d`` for a LoRA matrix) and are stacked over
outputs. The full ``(B, C, P)`` Jacobian is never built in one piece (except for ``full``,
whose posterior is ``P x P`` anyway), and no ``torch.func`` transform is used, so this also
runs through bitsandbytes 4-bit layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .curvature import LoraCurvature

__all__ = ["logit_jacobian_blocks"]


def logit_jacobian_blocks(
    backend: LoraCurvature, x: Any
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and per-parameter-tensor Jacobian blocks of the model at its current weights.

    Args:
        backend: the fitted posterior's curvature backend (``la.backend``).
        x: a dict batch (labels are ignored) or an input tensor.

    Returns:
        ``f_mu`` ``(B, C)`` (detached, in ``backend.curvature_dtype``) and the list of
        ``W_l = ∂f/∂θ_l`` ``(B, C, p_l)``, one per parameter tensor in ``la.params`` order.
    """
    cap = backend.capture(x)
    f_mu = cap.logits.detach().to(backend.curvature_dtype)
    per_output = [
        backend.per_example_gradients(cap, grads) for grads in backend.logit_output_gradients(cap)
    ]
    blocks = [torch.stack(phis, dim=1) for phis in zip(*per_output, strict=True)]
    return f_mu, blocks
