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
  Both must choose the same prior;
* stock laplace-torch 0.3's ``gridsearch`` (same grid, link and samples) on the same
  posterior: a ``KronLaplace`` over the same trainable parameters, given our Kronecker
  factors, mean and ``n_data`` (as in :mod:`benchmarks.bench_predictive`). It recomputes
  the Jacobians for every prior value and draws new MC samples each time (no common random
  numbers), so its choice can differ by the Monte Carlo noise of a flat validation NLL.
  Its validation loader has batch ``--stock-batch-size`` (default 1): at our batch of 8 its
  ``torch.func`` Jacobians of SmolLM2 took the process past 21 GB and the kernel's OOM
  killer ended it on this 23 GB machine. Ours is timed and written first, so a failure of
  the stock search loses nothing else.

    python -m benchmarks.bench_prior_search --tasks fine_foods_mc --seeds 0 --steps 240 \\
        --early 0 --run-name 'memo240-{task}-seed{seed}'

Needs that cached checkpoint (``benchmarks.llm_memorised`` trains it) or trains it first.

``--low-rank`` times ``gridsearch`` the same way on a random Llama whose Kronecker factors
are low-rank (hidden 1024, 4 layers, LoRA r=8 on q, v, ``factor_rank=64`` above a side of
512, 4 choices, 32 training and 32 validation sequences of 64 tokens), where the eigenbasis
path also carries each block's complement; it writes ``bench_prior_search_lowrank``.
``--low-rank --shape 7b`` does the same at Llama-2-7B layer shapes (hidden 4096,
intermediate 11008, vocabulary 32000, one decoder layer as in :mod:`benchmarks.bench_scale`),
LoRA r=8 on q, v and ``lm_head``, the library's default ``factor_rank="auto"`` (every 4096-
and 32000-sided factor at rank 256), 2 choices, 16 training and 16 validation sequences of
64 tokens; it writes ``bench_prior_search_lowrank_7b``.
"""

from __future__ import annotations

import argparse
from typing import Any
from unittest import mock

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from benchmarks import llm_calibration as calib
from benchmarks.tasks import make_loader
from laplace_lora_ext import eigenbasis
from laplace_lora_ext.prior import lora_a_mask

NAME = "bench_prior_search"
PATHS = ("rotation per value", "eigenbasis once")
STOCK = "stock laplace-torch 0.3"


_supports = eigenbasis.supports  # the library's own test, before any patching


def chosen_delta_b(la: Any, prior: torch.Tensor | None = None) -> float:
    """The ``lora_B`` prior precision ``la`` holds (or ``prior``, one over ``la.params``):
    the first non-``lora_A`` tensor's of a per-tensor prior (they share it), or a scalar
    prior's one value."""
    prior = (la.prior_precision if prior is None else prior).reshape(-1).cpu()
    return float(prior[~lora_a_mask(la.lora_param_names)][0] if len(prior) > 1 else prior[0])


def search(la: Any, path: str, **kwargs: Any) -> dict:
    """CPU seconds and the chosen ``lora_B`` precision of one search on ``path``."""
    fast = path == "eigenbasis once"
    with mock.patch.object(eigenbasis, "supports", lambda la: fast and _supports(la)):
        seconds = C.cpu_seconds(lambda: la.optimize_prior_precision(**kwargs))
    return {"cpu_s": seconds, "delta": chosen_delta_b(la)}


def stock_search(model: Any, ours: Any, val_loader: Any, grid_size: int) -> dict:
    """CPU seconds and chosen prior of stock laplace-torch's ``gridsearch`` on ``ours``'
    posterior (module docstring); ``n_samples`` and the grid are laplace-torch's defaults,
    which ours shares, and the link is ours (``"mc"``; stock's default is probit)."""
    from laplace.curvature import CurvlinopsGGN
    from laplace.utils.matrix import Kron

    stock = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="kron",
        backend=CurvlinopsGGN,
    )  # fmt: skip
    shapes = [(F[0].shape[0], F[1].shape[0]) for F in ours.H_facs.kfacs]
    if [tuple(p.shape) for p in stock.params] != shapes:
        raise RuntimeError("stock laplace-torch's parameters differ from the posterior's")
    stock.H_facs = Kron([[f.clone() for f in F] for F in ours.H_facs.kfacs])
    stock.H = stock.H_facs.decompose(damping=stock.damping)
    stock.mean, stock.n_data = ours.mean.clone(), ours.n_data
    kwargs = {"val_loader": val_loader, "grid_size": grid_size, "link_approx": "mc"}
    seconds = C.cpu_seconds(lambda: stock.optimize_prior_precision(method="gridsearch", **kwargs))
    return {"cpu_s": seconds, "delta": float(stock.prior_precision.reshape(-1)[0])}


def measure(model: Any, train_loader: Any, val_loader: Any) -> tuple[dict, Any]:
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    out = {"fit_cpu_s": C.cpu_seconds(lambda: la.fit(train_loader))}
    searches = {
        "leave_one_out": {"method": "leave_one_out"},
        "gridsearch (21 values)": {
            "method": "gridsearch", "val_loader": val_loader, "grid_size": 21
        },
    }  # fmt: skip
    for name, kwargs in searches.items():
        out[name] = {path: search(la, path, **kwargs) for path in PATHS}
    return out, la


LOW_RANK_SHAPES = {
    "small": {
        "model": dict(hidden=1024, intermediate=2048, layers=4, vocab=1000, heads=8,
                      targets=("q_proj", "v_proj")),
        "laplace": dict(factor_rank=64, rank_threshold=512),
        "choices": 4, "sequences": 32,
    },
    "7b": {
        "model": dict(hidden=4096, intermediate=11008, layers=1, vocab=32000, heads=32,
                      targets=("q_proj", "v_proj", "lm_head")),
        "laplace": {},  # the library's default, factor_rank="auto"
        "choices": 2, "sequences": 16,
    },
}  # fmt: skip


def measure_low_rank(shape: str = "small") -> dict:
    """``gridsearch`` on both paths for a random low-rank-factor posterior (module docstring)."""
    from laplace_lora_ext import LastTokenChoiceLM

    spec = LOW_RANK_SHAPES[shape]
    vocab, n_choices, n = spec["model"]["vocab"], spec["choices"], spec["sequences"]
    peft_model = C.build_llama_lora(**spec["model"])
    model = LastTokenChoiceLM(peft_model, C.choice_ids(n_choices, vocab)).eval()
    train = C.make_loader(C.random_data(n, 64, vocab, n_choices, seed=41), 8)
    val = C.make_loader(C.random_data(n, 64, vocab, n_choices, seed=42), 8)
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron",
        **spec["laplace"],
    )  # fmt: skip
    out = {"fit_cpu_s": C.cpu_seconds(lambda: la.fit(train))}
    out["low_rank_sides"] = sorted({int(s) for s in _low_rank_sides(la)})
    kwargs = {"method": "gridsearch", "val_loader": val, "grid_size": 21}
    out["gridsearch (21 values)"] = {path: search(la, path, **kwargs) for path in PATHS}
    return out


def _low_rank_sides(la: Any) -> list[int]:
    """Sides of the posterior's Kronecker factors that are kept low-rank."""
    from laplace_lora_ext.lowrank import LowRankFactor

    return [f.shape[0] for F in la.H_facs.kfacs for f in F if isinstance(f, LowRankFactor)]


def render(r: dict, args: argparse.Namespace) -> str:
    low_rank_setups = {
        "small": "random Llama (hidden 1024, 4 layers), LoRA r=8 on q, v, Kronecker factors "
        "of side 1024 at rank 64, 4 choices, 32 training / 32 validation sequences of 64 tokens",
        "7b": "random Llama at Llama-2-7B layer shapes (hidden 4096, intermediate 11008, "
        "vocabulary 32000, 1 decoder layer), LoRA r=8 on q, v, lm_head, factor_rank='auto' "
        f"(low-rank sides: {r.get('low_rank_sides')}), 2 choices, 16 training / 16 "
        "validation sequences of 64 tokens",
    }
    setup = (
        low_rank_setups[getattr(args, "shape", "small")]
        if args.low_rank
        else f"SmolLM2-135M-Instruct, LoRA r=8 on q, v (460,800 parameters), memorised "
        f"{args.tasks[0]} adapter (seed {args.seeds[0]}, step {args.steps}, {args.n_train} "
        "training examples)"
    )
    lines = [
        "# bench_prior_search: prior searches, eigenbasis once against a rotation per value",
        "",
        f"{setup}; 1 thread, CPU seconds, one call each. `la.fit` took {r['fit_cpu_s']:.1f} s.",
        "",
        "| search | path | CPU s | × fit | speed-up | δ_B chosen |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("leave_one_out", "gridsearch (21 values)"):
        if name not in r:
            continue
        base = r[name][PATHS[0]]["cpu_s"]
        for path in (p for p in (*PATHS, STOCK) if p in r[name]):
            m = r[name][path]
            lines.append(
                f"| {name} | {path} | {m['cpu_s']:.1f} | {m['cpu_s'] / r['fit_cpu_s']:.2f} "
                f"| {base / m['cpu_s']:.2f}× | {m['delta']:.4g} |"
            )
    grid = r.get("gridsearch (21 values)", {})
    if STOCK in grid:
        ratio = grid[STOCK]["cpu_s"] / grid[PATHS[1]]["cpu_s"]
        lines += [
            "",
            f"`gridsearch` on the same posterior: ours {ratio:.2f}× faster than stock "
            f"(stock's validation batch: {r.get('stock_batch_size')}; ours: {args.la_batch_size}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--low-rank", action="store_true", help="a random low-rank-factor model")
    p.add_argument("--shape", choices=sorted(LOW_RANK_SHAPES), default="small", help="--low-rank")
    p.add_argument("--stock-batch-size", type=int, default=1, help="stock's validation batch")
    args = calib.parse(argv, p)
    torch.set_num_threads(args.threads or 1)
    if args.low_rank:
        result = measure_low_rank(args.shape)
        suffix = "_lowrank" + ("" if args.shape == "small" else f"_{args.shape}")
        C.publish(NAME + suffix, args, result, {}, render(result, args))
        return
    data, wrapper, collate = calib.trained_model(args)
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    val_loader = make_loader(data.validation, collate, args.la_batch_size)
    result, la = measure(wrapper, train_loader, val_loader)
    C.publish(NAME, args, result, {}, render(result, args))
    stock_loader = make_loader(data.validation, collate, args.stock_batch_size)
    result["gridsearch (21 values)"][STOCK] = stock_search(wrapper, la, stock_loader, 21)
    result["stock_batch_size"] = args.stock_batch_size
    C.publish(NAME, args, result, {}, render(result, args))


if __name__ == "__main__":
    main()
