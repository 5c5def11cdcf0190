"""Jacobian-free linearised (GLM) predictive for the LoRA posteriors.

One forward with hooks, then one backward per output ``c`` (``C`` is small after
restricting to choice tokens). For every parameter tensor ``l`` the per-example gradients
``φ_{l,c}`` ``(B, p_l)`` are formed from the captured layer inputs and output gradients
(``Σ_t g aᵀ``; ``p_l = r·d`` for a LoRA matrix), stacked over outputs to ``W_l``
``(B, C, p_l)`` and contracted with that block of the posterior covariance. The full
``(B, C, P)`` Jacobian is never built in one piece (except for ``full``, whose posterior
is ``P x P`` anyway), and no ``torch.func`` transform is used.
"""

from __future__ import annotations

from typing import Any

import torch

from .curvature.capture import output_gradients

__all__ = ["glm_predictive_moments"]


def glm_predictive_moments(la: Any, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, C)`` and covariance ``(B, C, C)`` of the linearised model's logits.

    Args:
        la: a fitted ``lora`` Laplace object (provides ``backend`` and
            ``_functional_variance_blocks``).
        x: a dict batch or an input tensor.
    """
    backend = la.backend
    cap = backend.capture(x)
    f_mu = cap.logits.detach().to(backend.curvature_dtype)
    B, C = f_mu.shape
    eye = torch.eye(C, dtype=f_mu.dtype, device=f_mu.device)
    V = eye.unsqueeze(1).expand(C, B, C)
    per_output: list[list[torch.Tensor]] = []
    for grads in output_gradients(cap, V, backend.targets):
        per_output.append(backend.per_example_gradients(cap, grads))
    blocks = [torch.stack(phis, dim=1) for phis in zip(*per_output, strict=True)]
    f_var = la._functional_variance_blocks(blocks)
    return f_mu, f_var
