"""Ours vs peers on a small model where dense KFAC fits: low-rank accuracy, bayesian-lora,
stock laplace-torch, and everyone's curvature against the exact block-diagonal GGN.

Main model: random ``LlamaForCausalLM`` (hidden 256, intermediate 688, 2 layers, 4 heads,
vocab 1000, float32), LoRA r=8 (alpha 16) on q_proj, v_proj, lm_head, read through
``LastTokenChoiceLM`` with 4 choice tokens; N=64 random sequences of T=32 tokens, batch 8;
32 test sequences. Since every factor side here (8, 256, 1000) is below our default
``rank_threshold`` (2048), both we and bayesian-lora use a threshold of 128 so that the
256- and 1000-sided factors become low-rank.

(a) ours dense vs ``factor_rank`` k in {1, 2, 4, 8, 16, 32, full}: relative Frobenius error
    of the curvature ``H`` (block-diagonal Kronecker, computed factor-wise) and of the GLM
    predictive covariances ``f_var`` vs dense (same prior precision for all k: the one
    marglik picks for dense);
(b) bayesian-lora 0.0.6 ``calculate_kronecker_factors`` at the same k on the same model and
    data: fit time ratio, its curvature's trace ratio / error vs ours dense; and, on a
    smaller model (hidden 32, vocab 64, LoRA r=2, float64), every method's curvature
    against the **exact** block-diagonal GGN from explicit per-example Jacobians: trace
    ratio and relative Frobenius error, single-token (T=1) and sequence (T=16) inputs,
    ours expand / reduce (exact Fisher) and bayesian-lora at several batch sizes;
(c) stock laplace-torch 0.3 dense ``KronLaplace`` (``subset_of_weights='all'``, only LoRA
    trainable) with each of its backends: failures recorded, and where it works fit time,
    peak memory and curvature error vs ours.

Timing: CPU seconds of the worker process (the machine is shared; 1 thread by default).
Memory: peak RSS minus RSS before the fit, fresh subprocess per system (see ``_common``).

Run: ``python -m benchmarks.bench_peers`` (about 4-6 min on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import _common as C
from laplace_lora_ext import testing as R

NAME = "bench_peers"
MODULE = "benchmarks.bench_peers"

MAIN = dict(hidden=256, intermediate=688, layers=2, vocab=1000, heads=4)
SMALL = dict(hidden=32, intermediate=64, layers=2, vocab=64, heads=4)
RANKS_DEFAULT = [1, 2, 4, 8, 16, 32]


# ---------------------------------------------------------------------- set-up
def _build(
    shape: dict[str, int], args: dict[str, Any], r: int, dtype: torch.dtype, n_classes: int
) -> torch.nn.Module:
    from laplace_lora_ext import LastTokenChoiceLM

    pm = C.build_llama_lora(
        **shape,
        r=r,
        alpha=2 * r,
        dtype=dtype,
        seed=args["seed"],
        max_positions=max(64, args["seq"]),
        lora_b_std=args.get("lora_b_std", 0.05),
        init_range=args.get("init_range", 0.02),
    )
    if dtype == torch.float64:  # HF RMSNorm upcasts to float32 only; keep float64 exact
        R.exact_float64_norms(pm)
    return LastTokenChoiceLM(pm, C.choice_ids(n_classes, shape["vocab"])).eval()


def _main_setup(args: dict[str, Any]):
    model = _build(MAIN, args, args["lora_r"], torch.float32, args["classes"])
    train = C.random_data(args["n"], args["seq"], MAIN["vocab"], args["classes"], seed=21)
    test = C.random_data(args["n_test"], args["seq"], MAIN["vocab"], args["classes"], seed=22)
    return model, C.make_loader(train, args["batch"]), C.batches(test, args["batch"])


def _ours(model: torch.nn.Module, k: int | None, args: dict[str, Any], **kw: Any):
    from laplace import Laplace

    import laplace_lora_ext  # noqa: F401

    return Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        factor_rank=k,
        rank_threshold=args["rank_threshold"],
        **kw,
    )


# ---------------------------------------------------------------------- workers
def worker_ours(args: dict[str, Any]) -> dict[str, Any]:
    """Ours dense + every k (exact Fisher, expand), and dense with mc Fisher (timing)."""
    model, loader, test = _main_setup(args)
    tmp = args["tmp"]
    out: dict[str, Any] = {"runs": {}}
    C.forward_backward(model, next(iter(loader)))  # warm-up
    with C.PeakMeter() as m:
        for b in loader:
            C.forward_backward(model, b)
    out["fwdbwd"] = m.as_dict()
    prior = None
    for k in [None, *args["ranks"]]:
        key = "full" if k is None else str(k)
        la = _ours(model, k, args)
        with C.PeakMeter() as m:
            la.fit(loader)
        run = {"fit": m.as_dict()}
        if k is None:
            la.optimize_prior_precision(
                method="marglik", pred_type="glm", n_steps=args["marglik_steps"]
            )
            prior = la.prior_precision.detach().clone()
            out["prior_precision"] = prior.reshape(-1).tolist()
        else:
            la.prior_precision = prior
        with C.PeakMeter() as m:
            fv = torch.cat([la.predictive_moments(b)[1] for b in test])
        run["predictive"] = m.as_dict()
        run["storage_bytes"] = sum(
            r["bytes"] for r in C.kron_storage(la.H_facs, la.lora_param_names)
        )
        torch.save(
            {"H": R.dense_kron_factors(la.H_facs), "f_var": fv, "names": la.lora_param_names},
            os.path.join(tmp, f"ours_{key}.pt"),
        )
        out["runs"][key] = run
        del la
    la = _ours(model, None, args, kfac_approx="reduce")
    with C.PeakMeter() as m:
        la.fit(loader)
    out["runs"]["full_reduce"] = {"fit": m.as_dict()}
    torch.save({"H": R.dense_kron_factors(la.H_facs)}, os.path.join(tmp, "ours_full_reduce.pt"))
    la = _ours(model, None, args, fisher_type="mc")
    with C.PeakMeter() as m:
        la.fit(loader)
    out["runs"]["full_mc"] = {"fit": m.as_dict()}
    la = _ours(model, 8, args, fisher_type="mc")
    with C.PeakMeter() as m:
        la.fit(loader)
    out["runs"]["8_mc"] = {"fit": m.as_dict()}
    out["n_params"] = la.n_params
    return out


def _blora_fit(model: torch.nn.Module, loader: Any, k: int | None, threshold: int):
    from bayesian_lora import calculate_kronecker_factors

    def forward_call(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m({key: v for key, v in batch.items() if key != "labels"})

    try:
        return calculate_kronecker_factors(
            model,
            forward_call,
            loader,
            n_kfac=k,
            lr_threshold=threshold,
            target_module_keywords=["lora"],
        )
    finally:
        model.eval()  # calculate_kronecker_factors leaves the model in train mode


def _blora_to_blocks(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], names: list[str], k: int | None
) -> list[list[torch.Tensor]]:
    """bayesian-lora (A: input side, S: output side; low-rank ones as roots R, F = R Rᵀ)
    -> our block order ``[G (out), A (in)]`` as dense float64."""
    by_name = {}
    for key, (A, S) in factors.items():
        by_name[key + ".weight"] = (A, S)
    blocks = []
    for name in names:
        stripped = name
        match = [v for kk, v in by_name.items() if stripped.endswith(kk) or kk.endswith(stripped)]
        if len(match) != 1:
            raise KeyError(f"no unique bayesian-lora factor for {name}")
        A, S = match[0]
        blocks.append([_blora_dense(S), _blora_dense(A)])
    return blocks


def _blora_dense(F: torch.Tensor) -> torch.Tensor:
    F = F.detach().double()
    if F.shape[0] != F.shape[1]:  # low-rank root (d, k)
        return F @ F.T
    return F


def worker_blora(args: dict[str, Any]) -> dict[str, Any]:
    model, loader, _ = _main_setup(args)
    tmp = args["tmp"]
    out: dict[str, Any] = {"runs": {}}
    C.forward_backward(model, next(iter(loader)))
    import laplace_lora_ext  # noqa: F401

    names = _ours(model, None, args).lora_param_names
    for k in [None, *args["ranks"]]:
        key = "full" if k is None else str(k)
        torch.manual_seed(args["seed"])  # its MC label sampling uses the global RNG
        with C.PeakMeter() as m:
            factors = _blora_fit(model, loader, k, args["rank_threshold"])
        blocks = _blora_to_blocks(factors, names, k)
        storage = sum(
            a.numel() * a.element_size() + s.numel() * s.element_size() for a, s in factors.values()
        )
        torch.save({"H": blocks}, os.path.join(tmp, f"blora_{key}.pt"))
        out["runs"][key] = {"fit": m.as_dict(), "storage_bytes": storage}
    return out


STOCK_BACKENDS = [
    "CurvlinopsGGN",
    "CurvlinopsGGN:reduce",
    "CurvlinopsEF",
    "AsdlGGN",
    "AsdlEF",
    "BackPackGGN",
]


def worker_stock(args: dict[str, Any]) -> dict[str, Any]:
    import laplace.curvature as lc
    from laplace import Laplace

    model, loader, test = _main_setup(args)
    C.forward_backward(model, next(iter(loader)))
    name, _, approx = args["backend"].partition(":")
    backend = getattr(lc, name)
    kw: dict[str, Any] = {}
    if name.startswith("Curvlinops"):
        kw["asdl_fisher_kwargs"] = {"kfac_approx": approx or args["kfac_approx"]}
    out: dict[str, Any] = {"backend": args["backend"]}
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=backend,
        **kw,
    )
    out["n_params"] = la.n_params
    with C.PeakMeter() as m:
        la.fit(loader)
    out["fit"] = m.as_dict()
    out["n_blocks"] = len(la.H_facs.kfacs)
    blocks = R.dense_kron_factors(la.H_facs)
    torch.save(
        {"H": blocks}, os.path.join(args["tmp"], f"stock_{args['backend'].replace(':', '_')}.pt")
    )
    return out


# ---------------------------------------------------------------------- exact GGN (small)
def _compare_exact(blocks: list[list[torch.Tensor]], exact: list[torch.Tensor]) -> dict[str, float]:
    tr_m = sum(float(R.kron_block_dense(F).diagonal().sum()) for F in blocks)
    tr_e = sum(float(E.diagonal().sum()) for E in exact)
    diff2 = sum(
        float((R.kron_block_dense(F) - E).square().sum())
        for F, E in zip(blocks, exact, strict=True)
    )
    norm2 = sum(float(E.square().sum()) for E in exact)
    # error after the best scalar rescaling (shape error, independent of the overall scale)
    ip = sum(float((R.kron_block_dense(F) * E).sum()) for F, E in zip(blocks, exact, strict=True))
    nm2 = sum(float(R.kron_block_dense(F).square().sum()) for F in blocks)
    c = ip / nm2 if nm2 > 0 else float("nan")
    shape2 = sum(
        float((c * R.kron_block_dense(F) - E).square().sum())
        for F, E in zip(blocks, exact, strict=True)
    )
    return {
        "trace_ratio": tr_m / tr_e,
        "rel_frob_err": math.sqrt(diff2 / norm2),
        "rel_frob_err_best_scale": math.sqrt(shape2 / norm2),
        "best_scale": c,
    }


def worker_exact_small(args: dict[str, Any]) -> dict[str, Any]:
    import laplace_lora_ext  # noqa: F401

    out: dict[str, Any] = {"cases": {}}
    n_cls = 4
    sargs = {**args, "seq": 16, "lora_b_std": 0.3, "init_range": 0.3}
    model = _build(SMALL, sargs, 2, torch.float64, n_cls)
    for case, (N, T) in {
        "N1_T1": (1, 1),
        f"N{args['n_small']}_T1": (args["n_small"], 1),
        f"N{args['n_small']}_T16": (args["n_small"], 16),
    }.items():
        data = C.random_data(N, T, SMALL["vocab"], n_cls, seed=31)
        la0 = _ours(model, None, args)
        exact = R.exact_ggn_blocks(model, data, la0.params)
        res: dict[str, Any] = {"N": N, "T": T}
        for approx in ("expand", "reduce"):
            for ft in ("exact", "mc"):
                la = _ours(model, None, args, kfac_approx=approx, fisher_type=ft, mc_samples=1)
                la.fit(C.make_loader(data, min(N, 8)))
                res[f"ours_{approx}_{ft}"] = _compare_exact(R.dense_kron_factors(la.H_facs), exact)
        for bs in args["blora_batch_sizes"]:
            if bs > N:
                continue
            torch.manual_seed(args["seed"])
            factors = _blora_fit(model, C.make_loader(data, bs), None, 10**9)
            blocks = _blora_to_blocks(factors, la0.lora_param_names, None)
            res[f"blora_B{bs}"] = _compare_exact(blocks, exact)
        out["cases"][case] = res
    out["n_params"] = la0.n_params
    return out


WORKERS = {
    "ours": worker_ours,
    "blora": worker_blora,
    "stock": worker_stock,
    "exact_small": worker_exact_small,
}


# ---------------------------------------------------------------------- summary (pure)
Loader = Callable[[str], "dict[str, Any] | None"]


def _loader(tmp: str) -> Loader:
    """``name -> `` the tensors a worker saved as ``<tmp>/<name>.pt`` (``None`` if absent)."""

    def load(name: str) -> dict[str, Any] | None:
        path = os.path.join(tmp, f"{name}.pt")
        return torch.load(path) if os.path.exists(path) else None

    return load


def _trace(blocks: list[list[torch.Tensor]]) -> float:
    t = 0.0
    for F in blocks:
        v = 1.0
        for f in F:
            v *= float(f.diagonal().sum())
        t += v
    return t


def _ip(F: list[torch.Tensor], G: list[torch.Tensor]) -> float:
    v = 1.0
    for x, y in zip(F, G, strict=True):
        v *= float((x * y).sum())
    return v


def summarize(runs: dict[str, Any], args: argparse.Namespace, load: Loader) -> dict[str, Any]:
    """Every number of the report: the workers' results (``runs``) and the curvatures they
    saved (``load(name)``: ``{"H": factors per block, "f_var": ...}`` or ``None``)."""
    ours, blora = runs.get("ours", {}), runs.get("blora", {})
    dense = load("ours_full")
    ranks = [str(k) for k in args.ranks] + ["full"]
    have_ours = bool(ours.get("ok")) and dense is not None
    res: dict[str, Any] = {
        "lowrank": _lowrank_summary(ours, dense, ranks, load) if have_ours else {},
        "blora": _blora_summary(ours, blora, dense, ranks, load)
        if have_ours and blora.get("ok")
        else {},
    }
    if res["blora"]:
        mc = ours["runs"].get("full_mc", {}).get("fit", {}).get("cpu_seconds")
        mc8 = ours["runs"].get("8_mc", {}).get("fit", {}).get("cpu_seconds")
        res["ours_mc_fit_cpu_s"] = {"full": mc, "8": mc8}
    res["exact"] = runs.get("exact_small", {}).get("cases")
    res["stock"] = {
        bk: _stock_summary(runs.get(f"stock_{bk}", {}), bk, ours if have_ours else {}, load)
        for bk in args.stock_backends
    }
    return res


def _lowrank_summary(
    ours: dict[str, Any], dense: dict[str, Any], ranks: list[str], load: Loader
) -> dict[str, Any]:
    """(a) ours at every ``factor_rank`` vs ours dense: curvature and predictive errors."""
    dH = dense["H"]
    tr_dense = _trace(dH)
    out = {}
    for k in ranks:
        o = load(f"ours_{k}")
        run = ours["runs"][k]
        err, nrm = R.kron_frobenius(o["H"], dH)
        out[k] = {
            "H_rel_frob_err": err / nrm,
            "trace_ratio_vs_dense": _trace(o["H"]) / tr_dense,
            "f_var_rel_err": R.rel(o["f_var"], dense["f_var"]),
            "f_var_diag_rel_err": R.rel(
                o["f_var"].diagonal(dim1=-2, dim2=-1), dense["f_var"].diagonal(dim1=-2, dim2=-1)
            ),
            "fit_cpu_s": run["fit"]["cpu_seconds"],
            "fit_peak_delta": run["fit"]["peak_delta_bytes"],
            "storage_bytes": run["storage_bytes"],
        }
    return out


def _blora_summary(
    ours: dict[str, Any],
    blora: dict[str, Any],
    dense: dict[str, Any],
    ranks: list[str],
    load: Loader,
) -> dict[str, Any]:
    """(b) bayesian-lora at every k vs ours: time, memory, curvature vs ours dense."""
    out = {}
    for k in ranks:
        b = load(f"blora_{k}")
        run = blora["runs"][k]
        ofit = ours["runs"][k]["fit"]
        err_d, nrm_d = R.kron_frobenius(b["H"], dense["H"])
        # shape error after the best scalar rescaling of theirs
        ip = sum(_ip(F, G) for F, G in zip(b["H"], dense["H"], strict=True))
        bb = sum(_ip(F, F) for F in b["H"])
        out[k] = {
            "fit_cpu_s": run["fit"]["cpu_seconds"],
            "fit_peak_delta": run["fit"]["peak_delta_bytes"],
            "ours_fit_cpu_s": ofit["cpu_seconds"],
            "ours_fit_peak_delta": ofit["peak_delta_bytes"],
            "time_ratio_blora_over_ours": run["fit"]["cpu_seconds"] / ofit["cpu_seconds"],
            "trace_ratio_vs_ours_dense": _trace(b["H"]) / _trace(dense["H"]),
            "rel_frob_err_vs_ours_dense": err_d / nrm_d,
            "rel_frob_err_vs_ours_dense_best_scale": math.sqrt(max(0.0, nrm_d**2 - ip**2 / bb))
            / nrm_d,
            "best_scale": ip / bb,
            "storage_bytes": run["storage_bytes"],
        }
    return out


def _stock_summary(r: dict[str, Any], bk: str, ours: dict[str, Any], load: Loader) -> dict:
    """(c) one stock backend: failure, or time / memory / curvature vs ours (``ours`` is
    ``{}`` when our worker failed)."""
    if not r.get("ok"):
        err = r.get("error", "not run").replace("\n", " ").replace("|", "/")
        return {"ok": False, "error": err}
    d: dict[str, Any] = {
        "ok": True,
        "fit_cpu_s": r["fit"]["cpu_seconds"],
        "fit_peak_delta": r["fit"]["peak_delta_bytes"],
        "n_blocks": r["n_blocks"],
    }
    if not ours:
        return d
    ofit = ours["runs"]["full"]["fit"]
    o8 = ours["runs"].get("8", {}).get("fit")
    d["time_ratio_vs_ours_dense"] = d["fit_cpu_s"] / ofit["cpu_seconds"]
    d["mem_ratio_vs_ours_dense"] = d["fit_peak_delta"] / max(1, ofit["peak_delta_bytes"])
    if o8:
        d["time_ratio_vs_ours_k8"] = d["fit_cpu_s"] / o8["cpu_seconds"]
        d["mem_ratio_vs_ours_k8"] = d["fit_peak_delta"] / max(1, o8["peak_delta_bytes"])
    s = load(f"stock_{bk.replace(':', '_')}")
    ref = load("ours_full_reduce" if bk.endswith(":reduce") else "ours_full")
    if ref is not None and len(s["H"]) == len(ref["H"]):
        err, nrm = R.kron_frobenius(s["H"], ref["H"])
        d["rel_frob_err_vs_ours_dense"] = err / nrm
        d["trace_ratio_vs_ours_dense"] = _trace(s["H"]) / _trace(ref["H"])
    elif ref is not None:
        d["structure_mismatch"] = f"{len(s['H'])} blocks vs {len(ref['H'])}"
    return d


# ---------------------------------------------------------------------- report (markdown)
def render(res: dict[str, Any], runs: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown report of :func:`summarize`'s ``res`` (``runs`` for run details and
    failure messages)."""
    lines = [
        f"# {NAME}: ours vs bayesian-lora vs stock laplace-torch (small model, CPU)",
        "",
        f"Main model: random Llama hidden {MAIN['hidden']}, {MAIN['layers']} layers, vocab "
        f"{MAIN['vocab']}, LoRA r={args.lora_r} on q_proj, v_proj, lm_head, {args.classes} choice "
        f"tokens; N={args.n} x T={args.seq}, batch {args.batch}, {args.n_test} test sequences; "
        f"float32, {args.threads} thread(s). rank_threshold = lr_threshold = {args.rank_threshold} "
        "(so the 256- and 1000-sided factors are low-rank). Ours: exact Fisher, kfac_approx="
        f"expand unless noted. Times are CPU seconds of the worker (shared machine); peak memory "
        "= peak RSS during the fit minus RSS before it, fresh subprocess per system (method in "
        "benchmarks/_common.py).",
        "",
    ]
    lines += _render_lowrank(res, runs, args)
    lines += _render_blora(res, runs)
    lines += _render_exact(res, runs, args)
    lines += _render_stock(res, runs, args)
    return "\n".join(lines)


def _render_lowrank(res: dict[str, Any], runs: dict[str, Any], args: argparse.Namespace) -> list:
    ours = runs.get("ours", {})
    if not res["lowrank"]:
        return [f"ours worker failed: {ours.get('error', '?')[:1000]}", ""]
    fit_full = res["lowrank"]["full"]["fit_cpu_s"]
    rows = [
        [
            k,
            d["H_rel_frob_err"],
            d["trace_ratio_vs_dense"],
            d["f_var_rel_err"],
            d["f_var_diag_rel_err"],
            C.fmt_bytes(d["storage_bytes"]),
            f"{d['fit_cpu_s']:.2f} s ({d['fit_cpu_s'] / fit_full:.2f}x)",
            C.fmt_bytes(d["fit_peak_delta"]),
        ]
        for k, d in res["lowrank"].items()
    ]
    return [
        "## (a) ours: low-rank factors vs dense",
        "",
        f"Same prior precision for every k (marglik on dense: {ours.get('prior_precision')}). "
        "H error: ||H_k - H_dense||_F / ||H_dense||_F over the block-diagonal Kronecker "
        "curvature (factor-wise, never forming a Kronecker product). f_var: GLM predictive "
        f"covariances (B, C, C) on the {args.n_test} test sequences.",
        "",
        C.md_table(
            [
                "factor_rank k",
                "rel. Frobenius err. of H",
                "trace(H_k)/trace(H_dense)",
                "rel. err. of f_var",
                "rel. err. of diag f_var",
                "factor storage",
                "fit CPU (vs dense)",
                "fit peak mem",
            ],
            rows,
        ),
        "",
    ]


def _render_blora(res: dict[str, Any], runs: dict[str, Any]) -> list[str]:
    if not res["blora"]:
        return [
            f"bayesian-lora worker failed: {runs.get('blora', {}).get('error', '?')[:1500]}",
            "",
        ]
    rows = [
        [
            k,
            f"{d['fit_cpu_s']:.2f} s",
            f"{d['ours_fit_cpu_s']:.2f} s",
            d["time_ratio_blora_over_ours"],
            C.fmt_bytes(d["fit_peak_delta"]),
            C.fmt_bytes(d["ours_fit_peak_delta"]),
            d["trace_ratio_vs_ours_dense"],
            d["rel_frob_err_vs_ours_dense"],
            d["rel_frob_err_vs_ours_dense_best_scale"],
        ]
        for k, d in res["blora"].items()
    ]
    mc, mc8 = res["ours_mc_fit_cpu_s"]["full"], res["ours_mc_fit_cpu_s"]["8"]
    return [
        "## (b) bayesian-lora 0.0.6 on the same model and data",
        "",
        "`calculate_kronecker_factors(n_kfac=k, lr_threshold=128, "
        "target_module_keywords=['lora'])`: last token only, 1 MC label per example, "
        "mean-reduced loss. Its curvature H = S ⊗ A (roots R expanded as R Rᵀ) compared "
        "with ours dense (a proxy; the exact GGN comparison is below). 'best-scale' = "
        "error after the optimal scalar rescaling of theirs (shape only).",
        "",
        C.md_table(
            [
                "k",
                "b-lora fit",
                "ours fit (exact)",
                "time b-lora/ours",
                "b-lora peak",
                "ours peak",
                "trace b-lora / ours dense",
                "rel. err. vs ours dense",
                "same, best scale",
            ],
            rows,
        ),
        "",
        f"Ours with fisher_type='mc' (one backward pass, like bayesian-lora): dense fit "
        f"{C.fmt(mc)} s, k=8 fit {C.fmt(mc8)} s CPU "
        "(b-lora/ours-mc at k=8: "
        f"{C.fmt(res['blora']['8']['fit_cpu_s'] / mc8) if mc8 else 'n/a'}x).",
        "",
    ]


def _exact_method_order(s: str) -> tuple[bool, int, str]:
    """ours first, then bayesian-lora by batch size."""
    return (not s.startswith("ours"), int(s[len("blora_B") :]) if s.startswith("blora_B") else 0, s)


def _render_exact(res: dict[str, Any], runs: dict[str, Any], args: argparse.Namespace) -> list:
    ex = runs.get("exact_small", {})
    if not ex.get("ok"):
        return [f"exact-GGN worker failed: {ex.get('error', '?')[:1500]}", ""]
    cases = res["exact"]
    methods = sorted(
        {m for c in cases.values() for m in c if m not in ("N", "T")}, key=_exact_method_order
    )
    rows = []
    for m in methods:
        row = [m]
        for case in cases.values():
            v = case.get(m)
            row.append(
                "-"
                if v is None
                else f"{v['trace_ratio']:.3f} / {v['rel_frob_err']:.3g} / "
                f"{v['rel_frob_err_best_scale']:.3g}"
            )
        rows.append(row)
    return [
        "### Curvature vs the exact block-diagonal GGN (smaller model)",
        "",
        f"Random Llama hidden {SMALL['hidden']}, {SMALL['layers']} layers, vocab "
        f"{SMALL['vocab']}, LoRA r=2 on q, v, lm_head ({ex['n_params']} LoRA parameters), "
        "4 classes, float64. Exact: per parameter tensor, the diagonal block of "
        "Σ_n J_nᵀ Λ_n J_n with J from explicit per-example autograd calls. Each cell: "
        "trace ratio (method / exact) / relative Frobenius error / error after the best "
        "scalar rescaling. ours: batch 8; blora_B<b>: bayesian-lora with batch size b "
        "(dense factors, 1 MC label, so noisy); '_mc' = ours with 1 MC label.",
        "",
        f"bayesian-lora's dense factors average per batch the activation sums (x B) and the "
        f"output-gradient outer products of the *mean*-reduced loss (x 1/B^2 x B), so its "
        f"curvature is a per-example average: trace ratio ~ 1/N = {1 / args.n_small:.3f} "
        "whatever the batch size (its low-rank factors are summed, not averaged, which "
        "changes the scale again, see the main-model table). It also reads the last token "
        "only, so sequence inputs lose the other positions' curvature.",
        "",
        C.md_table(["method"] + [f"{k} (N={c['N']}, T={c['T']})" for k, c in cases.items()], rows),
        "",
    ]


def _stock_row(bk: str, d: dict[str, Any]) -> list[str]:
    if not d["ok"]:
        return [bk, "FAILED: " + d["error"][:300], "", "", "", ""]
    return [
        bk,
        f"{d['fit_cpu_s']:.2f} s ({C.fmt(d.get('time_ratio_vs_ours_dense'))}x / "
        f"{C.fmt(d.get('time_ratio_vs_ours_k8'))}x)",
        f"{C.fmt_bytes(d['fit_peak_delta'])} ({C.fmt(d.get('mem_ratio_vs_ours_dense'))}x / "
        f"{C.fmt(d.get('mem_ratio_vs_ours_k8'))}x)",
        C.fmt(d.get("trace_ratio_vs_ours_dense")),
        C.fmt(d.get("rel_frob_err_vs_ours_dense")),
        d.get("structure_mismatch", "ok"),
    ]


def _render_stock(res: dict[str, Any], runs: dict[str, Any], args: argparse.Namespace) -> list:
    rows = [_stock_row(bk, res["stock"][bk]) for bk in args.stock_backends]
    ours = runs.get("ours", {})
    if ours.get("ok"):
        of = ours["runs"]["full"]["fit"]
        o8 = ours["runs"]["8"]["fit"]
        rows.append(
            [
                "**ours dense / ours k=8**",
                f"{of['cpu_seconds']:.2f} s / {o8['cpu_seconds']:.2f} s",
                f"{C.fmt_bytes(of['peak_delta_bytes'])} / {C.fmt_bytes(o8['peak_delta_bytes'])}",
                "1",
                "0",
                "ok",
            ]
        )
    return [
        "## (c) stock laplace-torch 0.3 dense KronLaplace",
        "",
        "`Laplace(model, 'classification', subset_of_weights='all', hessian_structure='kron', "
        "backend=...)` on the same wrapped PEFT model (only LoRA parameters require grad); "
        f"curvlinops with `asdl_fisher_kwargs={{'kfac_approx': '{args.kfac_approx}'}}`. "
        "Ratios in parentheses: stock / ours dense and stock / ours k=8. Curvature compared "
        "with ours dense (expand; for ':reduce' with ours dense reduce), both exact-Fisher/type-2 "
        "KFAC except the EF backends (empirical Fisher, so not expected to match).",
        "",
        C.md_table(
            [
                "backend",
                "fit CPU (ratios)",
                "fit peak memory (ratios)",
                "trace vs ours dense",
                "rel. err. of H vs ours dense",
                "structure",
            ],
            rows,
        ),
        "",
    ]


def plot(res: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lr = res.get("lowrank") or {}
    ks = [k for k in lr if k != "full"]
    if not ks:
        return False
    x = [int(k) for k in ks]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].loglog(x, [max(lr[k]["H_rel_frob_err"], 1e-8) for k in ks], "o-", label="ours: H")
    ax[0].loglog(x, [max(lr[k]["f_var_rel_err"], 1e-8) for k in ks], "s-", label="ours: f_var")
    b = res.get("blora") or {}
    if b:
        ax[0].loglog(
            x,
            [b[k]["rel_frob_err_vs_ours_dense"] for k in ks],
            "^--",
            label="bayesian-lora: H vs ours dense",
        )
        ax[0].loglog(
            x,
            [b[k]["rel_frob_err_vs_ours_dense_best_scale"] for k in ks],
            "v--",
            label="bayesian-lora, best scale",
        )
    for a in ax:
        a.set_xticks(x)
        a.set_xticklabels([str(v) for v in x])
        a.minorticks_off()
    ax[0].set_xlabel("factor rank k")
    ax[0].set_ylabel("relative error vs dense")
    ax[0].legend(fontsize=7)
    ax[1].semilogx(x, [lr[k]["fit_cpu_s"] for k in ks], "o-", label="ours (exact Fisher)")
    if b:
        ax[1].semilogx(x, [b[k]["fit_cpu_s"] for k in ks], "^--", label="bayesian-lora")
    ax[1].axhline(lr["full"]["fit_cpu_s"], color="gray", ls=":", label="ours dense")
    ax[1].set_xlabel("factor rank k")
    ax[1].set_ylabel("fit CPU seconds")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    if C.worker_main(WORKERS):
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=RANKS_DEFAULT)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--rank-threshold", type=int, default=128)
    p.add_argument("--kfac-approx", default="expand", choices=["expand", "reduce"])
    p.add_argument("--marglik-steps", type=int, default=100)
    p.add_argument("--n-small", type=int, default=32, help="N of the exact-GGN comparison")
    p.add_argument("--blora-batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--stock-backends", nargs="+", default=STOCK_BACKENDS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_peers_")
    base = {k: v for k, v in vars(args).items()}
    base["tmp"] = tmp
    t0 = time.perf_counter()
    runs: dict[str, Any] = {}
    for name, worker, extra in [
        ("ours", "ours", {}),
        ("blora", "blora", {}),
        ("exact_small", "exact_small", {}),
    ] + [(f"stock_{b}", "stock", {"backend": b}) for b in args.stock_backends]:
        print(f"[{NAME}] {name} ...", flush=True)
        runs[name] = C.run_worker(MODULE, worker, {**base, **extra})
        if not runs[name].get("ok"):
            print(f"[{NAME}]   failed: {runs[name].get('error', '')[:300]}", flush=True)
    res = summarize(runs, args, _loader(tmp))
    md = render(res, runs, args)
    png = C.RESULTS_DIR / f"{NAME}.png"
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if plot(res, str(png)):
        md += f"\n![low-rank error and fit time]({png.name})\n"
    md += f"\nTotal benchmark wall time: {time.perf_counter() - t0:.0f} s.\n"
    shutil.rmtree(tmp, ignore_errors=True)
    C.publish(NAME, args, res, runs, md)


if __name__ == "__main__":
    main()
