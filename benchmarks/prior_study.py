"""Shared helpers of the prior dev studies (``prior_*_check.py``, ``prior_candidates.py``):
cache each batch's logits and logit Jacobian blocks once, then score any prior precision
on them with the joint MC predictive, without touching the model again."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.jacobian_cache import LogitJacobianCache

Cache = LogitJacobianCache
"""Per batch: MAP logits ``(B, C)``, Jacobian blocks (float32, one ``(B, C, *p.shape)`` per
tensor in ``la.params`` order), labels ``(B,)``."""


def blocks_of(la: Any, loader: DataLoader) -> Cache:
    """Logits, float32 Jacobian blocks and labels of every batch (model in eval mode)."""
    return LogitJacobianCache(la, loader, block_dtype=torch.float32)


def metrics(la: Any, cache: Cache, prior: torch.Tensor | None = None, seed: int = 0) -> dict:
    """ACC/ECE/NLL/Brier/conf of the joint MC predictive (1000 samples, fixed seed) on a
    cache, at ``prior`` (set on ``la``) or at ``la``'s current prior precision."""
    if prior is not None:
        la.prior_precision = prior
    probs = cache.probs(la, "mc", 1000, torch.Generator().manual_seed(seed))
    return classification_metrics(probs.float(), cache.labels)


def overfit_run_128(task: str, threads: int = 1):
    """The 128-example overfit SmolLM2 checkpoint of the prior studies (seed 0, step 160 of
    160, lr 1e-3; cached by ``benchmarks.finetune``), fitted with the kron posterior.

    Returns ``(la, data, collate, train_loader)``; prints the fit's time and training NLL.
    """
    import time

    from laplace import Laplace

    from benchmarks.finetune import FinetuneConfig, load_run
    from benchmarks.tasks import make_collate, make_loader

    torch.set_num_threads(threads)
    cfg = FinetuneConfig(
        model="smollm2", task=task, seed=0, data_seed=0, n_train=128, n_test=200,
        steps=160, lr=1e-3, save_every=32,
    )  # fmt: skip
    _, tok, wrapper, data = load_run(cfg, 160)
    collate = make_collate(tok, data.kind, cfg.seq_len)
    train_loader = make_loader(data.train, collate, 8)
    t0 = time.time()
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    print(f"fit {time.time() - t0:.0f}s train nll {la.loss / la.n_data:.4f}", flush=True)
    return la, data, collate, train_loader


def print_map_and_temperature(cache: Cache, width: int = 12) -> float:
    """Print MAP's and temperature scaling's metrics on ``cache`` (a validation split) and
    return the temperature fitted there."""
    from benchmarks.calibration import temperature

    logits = torch.cat([f for f, _, _ in cache]).float()
    labels = torch.cat([y for _, _, y in cache])
    T = float(temperature(logits, labels))
    for name, scale in (("MAP", 1.0), ("temp", T)):
        m = classification_metrics((logits / scale).softmax(-1), labels)
        print(
            f"{name:{width}s} T {scale:.3f} | VAL acc {m['acc']:.3f} ece {100 * m['ece']:5.1f} "
            f"nll {m['nll']:.3f} conf {m['conf']:.3f}"
        )
    return T
