"""Dev study (issue 13): does ``lora_A``'s prior make the default underconfident on a
128-example overfit SmolLM2 adapter? Judged on the VALIDATION split (never test).

The default (``method="lora_marglik"``) gives ``lora_A`` its spread-matched precision
``δ_A`` and tunes every ``lora_B`` precision by the evidence with ``δ_A`` held. Here ``δ_A``
is scaled by ``s`` (``s = 1e6``: ``lora_A`` effectively fixed, a random projection), and
``lora_B`` is re-tuned by the same evidence for each ``s``. Also printed: the share of
the validation logit variance that ``lora_A`` carries at the default, and a ``δ_B`` grid
with ``lora_A`` fixed.

Usage (the checkpoints of ``prior_lora_b_check``)::

    python -m benchmarks.prior_lora_a_check TASK > benchmarks/results/prior_lora_a_check_TASK.log
"""

# ruff: noqa: E501  (a dev study: one printed line per rule)

import sys
import time

import torch

import laplace_lora_ext  # noqa: F401
from benchmarks.prior_study import blocks_of, metrics, overfit_run_128, print_map_and_temperature
from benchmarks.tasks import make_loader
from laplace_lora_ext.prior import lora_a_mask, spread_matched_precision


def variance_share(la, cache, prior, is_a):
    """Mean over validation examples of tr f_var(A only) / tr f_var(all), at ``prior``."""
    huge = torch.full_like(prior, 1e12)
    out = []
    for keep_a in (True, False):
        la.prior_precision = torch.where(is_a == keep_a, prior, huge)
        out.append(
            sum(
                float(
                    la._functional_variance_blocks([b.to(la._dtype) for b in bl])
                    .diagonal(dim1=-2, dim2=-1)
                    .sum()
                )
                for _, bl, _ in cache
            )
        )
    return out[0] / (out[0] + out[1])


def main(task: str, threads: int = 1) -> None:
    t0 = time.time()
    la, data, collate, train_loader = overfit_run_128(task, threads)
    val = blocks_of(la, make_loader(data.validation, collate, 8))
    train = blocks_of(la, train_loader)
    print(f"blocks {time.time() - t0:.0f}s", flush=True)
    is_a = lora_a_mask(la.lora_param_names)
    print_map_and_temperature(val, 14)

    def show(name, prior):
        mv, mt = metrics(la, val, prior), metrics(la, train, prior)
        print(
            f"{name:14s} dA med {float(prior[is_a].median()):9.3g} dB med {float(prior[~is_a].median()):9.3g} | VAL acc {mv['acc']:.3f} ece {100 * mv['ece']:5.1f} nll {mv['nll']:.3f} conf {mv['conf']:.3f} | TRAIN nll {mt['nll']:.4f} conf {mt['conf']:.3f}",
            flush=True,
        )

    spread = spread_matched_precision(la).to(la._dtype)
    la.optimize_prior_precision(method="lora_marglik")
    default = la.prior_precision.clone()
    print(
        f"A share of val logit variance at the default: {variance_share(la, val, default, is_a):.3f}"
    )
    show("default", default)
    for s in (0.1, 10, 100, 1e6):
        la._optimize_lora_marglik(200, 0.1, 1.0, delta_a=spread * s)
        show(f"A x{s:g} +Bml", la.prior_precision.clone())
    for d in (1, 3, 10, 30, 100, 300):
        show(f"A fixed B {d:g}", torch.where(is_a, spread * 1e6, torch.full_like(default, d)))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
