"""Dev study (issue 13): δ_B by leave-one-out on the TRAINING data, scored on VALIDATION.

At memorisation every training point is fitted, so training data alone do not show how
much of the fine-tuning change carries over to new inputs. A leave-one-out estimate does,
without retraining, in the linearised ``lora_B`` model: with ``y`` the class-centred logit
changes ``f_MAP - f_base`` on the N training inputs ``(N·(C-1),)`` and ``K = P J_B J_Bᵀ P``
their Gram matrix, kernel regression (the minimum-norm change of ``B`` that fits the other
examples, what gradient descent from ``B = 0`` finds in the linearised model) predicts
example i's change from the others in closed form:

    μ_-i = y_i - [K⁻¹]_ii⁻¹ [K⁻¹ y]_i          (blocks of C-1 rows per example)

The leave-one-out logits ``f_MAP(x_i) - Q (y_i - μ_-i)`` stand in for a held-out input.
At memorisation a training point's own curvature is negligible (``p(1 - p) → 0``), so the
posterior's variance at ``x_i`` is already what it would be had ``x_i`` been left out.
The rule **loo** picks the ``δ_B`` whose predictive (the posterior's own variance around
the leave-one-out logits) has the lowest NLL on the training labels; **loo-gp** uses the
kernel's leave-one-out variance ``[K⁻¹]_ii⁻¹ / δ_B`` instead. Both see training data only.

Printed per checkpoint (seed given): MAP and temperature scaling on validation, the
leave-one-out point predictions on the training labels (are they like MAP's on
validation?), then the rules and a δ_B grid scored on validation. ``lora_A`` at its
spread-matched precision in every row.

    python -m benchmarks.prior_loo_check TASK {memo128,memo240} [SEED] [{init,map}]
"""

# ruff: noqa: E501  (a dev study: one printed line per rule)

import sys

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks.calibration import temperature
from benchmarks.finetune import FinetuneConfig, load_run
from benchmarks.prior_gp_evidence_check import CONFIGS, changes_and_gram
from benchmarks.prior_study import blocks_of, metrics, print_map_and_temperature
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext import loo_prior
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.loo_prior import centred_basis
from laplace_lora_ext.prior import lora_a_mask, spread_matched_precision

GRID = torch.logspace(0, 4, 33).tolist()


def loo_covariances(K: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's leave-one-out covariances ``[K⁻¹]_ii⁻¹`` ``(N, k, k)`` (the same 1e-10
    relative jitter as :func:`laplace_lora_ext.loo_prior.loo_residuals`)."""
    n = len(K) // k
    jitter = 1e-10 * float(K.diagonal().mean())
    K_inv = torch.cholesky_inverse(
        torch.linalg.cholesky(K + jitter * torch.eye(len(K), dtype=K.dtype))
    )
    idx = torch.arange(n)
    return torch.linalg.inv(K_inv.view(n, k, n, k)[idx, :, idx, :])


def gp_loo_nll(
    f_loo: torch.Tensor, cov: torch.Tensor, Q: torch.Tensor, labels, delta: float
) -> float:
    """NLL of the joint MC predictive with the kernel's leave-one-out covariance / δ."""
    g = torch.Generator().manual_seed(0)
    Lc = torch.linalg.cholesky(cov / delta + 1e-12 * torch.eye(cov.shape[-1], dtype=cov.dtype))
    eps = torch.randn(1000, *cov.shape[:2], generator=g, dtype=cov.dtype)
    samples = f_loo[None] + torch.einsum("nij,snj->sni", Lc, eps) @ Q.T
    probs = samples.softmax(-1).mean(0)
    return float(-probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())


def row(name: str, d: float, m: dict, split: str = "VAL") -> str:
    return f"{name:14s} dB {d:9.3g} | {split} acc {m['acc']:.3f} ece {100 * m['ece']:5.1f} nll {m['nll']:.3f} conf {m['conf']:.3f}"


def main(task: str, which: str, seed: int = 0, kernel: str = "init") -> None:
    torch.set_num_threads(1)
    kw, step, name = CONFIGS[which]
    cfg = FinetuneConfig(
        model="smollm2", task=task, seed=seed, data_seed=seed, lr=1e-3,
        run_name=name.replace("seed0", f"seed{seed}").format(task=task), **kw,
    )  # fmt: skip
    _, tok, wrapper, data = load_run(cfg, step)
    collate = make_collate(tok, data.kind, cfg.seq_len)
    train_loader = make_loader(data.train, collate, 8)
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    print(
        f"## {task} {which} seed {seed} step {step}: MAP train NLL {la.loss / la.n_data:.2e}",
        flush=True,
    )
    val = blocks_of(la, make_loader(data.validation, collate, 8))
    T_val = print_map_and_temperature(val, width=14)
    train = blocks_of(la, train_loader)
    if kernel == "init":  # J_B at B = 0: no fitted labels in the kernel
        with loo_prior.lora_b_zeroed(la):
            train0 = blocks_of(la, train_loader)
        y, K_map = changes_and_gram(la, train, train_loader)
        _, K = changes_and_gram(la, train0, train_loader)
        del train0
    else:  # J_B at the MAP
        y, K_map = changes_and_gram(la, train, train_loader)
        K = K_map
    print(f"  kernel at {kernel}", flush=True)
    C = train.logits.shape[-1]
    Q = centred_basis(C)
    resid = loo_prior.loo_residuals(y.view(-1, C - 1), K)
    cov = loo_covariances(K, C - 1)
    loo = train.with_logits(train.logits.double() - resid @ Q.T)
    f_loo, labels = loo.logits.double(), loo.labels
    T_loo = float(temperature(f_loo.float(), labels))
    for nm, T in (("LOO point", 1.0), ("LOO temp", T_loo)):
        m = classification_metrics((f_loo / T).softmax(-1).float(), labels)
        print(
            f"{nm:14s} T {T:.3f} | TRAIN-LOO acc {m['acc']:.3f} ece {100 * m['ece']:5.1f} nll {m['nll']:.3f} conf {m['conf']:.3f}  (val T {T_val:.3f})",
            flush=True,
        )

    prior = spread_matched_precision(la).to(la._dtype)
    is_a = lora_a_mask(la.lora_param_names)

    def at(d: float) -> torch.Tensor:
        return torch.where(is_a, prior, torch.full_like(prior, d))

    loo_nll = {d: metrics(la, loo, at(d))["nll"] for d in GRID}
    gp_nll = {d: gp_loo_nll(f_loo, cov, Q, labels, d) for d in GRID}
    print("  LOO NLL by dB: " + " ".join(f"{d:.3g}:{v:.3f}" for d, v in loo_nll.items()))
    print(
        "  GP-LOO NLL by dB: " + " ".join(f"{d:.3g}:{v:.3f}" for d, v in gp_nll.items()), flush=True
    )
    rules = {
        "trace (default)": float(K_map.trace() / y.square().sum()),
        f"trace ({kernel})": float(K.trace() / y.square().sum()),
        "loo": min(loo_nll, key=loo_nll.get),
        "loo-gp": min(gp_nll, key=gp_nll.get),
    }
    for rule, d in rules.items():
        print(row(rule, d, metrics(la, val, at(d))), flush=True)
    val_grid = {d: metrics(la, val, at(d)) for d in GRID}
    best = min(val_grid, key=lambda d: val_grid[d]["nll"])
    print(row("val-grid best", best, val_grid[best]))
    print(
        "  VAL NLL by dB: " + " ".join(f"{d:.3g}:{m['nll']:.3f}" for d, m in val_grid.items()),
        flush=True,
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], int(args[2]) if len(args) > 2 else 0, *args[3:])
