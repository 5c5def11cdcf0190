"""Cost of the prior searches on a real model, with and without the eigenbasis path.

SmolLM2-135M-Instruct, LoRA r=8 on q, v (460,800 parameters), a memorised ``fine_foods_mc``
adapter (64 examples, step 240: the default there is the leave-one-out rule). In one
process, 1 thread, CPU seconds (``time.process_time``, less sensitive than wall time to
other processes on a shared machine), one call each:

* ``la.fit`` (KFAC), for scale;
* ``optimize_prior_precision(method="leave_one_out")`` (38 prior values on the training
  examples) and ``method="gridsearch"`` (21 values on the 50 validation examples), each
  with the Jacobian blocks rotated into the Kronecker eigenbasis once
  (:mod:`laplace_lora_ext.eigenbasis`, the library's path) and with the rotation redone
  per prior value (the path before it, forced by patching ``eigenbasis.supports``).
  Both must choose the same prior.

    python -m benchmarks.bench_prior_search --tasks fine_foods_mc --seeds 0 --steps 240 \\
        --early 0 --run-name 'memo240-{task}-seed{seed}'

Needs that cached checkpoint (``benchmarks.llm_memorised`` trains it) or trains it first.
"""

from __future__ import annotations

import argparse
import time
from typing import Any
from unittest import mock

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from benchmarks import llm_calibration as calib
from benchmarks.finetune import train
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext import eigenbasis
from laplace_lora_ext.prior import lora_a_mask

NAME = "bench_prior_search"
PATHS = ("rotation per value", "eigenbasis once")


def cpu_seconds(fn: Any) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


_supports = eigenbasis.supports  # the library's own test, before any patching


def search(la: Any, path: str, **kwargs: Any) -> dict:
    """CPU seconds and the chosen ``lora_B`` precision of one search on ``path``."""
    fast = path == "eigenbasis once"
    with mock.patch.object(eigenbasis, "supports", lambda la: fast and _supports(la)):
        seconds = cpu_seconds(lambda: la.optimize_prior_precision(**kwargs))
    prior = la.prior_precision.reshape(-1)
    is_b = ~lora_a_mask(la.lora_param_names)
    delta = prior[is_b][0] if len(prior) > 1 else prior[0]
    return {"cpu_s": seconds, "delta": float(delta)}


def measure(model: Any, train_loader: Any, val_loader: Any) -> dict:
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    out = {"fit_cpu_s": cpu_seconds(lambda: la.fit(train_loader))}
    searches = {
        "leave_one_out": {"method": "leave_one_out"},
        "gridsearch (21 values)": {
            "method": "gridsearch", "val_loader": val_loader, "grid_size": 21
        },
    }  # fmt: skip
    for name, kwargs in searches.items():
        out[name] = {path: search(la, path, **kwargs) for path in PATHS}
    return out


def render(r: dict, args: argparse.Namespace) -> str:
    lines = [
        "# bench_prior_search: prior searches on SmolLM2-135M (CPU)",
        "",
        f"SmolLM2-135M-Instruct, LoRA r=8 on q, v (460,800 parameters), memorised "
        f"{args.tasks[0]} adapter (seed {args.seeds[0]}, step {args.steps}, {args.n_train} "
        "training examples); 1 thread, CPU seconds, one call each. "
        f"`la.fit` took {r['fit_cpu_s']:.1f} s.",
        "",
        "| search | path | CPU s | × fit | speed-up | δ_B chosen |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("leave_one_out", "gridsearch (21 values)"):
        base = r[name][PATHS[0]]["cpu_s"]
        for path in PATHS:
            m = r[name][path]
            lines.append(
                f"| {name} | {path} | {m['cpu_s']:.1f} | {m['cpu_s'] / r['fit_cpu_s']:.2f} "
                f"| {base / m['cpu_s']:.2f}× | {m['delta']:.4g} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args = calib.parse(argv, p)
    torch.set_num_threads(args.threads or 1)
    task = args.tasks[0]
    data, _ = calib.load_splits(task, args.seeds[0], args)
    cfg = calib.finetune_config(task, args.seeds[0], args)
    _, (_, tokenizer, wrapper) = train(cfg, data, progress=True)
    collate = make_collate(tokenizer, data.kind, cfg.seq_len)
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    val_loader = make_loader(data.validation, collate, args.la_batch_size)
    result = measure(wrapper.eval(), train_loader, val_loader)
    C.publish(NAME, args, result, {}, render(result, args))


if __name__ == "__main__":
    main()
