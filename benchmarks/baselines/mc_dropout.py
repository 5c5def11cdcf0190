"""MC dropout (Gal & Ghahramani 2016) on a LoRA adapter: the LoRA dropout stays on at
test time and the softmax probabilities of ``n_samples`` passes are averaged.

Only the LoRA dropout modules (peft's ``lora_dropout[adapter]``) are put in train mode;
everything else (the base model's own dropout, a classifier head's dropout) stays in eval
mode, so the randomness is exactly the one the adapter was trained with. A LoRA dropout
of ``p = 0`` (peft's ``nn.Identity``) makes every sample the MAP prediction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from benchmarks.baselines.common import lora_layers, mc_predict_probs

__all__ = ["lora_dropout_modules", "mc_dropout", "predict_probs"]


def lora_dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Every peft ``lora_dropout[adapter]`` module of ``model`` (``nn.Dropout`` or, for
    ``p = 0``, ``nn.Identity``).

    Raises:
        ValueError: if ``model`` has no peft LoRA layer.
    """
    return [d for layer in lora_layers(model) for d in layer.lora_dropout.values()]


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` is in eval mode except its LoRA dropout modules.

    The previous train/eval flags of all modules are restored on exit.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for d in lora_dropout_modules(model):
        d.train()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def predict_probs(
    model: nn.Module, loader: Iterable, n_samples: int = 10, seed: int | None = 0
) -> torch.Tensor:
    """MC-dropout predictive ``(N, C)``: mean softmax over ``n_samples`` LoRA-dropout masks."""
    return mc_predict_probs(model, loader, n_samples, seed, lambda: mc_dropout(model))
