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

import torch

import laplace_lora_ext  # noqa: F401
from benchmarks.prior_study import blocks_of, metrics, overfit_run_128, print_map_and_temperature
from benchmarks.tasks import make_loader
from laplace_lora_ext.prior import function_space_precision, lora_a_mask, spread_matched_precision


def main(task: str, threads: int = 1) -> None:
    la, data, collate, train_loader = overfit_run_128(task, threads)
    val = blocks_of(la, make_loader(data.validation, collate, 8))
    train = blocks_of(la, train_loader)
    is_a = lora_a_mask(la.lora_param_names)
    print_map_and_temperature(val)
    la.optimize_prior_precision(method="lora_marglik")
    default = la.prior_precision.clone()
    spread = spread_matched_precision(la)
    # fspace: sum_n ||P J_B,n||_F^2 / sum_n ||P (f_MAP - f_base)||^2, P centres the logits
    d_fspace = float(function_space_precision(la, train_loader)[~is_a][0])
    print(f"fspace: delta_B {d_fspace:.4g}")

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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
