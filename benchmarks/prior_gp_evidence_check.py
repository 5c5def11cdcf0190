"""Dev study (issue 13): a function-space evidence for δ_B at memorisation, on VALIDATION data.

The function-space rule sets ``δ_B = tr K / ‖y‖²`` (trace matching), with ``y`` the
class-centred logit changes ``f_MAP - f_base`` on the N training inputs ``(N·(C-1),)``
and ``K = P J_B J_Bᵀ P`` their Gram matrix under the linearised ``lora_B`` prior. It uses
only the size of the change. Treating ``y`` as a draw from that prior, ``y ~ N(0, K/δ_B
+ σ² I)``, and maximising this Gaussian evidence over ``δ_B`` (and a noise ``σ²``)
also weighs *where* the change lies: a change along the kernel's leading directions
(consistent across examples) costs little prior variance, an idiosyncratic one (memorised
label noise) a lot. In K's eigenbasis (``λ_i``, ``z = Uᵀ y``),

    log p(y) = -½ Σ_i [ z_i² / (λ_i/δ + σ²) + log(λ_i/δ + σ²) ] + const.

Rows: MAP, temperature scaling, trace matching (the default), the evidence with and
without noise, and fixed δ_B. ``lora_A`` at its spread-matched precision in every row.
Checkpoints: the 128-example memorised runs (step 320 of ``prior_memorised_check``) and
the 64-example 30-epoch runs of ``llm_memorised`` (step 240), seed 0.

    python -m benchmarks.prior_gp_evidence_check TASK {memo128,memo240}
"""

# ruff: noqa: E501  (a dev study: one printed line per rule)

import math
import sys

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks.finetune import FinetuneConfig, load_run
from benchmarks.prior_study import blocks_of, metrics, print_map_and_temperature
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.inputs import forward_logits, split_batch
from laplace_lora_ext.loo_prior import centred_basis
from laplace_lora_ext.prior import adapters_disabled, lora_a_mask, spread_matched_precision

CONFIGS = {
    "memo128": (dict(n_train=128, n_test=200, steps=960, save_every=160), 320, "memo-{task}-seed0"),
    "memo240": (
        dict(n_train=64, n_val=50, n_test=100, steps=240, save_every=240),
        240,
        "memo240-{task}-seed0",
    ),
}


@torch.no_grad()
def changes_and_gram(la, train_cache, train_loader) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` ``(N(C-1),)`` and ``K`` ``(N(C-1), N(C-1))`` over the non-``lora_A`` tensors."""
    is_b = ~lora_a_mask(la.lora_param_names)
    ys, js = [], []
    for (f_mu, blocks, _), batch in zip(train_cache, train_loader, strict=True):
        X, _ = split_batch(batch, la.dict_key_y, la._device)
        with adapters_disabled(la.model):
            f_base = forward_logits(la.model, X, la.dict_key_y)
        Q = centred_basis(f_mu.shape[-1])
        ys.append(((f_mu - f_base).double() @ Q).reshape(-1))
        J = torch.cat(
            [b.flatten(2) for b, keep in zip(blocks, is_b.tolist(), strict=True) if keep], -1
        )
        js.append(torch.einsum("ncp,ck->nkp", J.double(), Q).reshape(-1, J.shape[-1]))
    J = torch.cat(js)
    return torch.cat(ys), J @ J.T


def log_evidence(
    z2: torch.Tensor, lam: torch.Tensor, delta: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``log p(y)`` (up to a constant) on grids of ``delta`` and ``noise`` (broadcast)."""
    var = lam / delta[..., None] + noise[..., None]
    return -0.5 * (z2 / var + var.log()).sum(-1)


def evidence_deltas(y: torch.Tensor, K: torch.Tensor) -> dict[str, float]:
    """δ_B maximising the Gaussian evidence, noise-free (jitter only) and with noise."""
    lam, U = torch.linalg.eigh(K)
    lam = lam.clamp_min(1e-12 * float(lam.max()))
    z2 = (U.T @ y).square()
    deltas = torch.logspace(-3, 6, 901, dtype=torch.float64)
    scale = float(y.square().mean())
    noises = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64),
            scale * torch.logspace(-6, 1, 141, dtype=torch.float64),
        ]
    )
    grid = log_evidence(z2, lam, deltas[:, None], noises[None, :])
    free = deltas[int(grid[:, 0].argmax())]
    i, j = divmod(int(grid.argmax()), grid.shape[1])
    print(
        f"  K: n {len(y)}, eigen {float(lam.min()):.3g}..{float(lam.max()):.3g}; ‖y‖² {float(y.square().sum()):.3g}; "
        f"noise-free δ {float(free):.3g}; with noise δ {float(deltas[i]):.3g}, σ²/mean y² {float(noises[j]) / scale:.3g}"
    )
    return {"gp_noisefree": float(free), "gp_noise": float(deltas[i])}


def main(task: str, which: str) -> None:
    torch.set_num_threads(1)
    kw, step, name = CONFIGS[which]
    cfg = FinetuneConfig(
        model="smollm2",
        task=task,
        seed=0,
        data_seed=0,
        lr=1e-3,
        run_name=name.format(task=task),
        **kw,
    )
    _, tok, wrapper, data = load_run(cfg, step)
    collate = make_collate(tok, data.kind, cfg.seq_len)
    train_loader = make_loader(data.train, collate, 8)
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    print(f"## {task} {which} step {step}: MAP train NLL {la.loss / la.n_data:.2e}", flush=True)
    val = blocks_of(la, make_loader(data.validation, collate, 8))
    print_map_and_temperature(val, width=16)
    prior = spread_matched_precision(la).to(la._dtype)
    is_a = lora_a_mask(la.lora_param_names)
    y, K = changes_and_gram(la, blocks_of(la, train_loader), train_loader)
    # function_space_precision's δ_B: ‖P J‖²_F / ‖P Δf‖², the same in the basis Q of range(P)
    trace = float(K.trace() / y.square().sum())
    rules = {"trace (default)": trace, **evidence_deltas(y, K)}
    for d in (3, 10, 30, 100, 300, 1000):
        rules[f"fixed {d}"] = float(d)
    for rule, d in rules.items():
        p = torch.where(is_a, prior, torch.full_like(prior, d))
        m = metrics(la, val, p)
        print(
            f"{rule:16s} dB {d:9.3g} | VAL acc {m['acc']:.3f} ece {100 * m['ece']:5.1f} nll {m['nll']:.3f} conf {m['conf']:.3f}",
            flush=True,
        )
    assert math.isfinite(float(K.trace()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
