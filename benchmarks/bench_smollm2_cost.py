"""Cost of Laplace-LoRA on a real model, in the units a user knows: SmolLM2-135M-Instruct,
LoRA r=8 on q, v (30 layers), a fine-tuned ``fine_foods_mc`` adapter (2 choices).

Measured in one process, 1 thread, CPU seconds (``time.process_time``, less sensitive than
wall time to other processes on a shared machine), median of ``--repeats``:

* **fit vs one epoch**: ``la.fit`` (KFAC, ``fisher_type="exact"``, 2 choices) over the
  training split against one epoch of plain forward+backward over the same batches
  (issue 16 bar: ≤ 1.5×);
* **predictive vs forward+backward**: ``la(batch, link_approx="mc", n_samples=1000)`` per
  batch against one forward+backward of the same batch (bar: ≤ 2×), and the share of the
  MC link in it (1000 samples of the joint logits);
* the MAP forward per batch, for scale.

    python -m benchmarks.bench_smollm2_cost   # about 3 min on one core

Needs the demo's cached checkpoint (``python -m benchmarks.llm_calibration`` trains it) or
trains it first (80 steps).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from benchmarks import llm_calibration as calib
from benchmarks.tasks import make_loader
from laplace_lora_ext.links import apply_link

NAME = "bench_smollm2_cost"


def forward_backward(model: Any, batch: dict) -> None:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
    model.zero_grad(set_to_none=True)


def measure(model: Any, train_loader: Any, batch: dict, repeats: int) -> dict:
    """Every timing of the table; ``train_loader`` yields dict batches, ``batch`` is a test one."""
    epoch = C.cpu_seconds(lambda: [forward_backward(model, b) for b in train_loader], repeats)
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    fit = C.cpu_seconds(lambda: la.fit(train_loader), repeats)
    la.optimize_prior_precision()
    fwd_bwd = C.cpu_seconds(lambda: forward_backward(model, batch), repeats)
    with torch.no_grad():
        fwd = C.cpu_seconds(lambda: model.eval()(batch), repeats)
    pred = C.cpu_seconds(lambda: la(batch, link_approx="mc", n_samples=1000), repeats)
    f_mu, f_var = la._glm_predictive_distribution(batch)
    gen = torch.Generator().manual_seed(0)
    link = C.cpu_seconds(lambda: apply_link("mc", f_mu, f_var, 1000, gen), repeats)
    return {
        "epoch_fwd_bwd_s": epoch,
        "fit_s": fit,
        "fit_over_epoch": fit / epoch,
        "batch_fwd_s": fwd,
        "batch_fwd_bwd_s": fwd_bwd,
        "batch_predictive_s": pred,
        "predictive_over_fwd_bwd": pred / fwd_bwd,
        "mc_link_1000_s": link,
        "mc_link_share": link / pred,
        "batch_size": len(batch["labels"]),
        "n_train_batches": len(train_loader),
    }


def render(r: dict, args: argparse.Namespace) -> str:
    rows = [
        ("la.fit (exact Fisher, 2 choices)", r["fit_s"], "one epoch of forward+backward",
         r["epoch_fwd_bwd_s"], r["fit_over_epoch"], "≤ 1.5×"),
        ("GLM predictive, MC 1000, per batch", r["batch_predictive_s"], "fwd+bwd, same batch",
         r["batch_fwd_bwd_s"], r["predictive_over_fwd_bwd"], "≤ 2×"),
        ("MC link alone (1000 joint samples)", r["mc_link_1000_s"], "the predictive",
         r["batch_predictive_s"], r["mc_link_share"], "negligible"),
        ("MAP forward, per batch", r["batch_fwd_s"], "forward+backward", r["batch_fwd_bwd_s"],
         r["batch_fwd_s"] / r["batch_fwd_bwd_s"], ""),
    ]  # fmt: skip
    lines = [
        "# bench_smollm2_cost: Laplace-LoRA on SmolLM2-135M (CPU)",
        "",
        f"SmolLM2-135M-Instruct, LoRA r=8 on q, v (30 layers, 460,800 parameters), fine_foods_mc "
        f"adapter (demo checkpoint, step {args.steps}); {r['n_train_batches']} training batches "
        f"and test batches of {r['batch_size']}; 1 thread, CPU seconds, median of "
        f"{args.repeats}.",
        "",
        "| what | CPU s | against | CPU s | ratio | bar |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for what, a, against, b, ratio, bar in rows:
        lines.append(f"| {what} | {a:.2f} | {against} | {b:.2f} | {ratio:.2f} | {bar} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = calib.parse(argv, p)  # the demo's run (sizes, steps, cache name)
    torch.set_num_threads(args.threads or 1)
    data, wrapper, collate = calib.trained_model(args)
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    batch = next(iter(make_loader(data.test, collate, args.la_batch_size)))
    result = measure(wrapper, train_loader, batch, args.repeats)
    C.publish(NAME, args, result, {}, render(result, args))


if __name__ == "__main__":
    main()
