"""GLM predictive: ours (Jacobian-free, per-layer blocks) vs stock laplace-torch 0.3
(``torch.func.jacrev`` over all trainable parameters), same model, same posterior.

Model: random ``LlamaForCausalLM`` hidden 512, intermediate 1376, 4 layers, 8 heads,
vocab 1000, float32, LoRA r=8 (alpha 16) on q_proj and v_proj -> 4 * 2 * 2 * 8 * 512 =
65,536 LoRA parameters; ``LastTokenChoiceLM`` with ``--classes`` choice tokens.
Predictive batches: B=8 sequences of T=128 tokens. The posterior is ours (``LoraKronLaplace``,
dense KFAC, exact Fisher, expand) fitted on N=32 sequences, prior precision by marglik.

Stock: ``Laplace(model, 'classification', subset_of_weights='all',
hessian_structure='kron', backend=CurvlinopsGGN)`` on the same wrapped model (only LoRA
parameters require grad) — fitted by its own backend (time and f_var reported), and then
given *our* fitted Kronecker factors, prior and mean, so that both compute the predictive
of the same posterior. Its ``_glm_predictive_distribution`` is then timed and measured.

Each system runs in a fresh subprocess; peak memory = peak RSS during the predictive
calls minus RSS just before them (see ``benchmarks/_common.py``); times are CPU seconds
of the process (1 thread by default; the machine is shared) and wall seconds.
Bars: stock peak / ours peak >= 10, stock time / ours time >= 1, same f_var.

Run: ``python -m benchmarks.bench_predictive`` (about 3-6 min on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from benchmarks import _common as C
from laplace_lora_ext import testing as R

NAME = "bench_predictive"
MODULE = "benchmarks.bench_predictive"

SHAPE = dict(hidden=512, intermediate=1376, layers=4, vocab=1000, heads=8)


def _setup(args: dict[str, Any]):
    from laplace_lora_ext import LastTokenChoiceLM

    shape = {**SHAPE, "layers": args["layers"], "hidden": args["hidden"]}
    pm = C.build_llama_lora(
        **shape,
        r=args["lora_r"],
        alpha=2 * args["lora_r"],
        targets=("q_proj", "v_proj"),
        max_positions=max(256, args["seq"]),
        seed=args["seed"],
        lora_b_std=0.02,
    )
    model = LastTokenChoiceLM(pm, C.choice_ids(args["classes"], shape["vocab"])).eval()
    train = C.random_data(args["n_train"], args["seq"], shape["vocab"], args["classes"], seed=41)
    test = C.random_data(
        args["batch"] * args["test_batches"],
        args["seq"],
        shape["vocab"],
        args["classes"],
        seed=42,
        padding=args["padding"],
    )
    return model, C.make_loader(train, args["batch"]), C.batches(test, args["batch"])


def _x(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def worker_ours(args: dict[str, Any]) -> dict[str, Any]:
    from laplace import Laplace

    import laplace_lora_ext  # noqa: F401

    model, loader, test = _setup(args)
    out: dict[str, Any] = {}
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    with C.PeakMeter() as m:
        la.fit(loader)
    out["fit"] = m.as_dict()
    la.optimize_prior_precision(method="marglik", pred_type="glm", n_steps=args["marglik_steps"])
    out["n_params"] = la.n_params
    out["prior_precision"] = la.prior_precision.reshape(-1).tolist()
    torch.save(
        {
            "kfacs": [[f.detach().clone() for f in F] for F in la.H_facs.kfacs],
            "prior_precision": la.prior_precision.detach().clone(),
            "mean": la.mean.detach().clone(),
            "n_data": la.n_data,
            "names": la.lora_param_names,
        },
        os.path.join(args["tmp"], "ours_posterior.pt"),
    )
    la.predictive_moments(_x(test[0]))  # warm-up
    with C.PeakMeter() as m:
        res = [la.predictive_moments(_x(b)) for b in test]
    out["predictive"] = m.as_dict()
    torch.save(
        {"f_mu": torch.cat([r[0] for r in res]), "f_var": torch.cat([r[1] for r in res])},
        os.path.join(args["tmp"], "ours_pred.pt"),
    )
    C.forward_backward(model, test[0])
    with C.PeakMeter() as m:
        for b in test:
            C.forward_backward(model, b)
    out["fwdbwd"] = m.as_dict()
    return out


def worker_stock(args: dict[str, Any]) -> dict[str, Any]:
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN
    from laplace.utils.matrix import Kron

    model, loader, test = _setup(args)
    out: dict[str, Any] = {}
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=CurvlinopsGGN,
        asdl_fisher_kwargs={"kfac_approx": "expand"},
    )
    out["n_params"] = la.n_params
    post = torch.load(os.path.join(args["tmp"], "ours_posterior.pt"))
    # our posterior covers exactly the trainable parameters, in the same order
    shapes_ok = [tuple(p.shape) for p in la.params] == [
        (F[0].shape[0], F[1].shape[0]) for F in post["kfacs"]
    ]
    out["same_parameter_layout"] = shapes_ok
    if args["stock_fit"]:
        with C.PeakMeter() as m:
            la.fit(loader)
        out["fit"] = m.as_dict()
        la.prior_precision = post["prior_precision"]
        la._glm_predictive_distribution(_x(test[0]))  # warm-up
        with C.PeakMeter() as m:
            res = [la._glm_predictive_distribution(_x(b)) for b in test]
        out["predictive_own_fit"] = m.as_dict()
        torch.save(
            {
                "f_var": torch.cat([r[1] for r in res]),
                "kfacs": [[f.detach().clone() for f in F] for F in la.H_facs.kfacs],
            },
            os.path.join(args["tmp"], "stock_own_pred.pt"),
        )
    # inject our posterior
    la.H_facs = Kron([[f.clone() for f in F] for F in post["kfacs"]])
    la.H = la.H_facs.decompose(damping=la.damping)
    la.mean = post["mean"].clone()
    la.n_data = post["n_data"]
    la.prior_precision = post["prior_precision"]
    if not args["stock_fit"]:
        la._glm_predictive_distribution(_x(test[0]))  # warm-up
    with C.PeakMeter() as m:
        res = [la._glm_predictive_distribution(_x(b)) for b in test]
    out["predictive"] = m.as_dict()
    torch.save(
        {"f_mu": torch.cat([r[0] for r in res]), "f_var": torch.cat([r[1] for r in res])},
        os.path.join(args["tmp"], "stock_pred.pt"),
    )
    B, T = test[0]["input_ids"].shape
    out["jacobian_bytes_per_batch"] = B * args["classes"] * la.n_params * 4
    return out


WORKERS = {"ours": worker_ours, "stock": worker_stock}


def analyse(runs: dict[str, Any], tmp: str, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    ours, stock = runs.get("ours", {}), runs.get("stock", {})
    n_params = 4 * args.layers * args.lora_r * args.hidden
    lines = [
        f"# {NAME}: GLM predictive, ours vs stock laplace-torch 0.3 (CPU)",
        "",
        f"Random Llama hidden {args.hidden}, {args.layers} layers, vocab {SHAPE['vocab']}, LoRA "
        f"r={args.lora_r} on q_proj, v_proj ({n_params:,} LoRA parameters), {args.classes} "
        f"choice tokens; predictive on {args.test_batches} batch(es) of B={args.batch} x "
        f"T={args.seq}{' (left-padded)' if args.padding else ''}; posterior = ours dense KFAC "
        f"fitted on N={args.n_train} (marglik prior), given to stock `KronLaplace` as its "
        f"H_facs / prior / mean. float32, {args.threads} thread(s); CPU seconds of the worker "
        "process (shared machine) and wall seconds.",
        "",
    ]
    res: dict[str, Any] = {}
    if not (ours.get("ok") and stock.get("ok")):
        lines += [
            f"ours: {ours.get('error', 'ok')[:1500]}",
            "",
            f"stock: {stock.get('error', 'ok')[:1500]}",
            "",
        ]
        return {"ours": ours, "stock": stock}, "\n".join(lines)
    nt = args.test_batches
    o, s = ours["predictive"], stock["predictive"]
    op = torch.load(os.path.join(tmp, "ours_pred.pt"))
    sp = torch.load(os.path.join(tmp, "stock_pred.pt"))
    res = {
        "n_lora_params": ours["n_params"],
        "ours_cpu_s_per_batch": o["cpu_seconds"] / nt,
        "stock_cpu_s_per_batch": s["cpu_seconds"] / nt,
        "ours_wall_s_per_batch": o["seconds"] / nt,
        "stock_wall_s_per_batch": s["seconds"] / nt,
        "ours_peak_delta": o["peak_delta_bytes"],
        "stock_peak_delta": s["peak_delta_bytes"],
        "ours_baseline_rss": o["baseline_rss_bytes"],
        "stock_baseline_rss": s["baseline_rss_bytes"],
        "fwdbwd_cpu_s_per_batch": ours["fwdbwd"]["cpu_seconds"] / nt,
        "f_var_rel_err": R.rel(op["f_var"], sp["f_var"]),
        "f_var_diag_rel_err": R.rel(
            op["f_var"].diagonal(dim1=-2, dim2=-1), sp["f_var"].diagonal(dim1=-2, dim2=-1)
        ),
        "f_mu_rel_err": R.rel(op["f_mu"], sp["f_mu"]),
        "same_parameter_layout": stock.get("same_parameter_layout"),
        "stock_jacobian_bytes_per_batch": stock["jacobian_bytes_per_batch"],
    }
    res["mem_ratio_stock_over_ours"] = res["stock_peak_delta"] / max(1, res["ours_peak_delta"])
    res["time_ratio_stock_over_ours_cpu"] = (
        res["stock_cpu_s_per_batch"] / res["ours_cpu_s_per_batch"]
    )
    res["time_ratio_stock_over_ours_wall"] = (
        res["stock_wall_s_per_batch"] / res["ours_wall_s_per_batch"]
    )
    res["meets_memory_bar"] = res["mem_ratio_stock_over_ours"] >= 10
    res["meets_time_bar"] = res["time_ratio_stock_over_ours_cpu"] >= 1
    own = os.path.join(tmp, "stock_own_pred.pt")
    if os.path.exists(own):
        so = torch.load(own)
        post = torch.load(os.path.join(tmp, "ours_posterior.pt"))
        err, nrm = R.kron_frobenius(
            [[f.double() for f in F] for F in so["kfacs"]],
            [[f.double() for f in F] for F in post["kfacs"]],
        )
        res["stock_own_fit_H_rel_err_vs_ours"] = err / nrm
        res["stock_own_fit_f_var_rel_err_vs_ours"] = R.rel(so["f_var"], op["f_var"])
        res["stock_fit_cpu_s"] = stock["fit"]["cpu_seconds"]
        res["ours_fit_cpu_s"] = ours["fit"]["cpu_seconds"]
        res["stock_fit_peak_delta"] = stock["fit"]["peak_delta_bytes"]
        res["ours_fit_peak_delta"] = ours["fit"]["peak_delta_bytes"]
    rows = [
        [
            "peak memory of the predictive (above RSS before it)",
            C.fmt_bytes(res["ours_peak_delta"]),
            C.fmt_bytes(res["stock_peak_delta"]),
            f"**{res['mem_ratio_stock_over_ours']:.1f}x** less",
            ">= 10x less",
            "met" if res["meets_memory_bar"] else "NOT met",
        ],
        [
            "CPU time per batch",
            f"{res['ours_cpu_s_per_batch']:.2f} s",
            f"{res['stock_cpu_s_per_batch']:.2f} s",
            f"**{res['time_ratio_stock_over_ours_cpu']:.2f}x** faster",
            "no slower",
            "met" if res["meets_time_bar"] else "NOT met",
        ],
        [
            "wall time per batch",
            f"{res['ours_wall_s_per_batch']:.2f} s",
            f"{res['stock_wall_s_per_batch']:.2f} s",
            f"{res['time_ratio_stock_over_ours_wall']:.2f}x",
            "",
            "",
        ],
        [
            "f_var, same posterior: rel. Frobenius difference",
            "",
            "",
            f"{res['f_var_rel_err']:.2e} (diag {res['f_var_diag_rel_err']:.2e}; "
            f"f_mu {res['f_mu_rel_err']:.1e})",
            "same",
            "met" if res["f_var_rel_err"] < 1e-3 else "NOT met",
        ],
    ]
    lines += [
        C.md_table(["", "ours", "stock", "stock / ours", "bar", ""], rows),
        "",
        "For scale: one forward+backward of the same batch takes "
        f"{res['fwdbwd_cpu_s_per_batch']:.2f} CPU s; "
        f"stock's (B, C, P) Jacobian alone is {C.fmt_bytes(res['stock_jacobian_bytes_per_batch'])} "
        f"per batch; RSS before the predictive: ours {C.fmt_bytes(res['ours_baseline_rss'])}, "
        f"stock {C.fmt_bytes(res['stock_baseline_rss'])}.",
        "",
    ]
    if "stock_own_fit_H_rel_err_vs_ours" in res:
        lines += [
            "Stock fitted by itself (CurvlinopsGGN, exact type-2 KFAC, expand): its Kronecker "
            f"factors differ from ours by {res['stock_own_fit_H_rel_err_vs_ours']:.2e} "
            f"(relative Frobenius of H) and its f_var from ours by "
            f"{res['stock_own_fit_f_var_rel_err_vs_ours']:.2e}; fit {res['stock_fit_cpu_s']:.1f} s "
            f"/ {C.fmt_bytes(res['stock_fit_peak_delta'])} vs ours {res['ours_fit_cpu_s']:.1f} s / "
            f"{C.fmt_bytes(res['ours_fit_peak_delta'])}.",
            "",
        ]
    return res, "\n".join(lines)


def main() -> None:
    if C.worker_main(WORKERS):
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    p.add_argument("--layers", type=int, default=SHAPE["layers"])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--test-batches", type=int, default=2)
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--padding", action="store_true", help="left-pad the test sequences")
    p.add_argument("--marglik-steps", type=int, default=100)
    p.add_argument(
        "--no-stock-fit",
        action="store_true",
        help="skip stock's own fit (only the injected posterior)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_predictive_")
    base = {**vars(args), "tmp": tmp, "stock_fit": not args.no_stock_fit}
    t0 = time.perf_counter()
    runs: dict[str, Any] = {}
    print(f"[{NAME}] ours ...", flush=True)
    runs["ours"] = C.run_worker(MODULE, "ours", base)
    if runs["ours"].get("ok"):
        print(f"[{NAME}] stock ...", flush=True)
        runs["stock"] = C.run_worker(MODULE, "stock", base)
    for k, v in runs.items():
        if not v.get("ok"):
            print(f"[{NAME}] {k} FAILED: {v.get('error', '')[:1500]}", flush=True)
    res, md = analyse(runs, tmp, args)
    md += f"\nTotal benchmark wall time: {time.perf_counter() - t0:.0f} s.\n"
    shutil.rmtree(tmp, ignore_errors=True)
    C.publish(NAME, args, res, runs, md)


if __name__ == "__main__":
    main()
