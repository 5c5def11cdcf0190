"""Dev study (issue 13): which ``lora_B`` prior on an overfit SmolLM2 adapter, judged on the
VALIDATION split. ``lora_A`` stays at its spread-matched precision (the default's).

Rules for the ``lora_B`` precision, all from training data only:

* ``marglik``  the default's layerwise evidence (``method="lora_marglik"``);
* ``fspace``   one scalar δ_B so that the prior on ``B`` explains the size of the function
  change fine-tuning made on the training inputs: with centred choice logits,
  ``E_prior ‖J_B B‖² = Σ_n ‖f_MAP(x_n) − f_base(x_n)‖²``, i.e.
  ``δ_B = Σ_n ‖J_B,n‖_F² / Σ_n ‖Δf_n‖²`` (``f_base``: adapter disabled);
* ``spread``   each ``lora_B`` at its own spread ``n/‖B‖²`` (as ``lora_A``);
* a scalar grid over δ_B, printing validation and training NLL, to show where each rule
  lands against the validation optimum (and what a training-NLL tolerance would choose).

Usage (a 128-example checkpoint cached by benchmarks.finetune, as prior_candidates.py)::

    python -m benchmarks.prior_lora_b_check TASK > benchmarks/results/prior_lora_b_check_TASK.log
"""

# ruff: noqa: E501  (a dev study: one printed line per rule)

import sys
import time

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks.calibration import temperature
from benchmarks.finetune import FinetuneConfig, load_run
from benchmarks.prior_study import blocks_of, metrics
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext import guards
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.prior import lora_a_mask, spread_matched_precision


@torch.no_grad()
def base_logits(peft_model, wrapper, loader):
    with guards.eval_mode(wrapper), peft_model.disable_adapter():
        return torch.cat([wrapper(b).double() for b in loader])


def centred(x, dim):
    return x - x.mean(dim=dim, keepdim=True)


def main(task: str, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    cfg = FinetuneConfig(
        model="smollm2", task=task, seed=0, data_seed=0, n_train=128, n_test=200,
        steps=160, lr=1e-3, save_every=32,
    )  # fmt: skip
    peft_model, tok, wrapper, data = load_run(cfg, 160)
    collate = make_collate(tok, data.kind, cfg.seq_len)
    train_loader = make_loader(data.train, collate, 8)
    t0 = time.time()
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    print(f"fit {time.time() - t0:.0f}s train nll {la.loss / la.n_data:.4f}", flush=True)
    val = blocks_of(la, make_loader(data.validation, collate, 8))
    train = blocks_of(la, train_loader)
    print(f"blocks {time.time() - t0:.0f}s", flush=True)
    is_a = lora_a_mask(la.lora_param_names)
    vl, vy = torch.cat([f for f, _, _ in val]), torch.cat([y for _, _, y in val])
    T = temperature(vl.float(), vy)
    for name, scale in (("MAP", 1.0), ("temp", T)):
        m = classification_metrics((vl / scale).softmax(-1).float(), vy)
        print(
            f"{name:12s} T {scale:.3f} | VAL acc {m['acc']:.3f} ece {100 * m['ece']:5.1f} nll {m['nll']:.3f} conf {m['conf']:.3f}"
        )

    la.optimize_prior_precision()
    default = la.prior_precision.clone()
    spread = spread_matched_precision(la)
    # fspace: sum_n ||P J_B,n||_F^2 / sum_n ||P (f_MAP - f_base)||^2, P centres the logits
    f_map = torch.cat([f for f, _, _ in train]).double()
    df = centred(f_map - base_logits(peft_model, wrapper, train_loader), -1).square().sum()
    jb = sum(
        centred(b.double(), 1).square().sum()
        for _, blocks, _ in train
        for i, b in enumerate(blocks)
        if not is_a[i]
    )
    d_fspace = float(jb / df)
    print(
        f"fspace: sum ||J_B||^2 {float(jb):.4g}, sum ||df||^2 {float(df):.4g}, delta_B {d_fspace:.4g}"
    )

    def show(name, prior):
        mv, mt = metrics(la, val, prior), metrics(la, train, prior)
        print(
            f"{name:12s} dB med {float(prior[~is_a].median()):9.3g} | VAL acc {mv['acc']:.3f} ece {100 * mv['ece']:5.1f} nll {mv['nll']:.3f} conf {mv['conf']:.3f} | TRAIN nll {mt['nll']:.4f} conf {mt['conf']:.3f}",
            flush=True,
        )

    show("marglik", default)
    show("fspace", torch.where(is_a, default, torch.full_like(default, d_fspace)))
    show("spread", torch.where(is_a, default, spread))
    for d in (1, 3, 10, 30, 100, 300, 1e3, 1e4):
        show(f"B {d:g}", torch.where(is_a, default, torch.full_like(default, d)))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
