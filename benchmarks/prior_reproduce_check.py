"""Check (issue 13): does today's default choose the prior a committed result file used?

For each run and checkpoint of ``llm_calibration``-style result files: rebuild the cached
fine-tuned model, fit the same KFAC posterior, call ``optimize_prior_precision()`` and
compare its prior precision with the file's ``_prior["la"]`` (relative difference, per
tensor). Used after the prior searches moved to the eigenbasis path
(:mod:`laplace_lora_ext.eigenbasis`), which changes their arithmetic but should not change
their choice, on the memorised benchmark whose numbers the docs quote::

    python -m benchmarks.prior_reproduce_check benchmarks/results/llm_memorised_*_seed?.json

Prints one line per checkpoint and writes nothing else (the log is committed by hand).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import mode

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import llm_calibration as calib
from benchmarks.tasks import make_loader


def check_file(path: Path) -> list[float]:
    """Largest relative prior difference per checkpoint of one result file."""
    payload = json.loads(path.read_text())
    args = argparse.Namespace(**payload["args"])
    torch.set_num_threads(args.threads or 1)
    worst = []
    for c in calib.cached_checkpoints(payload["runs"], args):
        la = Laplace(
            c.wrapper, "classification", subset_of_weights="lora", hessian_structure="kron"
        )
        la.fit(make_loader(c.data.train, c.collate, args.la_batch_size))
        t0 = time.perf_counter()
        la.optimize_prior_precision()
        seconds = time.perf_counter() - t0
        stored = torch.tensor(c.ckpt["_prior"]["la"], dtype=torch.float64)
        now = la.prior_precision.double().reshape(-1).cpu()
        rel = float(((now - stored).abs() / stored).max())
        worst.append(rel)
        print(
            f"{c.task} seed {c.seed} step {c.step}: max relative prior difference {rel:.2e} "
            f"(δ_B now {mode(now.tolist()):.4g}, stored {mode(stored.tolist()):.4g}; "
            f"{seconds:.0f} s)",
            flush=True,
        )
    return worst


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        check_file(Path(arg))
