"""Does the shared ``B = 0`` pass reproduce the committed default on the memorised benchmark?

The leave-one-out kernel's 8 draws of ``lora_A`` were first formed with one Jacobian pass
per draw; they now share one pass (:mod:`laplace_lora_ext.loo_prior`). The two give the same
kernel up to rounding (tests check both against explicit Jacobians). This check runs the
default call path (``la.fit``, then ``optimize_prior_precision()``) on the nine memorised
checkpoints (3 tasks × 3 seeds, 240 steps over 64 examples) and compares the prior it
chooses with the one stored in ``results/prior_loo_draws_{task}.json`` (``_prior["la"]``,
chosen with one pass per draw), and records the CPU seconds of the fit and of the default::

    python -m benchmarks.loo_shared_pass_check

Writes ``results/loo_shared_pass_check.{json,md}``. 1 thread, CPU seconds.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from benchmarks import llm_calibration as calib
from benchmarks.bench_prior_search import chosen_delta_b
from benchmarks.tasks import make_loader

NAME = "loo_shared_pass_check"
TASKS = ("fine_foods_mc", "tweet_sentiment_mc", "bbc_headlines_mc")
SEEDS = (0, 1, 2)


def committed_prior(task: str, seed: int) -> torch.Tensor:
    """The default's prior ``(L,)`` stored for this memorised checkpoint (one pass per draw)."""
    payload = json.loads((C.RESULTS_DIR / f"prior_loo_draws_{task}.json").read_text())
    return torch.tensor(payload["runs"][task][str(seed)]["checkpoints"]["240"]["_prior"]["la"])


def check(task: str, seed: int) -> dict[str, Any]:
    """Fit and the default at one memorised checkpoint, against the committed prior."""
    args = calib.parse(
        ["--tasks", task, "--seeds", str(seed), "--steps", "240", "--early", "0",
         "--run-name", "memo240-{task}-seed{seed}"]
    )  # fmt: skip
    data, wrapper, collate = calib.trained_model(args)
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    fit_s = C.cpu_seconds(lambda: la.fit(make_loader(data.train, collate, args.la_batch_size)))
    default_s = C.cpu_seconds(la.optimize_prior_precision)
    now, before = la.prior_precision.detach().double().cpu(), committed_prior(task, seed).double()
    return {
        "fit_cpu_s": fit_s,
        "default_cpu_s": default_s,
        "delta_b": chosen_delta_b(la),
        "delta_b_committed": chosen_delta_b(la, before),
        "max_rel_diff": float(((now - before).abs() / before.abs()).max()),
    }


def render(rows: dict[str, dict]) -> str:
    lines = [
        f"# {NAME}: the shared pass against the committed default (memorised checkpoints)",
        "",
        "| run | δ_B now | δ_B committed | max rel. diff (prior) | fit CPU s | default CPU s "
        "| × fit |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, r in rows.items():
        lines.append(
            f"| {run} | {r['delta_b']:.4g} | {r['delta_b_committed']:.4g} "
            f"| {r['max_rel_diff']:.1e} | {r['fit_cpu_s']:.1f} | {r['default_cpu_s']:.1f} "
            f"| {r['default_cpu_s'] / r['fit_cpu_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    for task in TASKS:
        for seed in SEEDS:
            rows[f"{task} seed {seed}"] = check(task, seed)
            print(f"{task} seed {seed}: {rows[f'{task} seed {seed}']}", flush=True)
    C.publish(NAME, argparse.Namespace(tasks=TASKS, seeds=SEEDS), rows, {}, render(rows))


if __name__ == "__main__":
    main()
