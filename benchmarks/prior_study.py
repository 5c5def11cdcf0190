"""Shared helpers of the prior dev studies (``prior_*_check.py``, ``prior_candidates.py``):
cache each batch's logits and logit Jacobian blocks once, then score any prior precision
on them with the joint MC predictive, without touching the model again."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from laplace_lora_ext import guards
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.links import apply_link
from laplace_lora_ext.predictive import logit_jacobian_blocks

Cache = list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]
"""Per batch: MAP logits ``(B, C)``, Jacobian blocks (one ``(B, C, *p.shape)`` per tensor in
``la.params`` order, float32), labels ``(B,)``."""


def blocks_of(la: Any, loader: DataLoader) -> Cache:
    """Logits, float32 Jacobian blocks and labels of every batch (model in eval mode)."""
    out = []
    with guards.eval_mode(la.model):
        for batch in loader:
            f_mu, blocks = logit_jacobian_blocks(la.backend, batch)
            out.append((f_mu, [b.float() for b in blocks], batch["labels"]))
    return out


def metrics(la: Any, cache: Cache, prior: torch.Tensor | None = None, seed: int = 0) -> dict:
    """ACC/ECE/NLL/Brier/conf of the joint MC predictive (1000 samples, fixed seed) on a
    cache, at ``prior`` (set on ``la``) or at ``la``'s current prior precision."""
    if prior is not None:
        la.prior_precision = prior
    gen = torch.Generator().manual_seed(seed)
    probs, labels = [], []
    for f_mu, blocks, y in cache:
        f_var = la._functional_variance_blocks([b.to(la._dtype) for b in blocks])
        probs.append(apply_link("mc", f_mu, f_var, 1000, gen).float())
        labels.append(y)
    return classification_metrics(torch.cat(probs), torch.cat(labels))
