"""Is the shift miss KFAC's? The 10-epoch fine-foods posteriors with the exact GGN in place
of KFAC, scored at a grid of prior widths (a diagnostic on test data, not a method).

Fine foods' 10-epoch default misses the shift bar: on tweets its NLL is 0.779 against
temperature scaling's 0.708 (500 examples per seed, :mod:`benchmarks.llm_larger_splits_check`),
and :mod:`benchmarks.llm_prior_scale_check` found no width of the default's prior that
meets the shift bar and the task's confidence bar together: the posterior's variance does
not grow on tweets (entropy AUROC about 0.5). KFAC replaces the GGN's ``Σ_n J_nᵀ Λ_n J_n``
by Kronecker products of factors averaged over examples and tokens. The exact GGN of 64
training examples informs only ``64 · C`` directions of the 460,800 adapter weights, each
one an example's own Jacobian; KFAC's products inform every pair of their factors'
eigenvectors. So the exact GGN's variance could depend on how far an input's Jacobian lies
from the training examples' where KFAC's does not. This check measures whether it does.

The exact GGN posterior is computed in data space (Woodbury; ``M = N·C``): with ``D`` the
prior variances ``1/δ`` ``(P,)``, ``J`` the training Jacobians ``(M, P)``, ``R`` the block
diagonal of ``R_n`` with ``R_n R_nᵀ = s Λ_n`` (``s``: ``la._H_factor``) and ``j`` a test
input's Jacobian ``(C, P)``, the posterior ``(Jᵀ R Rᵀ J + c D⁻¹)⁻¹`` (the prior precisions
scaled by ``c``) gives the logit covariance

    Σ_f(c) = (1/c) [j D jᵀ − W (c I + S)⁻¹ Wᵀ],   S = Rᵀ J D Jᵀ R,   W = j D Jᵀ R,

so one eigendecomposition of ``S`` serves every ``c`` (:func:`dataspace_variances`, tested
against the dense inverse in ``tests/test_mc_checks.py``).

Protocol, committed before the first run:

* checkpoints: step 80 of ``llm_calibration_fine_foods_mc_3seeds.json`` (seeds 0, 1, 2),
  the KFAC fit, default prior and validation temperature of
  :func:`benchmarks.llm_larger_splits_check.fitted_checkpoint`;
* splits: test and shift, each the benchmark's 100 examples plus 400 unused ones, as in
  :mod:`benchmarks.llm_larger_splits_check`;
* posteriors: ``kron`` (the default's KFAC) and ``exact`` (the GGN of the same 64 training
  examples), each at the default's prior precisions times ``c`` for ``c`` in
  ``10^-2 … 10^2`` (17 values, quarter decades; ``c = 1`` is the default's prior);
* predictive: joint MC with the library's default draws (:func:`laplace_lora_ext.links.
  default_draws`), a generator seeded with the seed, the same draws for every posterior
  and value;
* at every value: ACC / ECE / NLL / Brier / confidence per split, the AUROC of telling
  shift from test inputs by predictive entropy, and the mean ratio of the logit
  difference's variance on shift to that on test; issue 13's four overfit bars and the
  shift bar on the means over seeds, with :mod:`benchmarks.llm_prior_scale_report`'s
  functions;
* readings: (1) at ``c = 1``, the entropy AUROC and the variance ratio of ``exact``
  against ``kron``; (2) per posterior, the values of ``c`` at which each bar holds and at
  which all five hold. If ``exact`` meets all five at some ``c`` and ``kron`` at none, the
  shift miss comes from KFAC's approximation, and a data-space posterior for small training
  sets is worth building as an option. If neither does, it belongs to the linearised
  Laplace posterior of this adapter, whatever its curvature approximation.

Nothing here changes the default: the grid is scored on test splits.

::

    python -m benchmarks.exact_ggn_shift_check \\
        benchmarks/results/llm_calibration_fine_foods_mc_3seeds.json 0
    python -m benchmarks.exact_ggn_shift_check --report

Writes ``results/exact_ggn_shift_{task}_seed{seed}.json``; ``--report`` writes
``results/exact_ggn_shift.{json,md,png}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import llm_calibration as calib
from benchmarks.llm_larger_splits_check import (
    fitted_checkpoint,
    larger_splits,
    parse_seed_or_report,
    part_metrics,
    seed_or_report_parser,
)
from benchmarks.tasks import make_loader
from laplace_lora_ext import eigenbasis, guards
from laplace_lora_ext.inputs import split_batch
from laplace_lora_ext.jacobian_cache import LogitJacobianCache
from laplace_lora_ext.links import mc_joint
from laplace_lora_ext.predictive import logit_jacobian_blocks

RESULTS = calib.RESULTS
NAME = "exact_ggn_shift"
FACTORS = torch.logspace(-2, 2, 17).tolist()  # prior precision = c · default
STRUCTURES = ("kron", "exact")


def lambda_roots(logits: Tensor, scale: float) -> Tensor:
    """``R_n`` ``(N, C, C)`` with ``R_n R_nᵀ = scale · (diag p_n − p_n p_nᵀ)``, ``p_n`` the
    softmax of ``logits`` ``(N, C)``."""
    p = logits.double().softmax(-1)
    lam = scale * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    e, V = torch.linalg.eigh(lam)
    return V * e.clamp_min(0).sqrt()[:, None, :]


def block_diagonal(roots: Tensor) -> Tensor:
    """The ``(N·C, N·C)`` block diagonal of ``roots`` ``(N, C, C)``."""
    return torch.block_diag(*roots)


def training_side(J: Tensor, d: Tensor, roots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(JD, proj, e)`` of the training Jacobians ``J`` ``(M, P)``, prior variances ``d``
    ``(P,)`` and Λ's roots ``(N, C, C)``: ``JD = J · d`` ``(M, P)``, and ``S = Rᵀ J D Jᵀ R =
    V diag(e) Vᵀ`` with ``proj = R V`` ``(M, M)``."""
    JD = J * d
    R = block_diagonal(roots).to(J)
    S = R.mT @ (JD @ J.mT) @ R
    e, V = torch.linalg.eigh((S + S.mT) / 2)
    return JD, R @ V, e.clamp_min(0)


def dataspace_variances(
    j: Tensor, d: Tensor, JD: Tensor, proj: Tensor, e: Tensor, factors: list[float]
) -> list[Tensor]:
    """The exact GGN's logit covariances ``(B, C, C)`` of test Jacobians ``j`` ``(B, C, P)``
    at each prior scale ``c`` in ``factors`` (see the module docstring)."""
    prior = (j * d) @ j.mT
    W = (j @ JD.mT) @ proj
    out = []
    for c in factors:
        explained = (W / (c + e)) @ W.mT
        out.append((prior - explained) / c)
    return out


def training_jacobians(la, loader) -> tuple[Tensor, Tensor]:
    """MAP logits ``(N, C)`` and logit Jacobians ``(N·C, P)`` of the training data."""
    cache = LogitJacobianCache(la, loader)
    rows = [torch.cat([b.double() for b in blocks], dim=-1).flatten(0, 1)
            for _, blocks, _ in cache]  # fmt: skip
    return cache.logits, torch.cat(rows)


def split_moments(la, loader, default: Tensor, train: tuple[Tensor, Tensor, Tensor]) -> dict:
    """MAP logits ``(N, C)``, labels and, per posterior, the logit covariances
    ``(N, C, C)`` at every factor of :data:`FACTORS`."""
    assert eigenbasis.supports(la), "the check needs the default's undamped KFAC"
    d = 1.0 / la.prior_precision_diag.double()
    logits, labels = [], []
    var: dict[str, list[list[Tensor]]] = {s: [[] for _ in FACTORS] for s in STRUCTURES}
    with guards.eval_mode(la.model):
        for batch in loader:
            X, y = split_batch(batch, la.dict_key_y, la._device)
            f_mu, blocks = logit_jacobian_blocks(la.backend, X)
            logits.append(f_mu)
            labels.append(y)
            j = torch.cat([b.double() for b in blocks], dim=-1)
            for i, v in enumerate(dataspace_variances(j, d, *train, FACTORS)):
                var["exact"][i].append(v)
            rotated = eigenbasis.rotate(la.H, [b.to(la._dtype) for b in blocks])
            for i, c in enumerate(FACTORS):
                la.prior_precision = c * default
                var["kron"][i].append(eigenbasis.variance(la, la.H, rotated).double())
            la.prior_precision = default
    return {
        "f_mu": torch.cat(logits).double(),
        "labels": torch.cat(labels),
        **{s: [torch.cat(v) for v in var[s]] for s in STRUCTURES},
    }


def difference_variance(f_var: Tensor) -> Tensor:
    """Variance of the two-class logit difference ``f_1 − f_0`` ``(N,)``."""
    return f_var[:, 0, 0] + f_var[:, 1, 1] - 2 * f_var[:, 0, 1]


def score(moments: dict[str, dict], T: float, seed: int) -> dict:
    """Per split: MAP, temperature and each posterior's metrics at every factor; per
    posterior: the entropy AUROC and the shift / test variance ratio at every factor."""
    out: dict = {s: {} for s in moments}
    entropies: dict[str, dict[str, list[Tensor]]] = {s: {} for s in STRUCTURES}
    for split, m in moments.items():
        out[split]["map"] = part_metrics(m["f_mu"].softmax(-1), m["labels"])
        out[split]["temp"] = part_metrics((m["f_mu"] / T).softmax(-1), m["labels"])
        for s in STRUCTURES:
            rows, ents = [], []
            for f_var in m[s]:
                gen = torch.Generator().manual_seed(seed)
                probs = mc_joint(m["f_mu"], f_var, None, gen)
                rows.append(part_metrics(probs, m["labels"]))
                ents.append(calib.entropy(probs))
            out[split][s] = rows
            entropies[s][split] = ents
    for s in STRUCTURES:
        out[f"{s}_auroc"] = [calib.auroc(a, b) for a, b in zip(
            entropies[s]["test"], entropies[s]["shift"], strict=True)]  # fmt: skip
        out[f"{s}_variance_ratio"] = [
            float(difference_variance(b).mean() / difference_variance(a).mean())
            for a, b in zip(moments["test"][s], moments["shift"][s], strict=True)
        ]
    return out


def run(path: str, seed: int, n_more: int = 400) -> Path:
    """Score step 80 of ``path``'s run with ``seed``; returns the JSON written."""
    t0 = time.perf_counter()
    c, la, T, args = fitted_checkpoint(path, seed)
    default = la.prior_precision.detach().clone()
    logits, J = training_jacobians(la, make_loader(c.data.train, c.collate, args.la_batch_size))
    d = 1.0 / la.prior_precision_diag.double()
    train = training_side(J, d, lambda_roots(logits, float(la._H_factor)))
    del J
    splits = larger_splits(c, args, n_more)
    moments = {}
    for split, examples in splits.items():
        loader = make_loader(examples, c.collate, args.la_batch_size)
        moments[split] = split_moments(la, loader, default, train)
        print(f"{c.task} seed {seed} {split}: moments at {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
    result = {"task": c.task, "seed": seed, "step": 80, "n_more": n_more, "temperature": T,
              "train_nll": float(la.loss) / la.n_data, "prior_default": default.tolist(),
              "kron": FACTORS, "exact": FACTORS, **score(moments, T, seed)}  # fmt: skip
    result["wall_s"] = time.perf_counter() - t0
    out = RESULTS / f"{NAME}_{c.task}_seed{seed}.json"
    out.write_text(json.dumps(result, indent=1))
    return out


if __name__ == "__main__":
    parser = seed_or_report_parser(__doc__)
    a = parse_seed_or_report(parser)
    if a.report:
        from benchmarks.exact_ggn_shift_report import main as report

        report()
    else:
        print(f"wrote {run(a.path, a.seed)}")
