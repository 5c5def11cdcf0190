"""Batch handling: splitting HF dict batches and ``(X, y)`` tuples, forward to logits."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

__all__ = ["split_batch", "model_inputs", "forward_logits", "attention_mask_of"]

Batch = torch.Tensor | MutableMapping[str, Any]


def split_batch(
    batch: Any, dict_key_y: str = "labels", device: torch.device | None = None
) -> tuple[Batch, torch.Tensor]:
    """Split a loader item into inputs and integer labels ``(B,)``.

    Accepts an HF dict batch (labels under ``dict_key_y``) or an ``(X, y)`` pair.
    """
    if isinstance(batch, Mapping):
        if dict_key_y not in batch:
            raise ValueError(
                f"Dict batch has no labels under key {dict_key_y!r} (keys: {sorted(batch)}); "
                "pass dict_key_y=... to Laplace or add the labels to the batch."
            )
        x = {k: (v.to(device) if torch.is_tensor(v) and device else v) for k, v in batch.items()}
        return x, x[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        if device is not None:
            x = x.to(device) if torch.is_tensor(x) else x
            y = y.to(device) if torch.is_tensor(y) else y
        return x, y
    raise TypeError(
        f"Unsupported batch type {type(batch).__name__}: the loader must yield dict batches "
        "(with labels) or (X, y) pairs."
    )


def model_inputs(x: Batch, dict_key_y: str = "labels") -> Batch:
    """Inputs to pass to the model: a dict without the labels, or the tensor itself."""
    if isinstance(x, Mapping):
        return {k: v for k, v in x.items() if k != dict_key_y}
    return x


def attention_mask_of(x: Batch) -> torch.Tensor | None:
    """The ``attention_mask`` ``(B, T)`` of a dict batch, if any."""
    if isinstance(x, Mapping):
        return x.get("attention_mask")
    return None


def forward_logits(model: nn.Module, x: Batch, dict_key_y: str = "labels") -> torch.Tensor:
    """Run ``model`` on a batch and return logits ``(B, C)``.

    Dict batches are passed as keyword arguments (labels removed); outputs may be a tensor
    or an HF ``ModelOutput`` with ``.logits``.

    Raises:
        ValueError: if the logits are not 2-D (e.g. a causal LM's ``(B, T, V)``).
    """
    inputs = model_inputs(x, dict_key_y)
    out = _call(model, inputs)
    logits = out.logits if hasattr(out, "logits") else out
    if not torch.is_tensor(logits):
        raise TypeError(
            f"Model returned {type(out).__name__}; expected a tensor or an output with .logits."
        )
    if logits.ndim != 2:
        raise ValueError(
            f"Model logits have shape {tuple(logits.shape)}; Laplace-LoRA needs (batch, classes). "
            "For a causal LM use laplace_lora_ext.LastTokenChoiceLM(model, target_ids) to "
            "restrict the last position to the choice tokens."
        )
    return logits


def _call(model: nn.Module, inputs: Batch) -> Any:
    if isinstance(inputs, Mapping):
        if getattr(model, "accepts_batch_dict", False):
            return model(inputs)
        return model(**inputs)
    return model(inputs)
