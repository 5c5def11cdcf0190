"""Why the leave-one-out prior is overconfident on ``pet_species_mc``: a diagnostic on the
held-out runs' memorised checkpoints (test data read, so not a method; nothing is tuned).

The leave-one-out rule (:mod:`laplace_lora_ext.loo_prior`) chooses ``δ_B`` by scoring the
posterior's predictive on the training examples, centred at their leave-one-out logits:
the linearised adapter's kernel-regression prediction from the other examples. That
stands in for what the MAP predicts on a new input. This script asks how good a stand-in
it is. For step 960 of a held-out run and seed it fits the default's KFAC posterior and
reports:

* the stand-in and the real thing: accuracy and mean confidence (max probability) of the
  leave-one-out logits on the training labels, against the MAP's on the test split, and
  the mean absolute centred logit (``‖Qᵀ f‖``, ``Q`` the class-centring basis) of each;
* ``δ_B`` (one precision for every ``lora_B``, ``lora_A`` spread-matched, as the rule
  searches it) over the rule's own coarse grid: the rule's NLL (training labels, predictive
  centred at the leave-one-out logits) and the test NLL of the real predictive (centred at
  the MAP), per example, with the ``δ_B`` each prefers.
* the same for a variant of the stand-in whose kernel takes a fresh draw of ``lora_A``
  from PEFT's initialisation (Kaiming-uniform, ``a = √5``, seeded) instead of the trained
  ``lora_A``: the trained one was fitted to every training example, the left-out one too.
  Targets, MAP logits and the posterior are unchanged.

::

    python -m benchmarks.llm_loo_margin_check \\
        benchmarks/results/llm_heldout_pet_species_mc_seed0.json --seed 0

writes ``benchmarks/results/llm_loo_margin_check_{task}_seed{S}.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401  (registers subset_of_weights="lora")
from benchmarks import llm_calibration as calib
from benchmarks.tasks import make_loader
from laplace_lora_ext.jacobian_cache import LogitJacobianCache
from laplace_lora_ext.loo_prior import (
    COARSE_LOG10,
    _kernel_and_base,
    centred_basis,
    loo_residuals,
    lora_a_redrawn,
)
from laplace_lora_ext.prior import lora_a_mask, spread_matched_precision

STEP = "960"
RESULTS = Path(__file__).parent / "results"
PREFIX = "llm_loo_margin_check"
N_SAMPLES = 1000


def summary(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean confidence (×100) of ``softmax(logits)`` ``(N, C)``, and the mean
    norm of the class-centred logits."""
    probs = logits.double().softmax(-1)
    Q = centred_basis(logits.shape[-1])
    return {
        "acc": 100 * float((probs.argmax(-1) == labels).double().mean()),
        "conf": 100 * float(probs.max(-1).values.mean()),
        "centred_logit_norm": float((logits.double() @ Q).norm(dim=-1).mean()),
    }


def nll_curve(la, cache: LogitJacobianCache, prior_at, seed: int) -> list[float]:
    """Mean NLL per example of ``cache``'s labels at each ``δ_B`` of the rule's coarse grid
    (joint MC, common random numbers)."""
    out = []
    for d in COARSE_LOG10.tolist():
        la.prior_precision = prior_at(10.0**d)
        gen = torch.Generator().manual_seed(seed)
        probs = cache.probs(la, "mc", N_SAMPLES, gen).double()
        labels = cache.labels.long().reshape(-1, 1)
        out.append(float(-probs.gather(1, labels).clamp_min(1e-12).log().mean()))
    return out


def loo_logits(f_map: torch.Tensor, f_base: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Leave-one-out logits ``(M, C)``: ``f_map`` minus the kernel-regression residuals of
    the fine-tuning change ``f_map - f_base`` (as :func:`laplace_lora_ext.loo_prior.loo_cache`)."""
    Q = centred_basis(f_map.shape[-1])
    y = (f_map.double() - f_base.double()) @ Q
    return f_map.double() - loo_residuals(y, K) @ Q.T


def run(path: str, seed: int) -> Path:
    c, args = calib.cached_checkpoint(path, seed, STEP)
    la = Laplace(c.wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    train_loader = make_loader(c.data.train, c.collate, args.la_batch_size)
    la.fit(train_loader)
    is_a = lora_a_mask(la.lora_param_names)
    K, f_base, used = _kernel_and_base(la, train_loader, ~is_a, "trained")
    with lora_a_redrawn(la, seed):
        K_fresh, _, _ = _kernel_and_base(la, used, ~is_a, "trained")  # A as drawn here
    train = LogitJacobianCache(la, used, in_eigenbasis=True)
    loo = train.with_logits(loo_logits(train.logits, f_base, K))
    loo_fresh = train.with_logits(loo_logits(train.logits, f_base, K_fresh))
    test = LogitJacobianCache(
        la, make_loader(c.data.test, c.collate, args.la_batch_size), in_eigenbasis=True
    )
    base = spread_matched_precision(la)

    def prior_at(delta: float) -> torch.Tensor:
        return torch.where(is_a, base, torch.full_like(base, delta))

    rule = nll_curve(la, loo, prior_at, seed)
    rule_fresh = nll_curve(la, loo_fresh, prior_at, seed)
    real = nll_curve(la, test, prior_at, seed)
    grid = (10.0**COARSE_LOG10).tolist()

    def best(curve: list[float]) -> float:
        return grid[min(range(len(curve)), key=curve.__getitem__)]

    out = {
        "task": c.task,
        "seed": seed,
        "step": int(STEP),
        "n_train_used": len(loo.labels),
        "loo_on_train": summary(loo.logits, loo.labels),
        "loo_fresh_a_on_train": summary(loo_fresh.logits, loo.labels),
        "map_on_test": summary(test.logits, test.labels),
        "delta_b_grid": grid,
        "rule_nll": rule,
        "rule_fresh_a_nll": rule_fresh,
        "test_nll": real,
        "rule_best_delta_b": best(rule),
        "rule_fresh_a_best_delta_b": best(rule_fresh),
        "test_best_delta_b": best(real),
    }
    dest = RESULTS / f"{PREFIX}_{c.task}_seed{seed}.json"
    dest.write_text(json.dumps(out, indent=1))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a held-out run's per-seed result file")
    parser.add_argument("--seed", type=int, required=True)
    a = parser.parse_args()
    print(run(a.path, a.seed))


if __name__ == "__main__":
    main()
