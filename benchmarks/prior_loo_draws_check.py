"""Dev study (issue 13): should the leave-one-out kernel average several draws of ``lora_A``?

Since 3cc7b2a the leave-one-out rule (:mod:`laplace_lora_ext.loo_prior`) builds its kernel
at ``B = 0`` with ``lora_A`` redrawn once from PEFT's initialisation (seed 0,
:func:`laplace_lora_ext.loo_prior.lora_a_redrawn`), adopted by
:mod:`benchmarks.prior_loo_redrawn_check`. One draw of a rank-``r`` ``lora_A`` projects each
layer's input on ``r`` random directions, so the kernel (and the ``δ_B`` it picks) depends
on the draw: δ_B moved by factors of 0.3-3 between the trained and the redrawn kernel on
the memorised checkpoints. At ``B = 0`` the forward pass does not depend on ``lora_A``, so
the mean of the kernels of ``S`` independent draws converges to the kernel's expectation
over PEFT's initialisation, which depends on no seed. The candidate is the mean over
``S = 8`` draws (seeds 0-7; ``loo_prior.loo_cache(..., kernel_draws=8)``), chosen before
any run: 8 draws of rank 8 give 64 input directions per layer at a cost of 7 more
Jacobian passes over the examples the rule uses (as the kernel was then computed; the
draws now share one pass, ``benchmarks.bench_loo_kernel_draws``).

The data are the nine memorised checkpoints of the last study (3 tasks × 3 seeds, 240
steps over 64 examples), each re-scored with the candidate against the current default
(the single-draw prior stored in that study's files, same fit and Monte Carlo draws)::

    python -m benchmarks.llm_rescore_default benchmarks/results/prior_loo_redrawn_T.json \\
        --method leave_one_out_8_draws --out benchmarks/results/prior_loo_draws_T

**The decision rule, fixed before the runs, on the validation split only** (50 examples per
seed; test and shift numbers are recorded but not used), the same as the last study's:

1. over the 9 checkpoints, the candidate's mean validation NLL is lower than the current
   default's (``la_previous``), and
2. on no task is the candidate's mean validation NLL (3 seeds) above 1.02 × the default's.

If both hold, the leave-one-out kernel's default becomes the mean over 8 draws
(``loo_prior.KERNEL_DRAWS = 8``); otherwise it stays one draw. This script applies the rule
and writes ``prior_loo_draws.{json,md}``::

    python -m benchmarks.prior_loo_draws_check
"""

from __future__ import annotations

from benchmarks._common import no_options
from benchmarks.prior_loo_everywhere_check import (
    load_rows,
    render_report,
    write_report,
)
from benchmarks.prior_loo_redrawn_check import decide as decide_rule
from benchmarks.prior_loo_redrawn_check import row_cells

PREFIX = "prior_loo_draws"
#: The candidate's number of ``lora_A`` draws (fixed before the runs).
DRAWS = 8


def decide(rows: list[dict]) -> dict:
    """The module's rule (validation NLL only), as the last study's."""
    return decide_rule(rows, f"{DRAWS}_draws", f"adopt the {DRAWS}-draw kernel")


def render(rows: list[dict], decision: dict) -> str:
    columns = [
        "task", "seed", "train NLL", "split", "MAP", "temperature", "default (1 draw)",
        f"{DRAWS} draws", f"δ_B 1 / {DRAWS} draws", "s",
    ]  # fmt: skip
    title = f"The leave-one-out kernel averaged over {DRAWS} draws of lora_A"
    return render_report(title, columns, rows, decision, row_cells)


def main() -> None:
    rows = load_rows(PREFIX)
    decision = decide(rows)
    write_report(PREFIX, rows, decision, render(rows, decision))


if __name__ == "__main__":
    no_options(__doc__)
    main()
