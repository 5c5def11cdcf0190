"""Cost of the leave-one-out rule's kernel: the trained ``lora_A``, one redraw, 8 redraws.

The default leave-one-out kernel is the mean over :data:`laplace_lora_ext.loo_prior.
KERNEL_DRAWS` (8) draws of ``lora_A`` (adopted by ``benchmarks.prior_loo_draws_check``).
At ``B = 0`` one forward and ``C`` backward passes serve every draw, as many as
:data:`laplace_lora_ext.loo_prior.LOO_DRAW_BYTES` holds; with that budget at 0 each draw
takes its own pass, as every draw did before the shared pass was built (the "one pass per
draw" row). This script times the whole rule (``loo_prior.loo_precision``: kernel, MAP
Jacobians, leave-one-out logits and the 38-value search) with each kernel, in one process
on one memorised SmolLM2 adapter, 1 thread, CPU seconds (``time.process_time``), one call
each, in :data:`KERNELS` order. It also records the ``δ_B`` each chose and each rule's peak
resident memory above what existed before it (the model, data and fitted posterior). Start it
with glibc's ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so that freed tensors
go back to the OS between rules (:mod:`benchmarks._common`'s memory method).

    python -m benchmarks.bench_loo_kernel_draws --tasks fine_foods_mc --seeds 0 \\
        --steps 240 --early 0 --run-name 'memo240-{task}-seed{seed}'

Needs that cached checkpoint (``benchmarks.llm_memorised`` trains it) or trains it first.
At the issue's sizes (256 training examples, where the 8 draws take two passes), on a
held-out task's memorised checkpoint (``benchmarks.llm_heldout`` trains it)::

    python -m benchmarks.bench_loo_kernel_draws --name bench_loo_kernel_draws_256 \\
        --tasks pet_species_mc --seeds 0 --n-train 256 --n-val 100 --n-test 240 \\
        --steps 960 --early 0 --run-name 'heldout960-{task}-seed{seed}'

"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any
from unittest import mock

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from benchmarks import llm_calibration as calib
from benchmarks.bench_prior_search import chosen_delta_b
from benchmarks.tasks import make_loader
from laplace_lora_ext import loo_prior

NAME = "bench_loo_kernel_draws"
#: (label, ``kernel_lora_a``, ``kernel_draws``, ``LOO_DRAW_BYTES`` or ``None`` for the
#: library's), in the order they are timed
KERNELS = (
    ("trained lora_A", "trained", 1, None),
    ("1 draw of lora_A", "redrawn", 1, None),
    ("8 draws, one pass per draw (as before)", "redrawn", 8, 0),
    ("8 draws, shared pass (default)", "redrawn", 8, None),
)


def measure(model: Any, train_loader: Any) -> dict:
    """CPU seconds of ``la.fit`` and of the leave-one-out rule with each of :data:`KERNELS`,
    and the rule's peak resident memory above what existed before it (model, data, fitted
    posterior; :class:`benchmarks._common.PeakMeter`)."""
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    out: dict[str, Any] = {"fit_cpu_s": C.cpu_seconds(lambda: la.fit(train_loader))}
    for label, lora_a, draws, draw_bytes in KERNELS:
        rule = partial(
            loo_prior.loo_precision, la, train_loader, kernel_lora_a=lora_a, kernel_draws=draws
        )
        budget = loo_prior.LOO_DRAW_BYTES if draw_bytes is None else draw_bytes
        with mock.patch.object(loo_prior, "LOO_DRAW_BYTES", budget), C.PeakMeter() as meter:
            rule()
        out[label] = {
            "cpu_s": meter.cpu_seconds,
            "peak_extra_rss_bytes": meter.peak_delta if meter.reset_ok else None,
            "delta_b": chosen_delta_b(la),
        }
    return out


def _mib(m: dict) -> str:
    """The rule's peak extra resident memory in MiB, or "not measured" (older runs, or an
    operating system that refused to reset its peak-RSS counter)."""
    b = m.get("peak_extra_rss_bytes")
    return "not measured" if b is None else f"{b / C.MiB:.0f}"


def render(r: dict, args: argparse.Namespace) -> str:
    base = r[KERNELS[1][0]]["cpu_s"]
    lines = [
        "# bench_loo_kernel_draws: the leave-one-out rule's cost with each kernel",
        "",
        f"SmolLM2-135M-Instruct, LoRA r=8 on q, v (460,800 parameters), memorised "
        f"{args.tasks[0]} adapter (seed {args.seeds[0]}, step {args.steps}, {args.n_train} "
        f"training examples); 1 thread, CPU seconds, one call each. `la.fit` took "
        f"{r['fit_cpu_s']:.1f} s.",
        "",
        "| kernel | CPU s | × fit | × 1 draw | peak extra RSS (MiB) | δ_B chosen |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, *_ in KERNELS:
        m = r[label]
        lines.append(
            f"| {label} | {m['cpu_s']:.1f} | {m['cpu_s'] / r['fit_cpu_s']:.2f} "
            f"| {m['cpu_s'] / base:.2f} | {_mib(m)} | {m['delta_b']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``--name`` (default :data:`NAME`) names the results; the rest as
    :func:`benchmarks.llm_calibration.parse`."""
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default=NAME)
    own, rest = named.parse_known_args(argv)
    args = calib.parse(rest)
    torch.set_num_threads(args.threads or 1)
    data, wrapper, collate = calib.trained_model(args)
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    result = measure(wrapper, train_loader)
    C.publish(own.name, args, result, {}, render(result, args))


if __name__ == "__main__":
    main()
