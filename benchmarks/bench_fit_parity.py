"""Fit time against bayesian-lora, like for like, interleaved in one warm process.

``bench_peers`` times each system once, in its own subprocess, after other fits; on a shared
machine its ratio moves by ±15 %. This check runs on ``bench_peers``' main model (random
Llama hidden 256, 2 layers, vocab 1000, LoRA r=8 on q, v and ``lm_head``; 64 sequences of
32 tokens, batch 8; factors above side 128 kept at rank 8, one MC label per example for
both) and alternates the two fits ``--repeats`` times after a warm-up, 1 thread, CPU
seconds. It also times our closing eigendecomposition of the Kronecker factors
(laplace-torch's ``KronLaplace.fit`` does it; bayesian-lora returns raw factors and
decomposes later, in its predictive), and our fit with ``kfac_approx="reduce"``: one
factor column per sequence, as many as bayesian-lora's last-token factors read (the default
``"expand"`` reads every position, 32 here).

    python -m benchmarks.bench_fit_parity   # about 1 minute
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import _common as C
from benchmarks import bench_peers as peers
from laplace_lora_ext import compat
from laplace_lora_ext.lowrank import kron as lowrank_kron

NAME = "bench_fit_parity"


class DecomposeTimer:
    """Accumulates the CPU seconds spent in ``Kron.decompose`` / ``LowRankKron.decompose``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for cls in (compat.Kron, lowrank_kron.LowRankKron):
            self._wrap(cls)

    def _wrap(self, cls: type) -> None:
        original = cls.decompose

        def timed(obj, *args, **kwargs):
            t0 = time.process_time()
            try:
                return original(obj, *args, **kwargs)
            finally:
                self.seconds += time.process_time() - t0

        cls.decompose = timed


def measure(repeats: int) -> dict:
    args = dict(seed=0, seq=32, lora_r=8, classes=4, n=64, n_test=32, batch=8)
    args["rank_threshold"] = 128
    model, loader, _ = peers._main_setup(args)
    timer = DecomposeTimer()

    def ours(**kw: str) -> tuple[float, float]:
        la = peers._ours(model, 8, args, fisher_type="mc", **kw)
        timer.seconds = 0.0
        t0 = time.process_time()
        la.fit(loader)
        return time.process_time() - t0, timer.seconds

    def blora() -> float:
        t0 = time.process_time()
        peers._blora_fit(model, loader, 8, 128)
        return time.process_time() - t0

    ours(), ours(kfac_approx="reduce"), blora()  # warm-up
    o, d, r, b = [], [], [], []
    for _ in range(repeats):
        fit, dec = ours()
        o.append(fit), d.append(dec), b.append(blora())
        r.append(ours(kfac_approx="reduce")[0])
    med = statistics.median
    return {
        "ours_fit_s": med(o),
        "ours_decompose_s": med(d),
        "ours_reduce_fit_s": med(r),
        "blora_fit_s": med(b),
        "ratio": med(o) / med(b),
        "ratio_without_decompose": (med(o) - med(d)) / med(b),
        "ratio_reduce": med(r) / med(b),
        "samples": {"ours": o, "ours_decompose": d, "ours_reduce": r, "blora": b},
    }


def render(r: dict, repeats: int) -> str:
    return "\n".join(
        [
            "# bench_fit_parity: our fit vs bayesian-lora's, interleaved (CPU, 1 thread)",
            "",
            "bench_peers' main model; rank-8 factors above side 128; one MC label per example; "
            f"median CPU seconds of {repeats} alternating repeats after a warm-up.",
            "",
            "| | CPU s | ours / bayesian-lora |",
            "| --- | --- | --- |",
            f"| bayesian-lora `calculate_kronecker_factors` | {r['blora_fit_s']:.3f} | |",
            f"| ours `la.fit` | {r['ours_fit_s']:.3f} | {r['ratio']:.2f}× |",
            f"| of which the closing eigendecomposition | {r['ours_decompose_s']:.3f} | |",
            f"| ours without it | {r['ours_fit_s'] - r['ours_decompose_s']:.3f} | "
            f"{r['ratio_without_decompose']:.2f}× |",
            f'| ours `la.fit`, `kfac_approx="reduce"` (one column per sequence) | '
            f"{r['ours_reduce_fit_s']:.3f} | {r['ratio_reduce']:.2f}× |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.repeats)
    C.publish(NAME, args, result, {}, render(result, args.repeats))


if __name__ == "__main__":
    main()
