"""Shared pieces of the baselines: LoRA-layer discovery and Monte Carlo prediction.

Every baseline exposes ``predict_probs(model, loader, ...) -> (N, C)`` class probabilities
(rows in loader order), where ``model`` maps a dict batch to logits ``(B, C)`` (a
:class:`laplace_lora_ext.LastTokenChoiceLM` / :class:`laplace_lora_ext.SequenceClassifier`
wrapper or a sequence-classification ``PeftModel``) and ``loader`` yields dict batches.
Stochastic predictions average the softmax *probabilities* over samples, never the logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from laplace_lora_ext.inputs import forward_logits

__all__ = ["lora_layers", "seeded", "mc_predict_probs"]


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of ``model`` (modules with ``lora_A``/``lora_B`` ModuleDicts).

    Raises:
        ValueError: if ``model`` holds no LoRA layer (wrap it with ``peft.get_peft_model``).
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(m, "lora_B", None), nn.ModuleDict)
    ]
    if not layers:
        raise ValueError(
            "The model has no peft LoRA layer; build it with peft.get_peft_model(model, "
            "LoraConfig(...)) before applying a Bayesian-LoRA baseline."
        )
    return layers


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` and restore the CPU RNG afterwards.

    ``seed=None`` uses (and advances) the global RNG.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def mc_predict_probs(
    model: nn.Module,
    loader: Iterable,
    n_samples: int,
    seed: int | None = None,
    setup: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Mean over ``n_samples`` stochastic forward passes of ``softmax(logits)``: ``(N, C)``.

    ``setup()`` returns a context manager that puts ``model`` into its sampling mode
    (entered once around the whole pass). Probabilities are float32 on the CPU.

    Raises:
        ValueError: if ``n_samples < 1`` or the loader is empty.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    out = []
    ctx = setup() if setup is not None else contextlib.nullcontext()
    with ctx, seeded(seed):
        for batch in loader:
            total = None
            for _ in range(n_samples):
                p = torch.softmax(forward_logits(model, batch).double(), dim=-1)
                total = p if total is None else total + p
            out.append((total / n_samples).float().cpu())
    if not out:
        raise ValueError("The loader yielded no batch.")
    return torch.cat(out)
