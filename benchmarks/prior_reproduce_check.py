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
from benchmarks.finetune import load_trainable_state_dict, train
from benchmarks.tasks import make_collate, make_loader


def check_file(path: Path) -> list[float]:
    """Largest relative prior difference per checkpoint of one result file."""
    payload = json.loads(path.read_text())
    args = argparse.Namespace(**payload["args"])
    torch.set_num_threads(args.threads or 1)
    worst = []
    for task, per_seed in payload["runs"].items():
        for seed, run in per_seed.items():
            cfg = calib.finetune_config(task, int(seed), args)
            data, _ = calib.load_splits(task, int(seed), args)
            _, (peft_model, tokenizer, wrapper) = train(cfg, data, progress=False)
            collate = make_collate(tokenizer, data.kind, cfg.seq_len)
            for step, ckpt in run["checkpoints"].items():
                state = torch.load(cfg.run_dir / f"step{step}.pt", weights_only=False)
                load_trainable_state_dict(peft_model, state["trainable"])
                wrapper.eval()
                la = Laplace(
                    wrapper, "classification", subset_of_weights="lora", hessian_structure="kron"
                )
                la.fit(make_loader(data.train, collate, args.la_batch_size))
                t0 = time.perf_counter()
                la.optimize_prior_precision()
                seconds = time.perf_counter() - t0
                stored = torch.tensor(ckpt["_prior"]["la"], dtype=torch.float64)
                now = la.prior_precision.double().reshape(-1).cpu()
                rel = float(((now - stored).abs() / stored).max())
                worst.append(rel)
                print(
                    f"{task} seed {seed} step {step}: max relative prior difference {rel:.2e} "
                    f"(δ_B now {mode(now.tolist()):.4g}, stored {mode(stored.tolist()):.4g}; "
                    f"{seconds:.0f} s)",
                    flush=True,
                )
    return worst


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        check_file(Path(arg))
