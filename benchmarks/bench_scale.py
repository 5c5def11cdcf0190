"""Laplace-LoRA at LLaMA-2-7B layer shapes on CPU: factor storage, fit time, predictive.

Model: random ``LlamaForCausalLM`` with LLaMA-2-7B shapes (hidden 4096, intermediate
11008, vocab 32000, 32 heads) but **reduced depth** (``--layers``, default 1 and 2, float32,
2 CPU threads), LoRA r=8 (alpha 16) on ``q_proj``, ``v_proj`` and ``lm_head``, read through
``LastTokenChoiceLM`` with 2 choice tokens. Data: random tokens, ``--batch`` x ``--seq``,
``--train-batches`` batches to fit, ``--test-batches`` to predict.

Measured (each configuration in a fresh subprocess, peak memory = peak RSS minus RSS
before the step, see ``benchmarks/_common.py``):

(a) bytes of all Kronecker factors of ``LoraKronLaplace(factor_rank=32)`` per decoder
    layer and for ``lm_head`` (low-rank factors counted as ``U`` and ``s``), extrapolated to
    32 layers, vs the dense KFAC storage (``sum d^2`` over factor sides) -- bar <= 100 MB;
(b) ``la.fit`` time vs plain forward+backward over the same batches -- bar <= 2x;
(c) GLM predictive time per batch vs forward+backward, and its peak memory;
(d) stock laplace-torch at these shapes: its dense ``KronLaplace`` (memory of
    ``Kron.init_from_model`` measured, eigendecomposition time extrapolated from a measured
    ``eigh``), and its GLM predictive's ``torch.func.jacrev`` Jacobians (measured at the
    reduced depth; the variance step needs the dense posterior and is not run);
(e) the CPU time of the low-rank compression (``LowRankFactor.from_root``) on a (4096, m)
    root vs m, projected per layer against the measured fwd+bwd cost per token, to show how
    the fit ratio grows with tokens per batch;
plus a check, by a ``TorchDispatchMode`` over one ``fit`` + one predictive batch, that no
ATen op of ours outputs a tensor with two dimensions above 2048 (so in particular no
32000 x 32000 or 4096 x 4096 factor is ever materialised).

Run: ``python -m benchmarks.bench_scale`` (about 5-8 min on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from typing import Any

import torch

from benchmarks import _common as C

NAME = "bench_scale"
MODULE = "benchmarks.bench_scale"

SHAPE = dict(hidden=4096, intermediate=11008, vocab=32000, heads=32)
FULL_DEPTH = 32


def _build(args: dict[str, Any]) -> tuple[torch.nn.Module, Any, list[int]]:
    from laplace_lora_ext import LastTokenChoiceLM

    peft_model = C.build_llama_lora(
        **SHAPE,
        layers=args["layers"],
        r=args["lora_r"],
        alpha=2 * args["lora_r"],
        max_positions=max(128, args["seq"]),
        seed=args["seed"],
    )
    ids = C.choice_ids(2, SHAPE["vocab"])
    return LastTokenChoiceLM(peft_model, ids).eval(), peft_model, ids


def _data(args: dict[str, Any]) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    B, T = args["batch"], args["seq"]
    train = C.random_data(B * args["train_batches"], T, SHAPE["vocab"], 2, seed=11)
    test = C.random_data(B * args["test_batches"], T, SHAPE["vocab"], 2, seed=12)
    return C.make_loader(train, B), C.batches(test, B)


def _block_kind(name: str) -> str:
    if "lm_head" in name:
        return "lm_head"
    if ".layers.0." in name:
        return "layer0"
    return "other_layer"


# ---------------------------------------------------------------------- workers
class _FromRootTimer:
    """Wraps ``LowRankFactor.from_root`` (the low-rank compression of a root) to time it."""

    def __init__(self) -> None:
        from laplace_lora_ext.lowrank import LowRankFactor

        self.cls = LowRankFactor
        self.orig = LowRankFactor.__dict__["from_root"]
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.calls = 0
        self.max_root_shape: tuple[int, ...] = ()

    def __enter__(self) -> _FromRootTimer:
        orig = self.orig.__func__
        timer = self

        def from_root(cls, R, *a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return orig(cls, R, *a, **k)
            finally:
                timer.seconds += time.perf_counter() - t0
                timer.cpu_seconds += time.process_time() - c0
                timer.calls += 1
                if R.numel() > math.prod(timer.max_root_shape or (0,)):
                    timer.max_root_shape = tuple(R.shape)

        self.cls.from_root = classmethod(from_root)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cls.from_root = self.orig

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "calls": self.calls,
            "largest_root_shape": list(self.max_root_shape),
        }


def _fwdbwd(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    with C.PeakMeter() as m:
        for b in batches:
            C.forward_backward(model, b)
    return m.as_dict()


def worker_ours(args: dict[str, Any]) -> dict[str, Any]:
    from laplace import Laplace

    import laplace_lora_ext  # noqa: F401  (registers subset_of_weights="lora")

    t0 = time.perf_counter()
    model, _, _ = _build(args)
    loader, test = _data(args)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0}
    train_batches = list(loader)

    C.forward_backward(model, train_batches[0])  # warm-up (first-call overheads)
    out["fwdbwd_1"] = _fwdbwd(model, train_batches)

    def make(fisher_type: str) -> Any:
        return Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
            factor_rank=args["factor_rank"],
            fisher_type=fisher_type,
            kfac_approx=args["kfac_approx"],
        )

    la = make(args["fisher_type"])
    with _FromRootTimer() as tr, C.PeakMeter() as m:
        la.fit(loader)
    out["fit"] = m.as_dict()
    out["fit_lowrank_compression"] = tr.as_dict()
    out["n_params"] = la.n_params
    out["fwdbwd_2"] = _fwdbwd(model, train_batches)
    if args["also_mc"] and args["fisher_type"] != "mc":
        la_mc = make("mc")
        with _FromRootTimer() as tr, C.PeakMeter() as m:
            la_mc.fit(loader)
        out["fit_mc"] = m.as_dict()
        out["fit_mc_lowrank_compression"] = tr.as_dict()
        del la_mc
        out["fwdbwd_3"] = _fwdbwd(model, train_batches)
    keys = [k for k in ("fwdbwd_1", "fwdbwd_2", "fwdbwd_3") if k in out]
    out["fwdbwd"] = {
        f: sum(out[k][f] for k in keys) / len(keys) for f in ("seconds", "cpu_seconds")
    }
    out["fwdbwd"]["peak_delta_bytes"] = max(out[k]["peak_delta_bytes"] for k in keys)

    out["storage"] = C.kron_storage(la.H_facs, la.lora_param_names)
    out["dense_bytes"] = [sum(d * d for d in p.shape) * 4 for p in la.params]
    out["posterior_eig_bytes"] = sum(
        t.numel() * t.element_size() for Qs in la.H.eigenvectors for t in Qs
    ) + sum(t.numel() * t.element_size() for ls in la.H.eigenvalues for t in ls)
    out.update(_prior_and_predictive(la, test, args["marglik_steps"]))
    if args["watch"]:
        gc.collect()
        first = {k: v[: args["batch"]] for k, v in loader.dataset.batch.items()}
        out["watch"] = _largest_tensors(la, C.make_loader(first, args["batch"]), test[0])
    return out


def _prior_and_predictive(la: Any, test: list[dict[str, torch.Tensor]], steps: int) -> dict:
    """Time / memory of the marglik prior fit, the GLM predictive over ``test`` and one
    MC-link prediction."""
    out: dict[str, Any] = {}
    with C.PeakMeter() as m:
        la.optimize_prior_precision(method="marglik", pred_type="glm", n_steps=steps)
    out["marglik"] = m.as_dict()
    out["prior_precision"] = la.prior_precision.detach().reshape(-1).tolist()

    la.predictive_moments(test[0])  # warm-up
    with C.PeakMeter() as m:
        fvars = []
        for b in test:
            _, f_var = la.predictive_moments(b)
            fvars.append(f_var)
    out["predictive"] = m.as_dict()
    out["f_var_mean_diag"] = float(torch.cat([v.diagonal(dim1=-2, dim2=-1) for v in fvars]).mean())
    with C.PeakMeter() as m:
        probs = la(
            test[0], link_approx="mc", n_samples=100, generator=torch.Generator().manual_seed(0)
        )
    out["predict_mc_batch"] = m.as_dict()
    out["probs_finite"] = bool(torch.isfinite(probs).all())
    return out


def _largest_tensors(la: Any, loader: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The largest tensor any ATen op outputs during one ``fit`` and one predictive batch,
    and every tensor with two dimensions above 2048."""
    watch = C.LargestTensorWatch(square_side=2048)
    with watch:
        la.fit(loader)
        la.predictive_moments(batch)
    return {
        "max_numel": watch.max_numel,
        "max_shape": list(watch.max_shape),
        "max_op": watch.max_op,
        "square_hits": watch.square_hits,
    }


def worker_stock_jacobians(args: dict[str, Any]) -> dict[str, Any]:
    """What stock laplace-torch's ``_glm_predictive_distribution`` does first: the full
    ``(B, C, P)`` Jacobian via ``torch.func.jacrev`` (``CurvatureInterface.jacobians``)."""
    from laplace.curvature import CurvlinopsGGN

    model, _, _ = _build(args)
    _, test = _data(args)
    backend = CurvlinopsGGN(model, "classification")
    x = {k: v for k, v in test[0].items() if k != "labels"}
    out: dict[str, Any] = {"n_params": sum(p.numel() for p in backend.params)}
    C.forward_backward(model, test[0])  # warm-up like ours
    with C.PeakMeter() as m:
        for b in test:
            x = {k: v for k, v in b.items() if k != "labels"}
            Js, f = backend.jacobians(x)
    out["jacobians"] = m.as_dict()
    out["jacobians_per_batch_s"] = m.seconds / len(test)
    out["Js_shape"] = list(Js.shape)
    out["Js_bytes"] = Js.numel() * Js.element_size()
    return out


def worker_stock_dense_init(args: dict[str, Any]) -> dict[str, Any]:
    """Memory of stock ``KronLaplace``'s dense factor initialisation at these shapes, and
    one measured dense ``eigh`` (side ``eigh_side``) to extrapolate decomposition time."""
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    model, _, _ = _build(args)
    out: dict[str, Any] = {}
    try:
        with C.PeakMeter() as m:
            la = Laplace(
                model,
                "classification",
                subset_of_weights="all",
                hessian_structure="kron",
                backend=CurvlinopsGGN,
            )
        out["init"] = m.as_dict()
        out["init_factor_shapes"] = [[list(f.shape) for f in F] for F in la.H.kfacs]
        del la
    except Exception as exc:  # e.g. MemoryError
        out["init_error"] = f"{type(exc).__name__}: {exc}"[:500]
    gc.collect()
    side = args["eigh_side"]
    g = torch.Generator().manual_seed(0)
    X = torch.randn(side, side // 2, generator=g)
    M = X @ X.T
    torch.linalg.eigh(M[:256, :256])
    with C.PeakMeter() as m:
        torch.linalg.eigh(M)
    out["eigh"] = {"side": side, **m.as_dict()}
    return out


def worker_compress(args: dict[str, Any]) -> dict[str, Any]:
    """CPU time of ``LowRankFactor.from_root`` on a (4096, m) root (m = rows of one batch's
    factor root: tokens for A, tokens x C for G with the exact Fisher, expand), and whether
    a 4096 x 4096 tensor is created (m > d takes the Gram + eigh path)."""
    from laplace_lora_ext.lowrank import LowRankFactor

    out: dict[str, Any] = {"d": 4096, "k": args["factor_rank"], "rows": {}}
    g = torch.Generator().manual_seed(0)
    LowRankFactor.from_root(torch.randn(4096, 64, generator=g), args["factor_rank"])
    for m in args["compress_rows"]:
        R = torch.randn(4096, m, generator=g)
        with C.PeakMeter() as pm:
            LowRankFactor.from_root(R, args["factor_rank"])
        row = {
            "cpu_seconds": pm.cpu_seconds,
            "seconds": pm.seconds,
            "peak_delta_bytes": pm.peak_delta,
        }
        if m in args["compress_watch"]:
            w = C.LargestTensorWatch(square_side=2048)
            with w:
                LowRankFactor.from_root(R, args["factor_rank"])
            row["dxd_tensors"] = [h for h in w.square_hits if "(4096, 4096)" in h]
        out["rows"][str(m)] = row
        del R
    return out


WORKERS = {
    "compress": worker_compress,
    "ours": worker_ours,
    "stock_jacobians": worker_stock_jacobians,
    "stock_dense_init": worker_stock_dense_init,
}


# ---------------------------------------------------------------------- summary (pure)
VOCAB_SQUARED = SHAPE["vocab"] ** 2
BAR_STORAGE_BYTES = 100e6  # (a) all factors at 32 layers + lm_head
BAR_FIT_RATIO = 2.0  # (b) fit / fwd+bwd, CPU time


def summarize(runs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every number of the report and its pass/fail checks (``res["bars"]``), from the
    workers' results alone (``runs`` and ``args`` as stored in ``results/bench_scale.json``)."""
    res: dict[str, Any] = {}
    ours = runs.get(f"ours_L{max(args.layers)}", {})
    if ours.get("ok"):
        res["storage"] = _storage_summary(ours)
        w = ours.get("watch")
        if w:
            res["watch"] = {**w, "ok": not w["square_hits"] and w["max_numel"] < VOCAB_SQUARED}
    res["time"] = {
        f"L{L}": _time_summary(runs[f"ours_L{L}"], args)
        for L in args.layers
        if runs.get(f"ours_L{L}", {}).get("ok")
    }
    res["stock"] = _stock_summary(runs, args, res.get("storage", {}))
    cs = _compression_summary(runs, args, res["time"])
    if cs is not None:
        res["compression_scaling"] = cs
    res["bars"] = _bars(res, args)
    return res


def _storage_summary(ours: dict[str, Any]) -> dict[str, Any]:
    per = {"layer0": 0, "lm_head": 0}
    dense = {"layer0": 0, "lm_head": 0}
    max_numel = 0
    for row, db in zip(ours["storage"], ours["dense_bytes"], strict=True):
        kind = _block_kind(row["name"])
        if kind in per:
            per[kind] += row["bytes"]
            dense[kind] += db
        max_numel = max(max_numel, row["max_numel"])
    ext = FULL_DEPTH * per["layer0"] + per["lm_head"]
    ext_dense = FULL_DEPTH * dense["layer0"] + dense["lm_head"]
    return {
        "per_layer_bytes": per["layer0"],
        "lm_head_bytes": per["lm_head"],
        "extrapolated_32_layers_bytes": ext,
        "dense_per_layer_bytes": dense["layer0"],
        "dense_lm_head_bytes": dense["lm_head"],
        "dense_extrapolated_32_layers_bytes": ext_dense,
        "ratio_dense_over_ours": ext_dense / ext,
        "bar_bytes": BAR_STORAGE_BYTES,
        "meets_bar": ext <= BAR_STORAGE_BYTES,
        "largest_stored_tensor_numel": max_numel,
        "no_vocab_squared_tensor_stored": max_numel < VOCAB_SQUARED,
    }


def _time_summary(r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    nb, nt = args.train_batches, args.test_batches
    fb, fbw = r["fwdbwd"]["cpu_seconds"], r["fwdbwd"]["seconds"]
    d = {
        "n_lora_params": r["n_params"],
        "fwdbwd_cpu_s": fb,
        "fwdbwd_wall_s": fbw,
        "fit_cpu_s": r["fit"]["cpu_seconds"],
        "fit_wall_s": r["fit"]["seconds"],
        "fit_ratio_cpu": r["fit"]["cpu_seconds"] / fb,
        "fit_ratio_wall": r["fit"]["seconds"] / fbw,
        "fit_lowrank_compression_cpu_s": r["fit_lowrank_compression"]["cpu_seconds"],
        "predictive_per_batch_cpu_s": r["predictive"]["cpu_seconds"] / nt,
        "predictive_per_batch_wall_s": r["predictive"]["seconds"] / nt,
        "predictive_ratio_cpu": (r["predictive"]["cpu_seconds"] / nt) / (fb / nb),
        "predictive_ratio_wall": (r["predictive"]["seconds"] / nt) / (fbw / nb),
        "fwdbwd_peak_delta": r["fwdbwd"]["peak_delta_bytes"],
        "fit_peak_delta": r["fit"]["peak_delta_bytes"],
        "predictive_peak_delta": r["predictive"]["peak_delta_bytes"],
        "marglik_cpu_s": r["marglik"]["cpu_seconds"],
        "mc_predict_batch_cpu_s": r["predict_mc_batch"]["cpu_seconds"],
    }
    if "fit_mc" in r:
        d["fit_mc_cpu_s"] = r["fit_mc"]["cpu_seconds"]
        d["fit_mc_ratio_cpu"] = r["fit_mc"]["cpu_seconds"] / fb
        d["fit_mc_ratio_wall"] = r["fit_mc"]["seconds"] / fbw
        d["fit_mc_lowrank_compression_cpu_s"] = r["fit_mc_lowrank_compression"]["cpu_seconds"]
    return d


def _stock_summary(
    runs: dict[str, Any], args: argparse.Namespace, storage: dict[str, Any]
) -> dict[str, Any]:
    stock: dict[str, Any] = {}
    nt = args.test_batches
    for L in args.layers:
        sj, ob = runs.get(f"stock_jac_L{L}", {}), runs.get(f"ours_L{L}", {})
        if not (sj.get("ok") and ob.get("ok")):
            continue
        d = {
            "jacobians_per_batch_cpu_s": sj["jacobians"]["cpu_seconds"] / nt,
            "jacobians_per_batch_wall_s": sj["jacobians"]["seconds"] / nt,
            "jacobians_peak_delta": sj["jacobians"]["peak_delta_bytes"],
            "Js_bytes": sj["Js_bytes"],
            "ours_predictive_per_batch_cpu_s": ob["predictive"]["cpu_seconds"] / nt,
            "ours_predictive_per_batch_wall_s": ob["predictive"]["seconds"] / nt,
            "ours_predictive_peak_delta": ob["predictive"]["peak_delta_bytes"],
        }
        d["time_ratio_stock_over_ours"] = (
            d["jacobians_per_batch_cpu_s"] / d["ours_predictive_per_batch_cpu_s"]
        )
        d["mem_ratio_stock_over_ours"] = d["jacobians_peak_delta"] / max(
            1, d["ours_predictive_peak_delta"]
        )
        stock[f"jac_L{L}"] = d
    if len(args.layers) >= 2 and all(f"jac_L{L}" in stock for L in args.layers[:2]):
        stock["extrapolated_32_layers"] = _extrapolate_stock(stock, args.layers[:2])
    stock["dense"] = _dense_stock_summary(runs.get("stock_dense_init", {}), storage)
    return stock


def _extrapolate_stock(stock: dict[str, Any], layers: list[int]) -> dict[str, float]:
    """Linear extrapolation in depth to 32 layers from two measured depths (rough)."""
    L1, L2 = layers
    a, b = stock[f"jac_L{L1}"], stock[f"jac_L{L2}"]

    def lin(key: str) -> float:
        slope = (b[key] - a[key]) / (L2 - L1)
        return b[key] + slope * (FULL_DEPTH - L2)

    return {
        "stock_jac_peak_32": lin("jacobians_peak_delta"),
        "ours_pred_peak_32": lin("ours_predictive_peak_delta"),
        "stock_jac_cpu_s_32": lin("jacobians_per_batch_cpu_s"),
        "ours_pred_cpu_s_32": lin("ours_predictive_per_batch_cpu_s"),
    }


N_SIDE_4096 = 4 * FULL_DEPTH + 1  # per layer: A of lora_A and G of lora_B (q, v); lm_head A


def _dense_stock_summary(di: dict[str, Any], storage: dict[str, Any]) -> dict[str, Any]:
    """Stock dense ``KronLaplace``: measured init memory, ``eigh`` time extrapolated
    (cubically) to the 4096- and 32000-sided factors."""
    d_info: dict[str, Any] = {
        "dense_factor_bytes_32_layers": storage.get("dense_extrapolated_32_layers_bytes"),
        "vocab_factor_bytes": VOCAB_SQUARED * 4,
    }
    if di.get("ok"):
        e = di["eigh"]
        t_side = e["cpu_seconds"]
        est_4096 = t_side * (4096 / e["side"]) ** 3
        est_32000 = t_side * (32000 / e["side"]) ** 3
        d_info.update(
            {
                "init_peak_delta": di.get("init", {}).get("peak_delta_bytes"),
                "init_error": di.get("init_error"),
                "eigh_side": e["side"],
                "eigh_cpu_s": t_side,
                "eigh_peak_delta": e["peak_delta_bytes"],
                "eigh_4096_est_cpu_s": est_4096,
                "eigh_32000_est_cpu_s": est_32000,
                "decompose_32_layers_est_cpu_s": N_SIDE_4096 * est_4096 + est_32000,
            }
        )
    return d_info


def _compression_summary(
    runs: dict[str, Any], args: argparse.Namespace, time_rows: dict[str, Any]
) -> dict[str, Any] | None:
    """(e) measured ``from_root`` times, projected per layer against fwd+bwd per token."""
    cp = runs.get("compress", {})
    if not (
        cp.get("ok")
        and len(args.layers) >= 2
        and all(f"L{L}" in time_rows for L in args.layers[:2])
    ):
        return None
    L1, L2 = args.layers[:2]
    t1, t2 = time_rows[f"L{L1}"], time_rows[f"L{L2}"]
    tokens = args.batch * args.seq * args.train_batches
    fb_layer_token = (t2["fwdbwd_cpu_s"] - t1["fwdbwd_cpu_s"]) / (L2 - L1) / tokens
    ms = sorted(int(m) for m in cp["rows"])
    ts = [cp["rows"][str(m)]["cpu_seconds"] for m in ms]
    n_cls = 2
    base_ratio = (t2["fit_cpu_s"] - t2["fit_lowrank_compression_cpu_s"]) / t2["fwdbwd_cpu_s"]
    proj = []
    for n_tok in args.project_tokens:
        # q and v: A rows n_tok, G rows C*n_tok
        comp = 2 * (_interpolate(ms, ts, n_tok) + _interpolate(ms, ts, n_cls * n_tok))
        fb = fb_layer_token * n_tok
        proj.append(
            {
                "tokens_per_batch": n_tok,
                "compression_cpu_s_per_layer": comp,
                "fwdbwd_cpu_s_per_layer": fb,
                "compression_over_fwdbwd": comp / fb,
                "projected_fit_ratio": base_ratio + comp / fb,
            }
        )
    return {
        "from_root": cp["rows"],
        "fwdbwd_cpu_s_per_layer_token": fb_layer_token,
        "fit_ratio_without_compression": base_ratio,
        "projection": proj,
    }


def _interpolate(ms: list[int], ts: list[float], m: float) -> float:
    """Log-log interpolation of the measured times ``ts`` at root sizes ``ms`` (linear
    below the smallest, quadratic above the largest)."""
    if m <= ms[0]:
        return ts[0] * m / ms[0]
    for (a, ta), (b, tb) in zip(
        zip(ms, ts, strict=True), zip(ms[1:], ts[1:], strict=True), strict=False
    ):
        if m <= b:
            w = math.log(m / a) / math.log(b / a)
            return math.exp((1 - w) * math.log(max(ta, 1e-6)) + w * math.log(max(tb, 1e-6)))
    return ts[-1] * (m / ms[-1]) ** 2


def _bars(res: dict[str, Any], args: argparse.Namespace) -> dict[str, bool | None]:
    """Pass/fail of the issue's bars (``None``: not measured)."""
    st, w = res.get("storage"), res.get("watch")
    t = res["time"].get(f"L{max(args.layers)}")
    return {
        "storage_le_100MB": st["meets_bar"] if st else None,
        "no_factor_side_above_2048": w["ok"] if w else None,
        "fit_le_2x_fwdbwd": t["fit_ratio_cpu"] <= BAR_FIT_RATIO if t else None,
    }


# ---------------------------------------------------------------------- report (markdown)
def _met(ok: bool | None) -> str:
    return "met" if ok else "NOT met"


def render(res: dict[str, Any], runs: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown report of :func:`summarize`'s ``res`` (``runs`` for failure messages)."""
    lines = [
        f"# {NAME}: Laplace-LoRA at LLaMA-2-7B shapes (CPU, float32, reduced depth)",
        "",
        f"Random LlamaForCausalLM, hidden 4096, intermediate 11008, vocab 32000, 32 heads, "
        f"**{'/'.join(map(str, args.layers))} decoder layer(s)** instead of 32; "
        f"LoRA r={args.lora_r} "
        f"on q_proj, v_proj, lm_head; 2 choice tokens (LastTokenChoiceLM); "
        f"batch {args.batch} x {args.seq} tokens, {args.train_batches} fit batches, "
        f"{args.test_batches} predictive batches; {args.threads} CPU threads. "
        f"Ours: factor_rank={args.factor_rank}, fisher_type={args.fisher_type}, "
        f"kfac_approx={args.kfac_approx}. Peak memory = peak RSS minus RSS before the step, "
        "fresh subprocess per configuration (method in benchmarks/_common.py).",
        "",
    ]
    lines += _render_storage(res, args)
    lines += _render_time(res, runs, args)
    lines += _render_stock(res, runs, args)
    lines += _render_compression(res, args)
    return "\n".join(lines)


def _render_storage(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    s = res.get("storage")
    if not s:
        return []
    ext, ext_dense = s["extrapolated_32_layers_bytes"], s["dense_extrapolated_32_layers_bytes"]
    max_numel = s["largest_stored_tensor_numel"]
    lines = [
        "## (a) Kronecker-factor storage (bar: <= 100 MB at 32 layers + lm_head)",
        "",
        C.md_table(
            ["", f"ours (factor_rank={args.factor_rank})", "dense KFAC", "dense / ours"],
            [
                [
                    "per decoder layer (q, v: 4 LoRA matrices)",
                    C.fmt_bytes(s["per_layer_bytes"]),
                    C.fmt_bytes(s["dense_per_layer_bytes"]),
                    s["dense_per_layer_bytes"] / s["per_layer_bytes"],
                ],
                [
                    "lm_head (2 LoRA matrices)",
                    C.fmt_bytes(s["lm_head_bytes"]),
                    C.fmt_bytes(s["dense_lm_head_bytes"]),
                    s["dense_lm_head_bytes"] / s["lm_head_bytes"],
                ],
                [
                    "**32 layers + lm_head**",
                    f"**{ext / 1e6:.1f} MB**",
                    f"{ext_dense / 1e9:.2f} GB",
                    s["ratio_dense_over_ours"],
                ],
            ],
        ),
        "",
        f"Bar <= 100 MB: **{_met(res['bars']['storage_le_100MB'])}** ({ext / 1e6:.1f} MB). "
        f"Largest stored factor tensor: {max_numel:,} elements (32000^2 = {VOCAB_SQUARED:,}).",
        "",
    ]
    w = res.get("watch")
    if w:
        lines += [
            f"Dispatch-mode check over one fit batch + one predictive batch: largest tensor "
            f"produced by any op = {w['max_numel']:,} elements {tuple(w['max_shape'])} "
            f"({w['max_op']}); tensors with two dims > 2048: "
            f"{'none' if not w['square_hits'] else w['square_hits']}. "
            f"No d x d factor for d > 2048: **{'verified' if w['ok'] else 'VIOLATED'}**.",
            "",
        ]
    return lines


def _render_time(res: dict[str, Any], runs: dict[str, Any], args: argparse.Namespace) -> list[str]:
    rows = []
    for L in args.layers:
        d = res["time"].get(f"L{L}")
        if d is None:
            err = runs.get(f"ours_L{L}", {}).get("error", "?")
            rows.append([f"{L}", "failed: " + err[:200]] + [""] * 7)
            continue
        rows.append(
            [
                f"{L}",
                f"{d['n_lora_params']:,}",
                f"{d['fwdbwd_cpu_s']:.1f} s",
                f"{d['fit_cpu_s']:.1f} s (**{d['fit_ratio_cpu']:.2f}x**; "
                f"wall {d['fit_ratio_wall']:.2f}x)",
                (
                    f"{d['fit_mc_cpu_s']:.1f} s ({d['fit_mc_ratio_cpu']:.2f}x; "
                    f"wall {d['fit_mc_ratio_wall']:.2f}x)"
                    if "fit_mc_cpu_s" in d
                    else "-"
                ),
                f"{d['fit_lowrank_compression_cpu_s']:.1f} s",
                f"{d['predictive_per_batch_cpu_s']:.2f} s (**{d['predictive_ratio_cpu']:.2f}x**; "
                f"wall {d['predictive_ratio_wall']:.2f}x)",
                C.fmt_bytes(d["fwdbwd_peak_delta"]),
                C.fmt_bytes(d["fit_peak_delta"]),
                C.fmt_bytes(d["predictive_peak_delta"]),
            ]
        )
    lines = [
        "## (b) fit time and (c) GLM predictive vs a plain forward+backward",
        "",
        "Times are CPU seconds of the worker process (the 2-core machine was shared with other "
        "jobs, so CPU time is the primary measure; wall-clock ratios are given too). "
        "fwd+bwd = forward + backward of the summed CE loss over the fit batches (mean of "
        "repeated passes around the fits). Ratios: fit / fwd+bwd over the same batches; "
        "predictive per batch / fwd+bwd per batch. Bar (b): fit <= 2x. "
        "'low-rank compression' = time inside `LowRankFactor.from_root` during the exact fit.",
        "",
        C.md_table(
            [
                "layers",
                "LoRA params",
                "fwd+bwd",
                f"ours fit ({args.fisher_type} Fisher)",
                "ours fit (mc Fisher)",
                "low-rank compression",
                "ours GLM predictive / batch",
                "peak fwd+bwd",
                "peak fit",
                "peak predictive",
            ],
            rows,
        ),
        "",
    ]
    deepest = max(args.layers)
    t = res["time"].get(f"L{deepest}")
    if t:
        lines += [
            f"At {deepest} layer(s): fit/fwd+bwd = **{t['fit_ratio_cpu']:.2f}x** CPU "
            f"({t['fit_ratio_wall']:.2f}x wall); bar <= 2x: "
            f"**{_met(res['bars']['fit_le_2x_fwdbwd'])}**"
            + (f" (mc Fisher: {t['fit_mc_ratio_cpu']:.2f}x)" if "fit_mc_ratio_cpu" in t else "")
            + f". Of the fit, {t['fit_lowrank_compression_cpu_s']:.1f} s CPU "
            f"({100 * t['fit_lowrank_compression_cpu_s'] / t['fit_cpu_s']:.0f}%) is low-rank "
            "compression (QR + SVD in `LowRankFactor.from_root`). "
            "GLM predictive / fwd+bwd per batch = "
            f"**{t['predictive_ratio_cpu']:.2f}x** CPU; predictive peak "
            f"{C.fmt_bytes(t['predictive_peak_delta'])} vs {C.fmt_bytes(t['fwdbwd_peak_delta'])} "
            f"for fwd+bwd. Marglik prior ({args.marglik_steps} steps): {t['marglik_cpu_s']:.2f} s; "
            "probabilities with link_approx='mc' (100 samples): "
            f"{t['mc_predict_batch_cpu_s']:.2f} s "
            "per batch.",
            "",
        ]
    return lines


def _render_stock(res: dict[str, Any], runs: dict[str, Any], args: argparse.Namespace) -> list[str]:
    stock = res["stock"]
    rows = []
    for L in args.layers:
        d = stock.get(f"jac_L{L}")
        if d is None:
            sj, ob = runs.get(f"stock_jac_L{L}", {}), runs.get(f"ours_L{L}", {})
            err = sj.get("error") or ob.get("error") or "not run"
            rows.append([f"{L}", "failed: " + err[:300]] + [""] * 6)
            continue
        rows.append(
            [
                f"{L}",
                f"{d['jacobians_per_batch_cpu_s']:.2f} s",
                C.fmt_bytes(d["jacobians_peak_delta"]),
                C.fmt_bytes(d["Js_bytes"]),
                f"{d['ours_predictive_per_batch_cpu_s']:.2f} s",
                C.fmt_bytes(d["ours_predictive_peak_delta"]),
                d["time_ratio_stock_over_ours"],
                d["mem_ratio_stock_over_ours"],
            ]
        )
    lines = [
        "## (d) stock laplace-torch 0.3 at these shapes",
        "",
        "GLM predictive: stock `_glm_predictive_distribution` first builds the full Jacobian "
        "(B, C, P) with `torch.func.jacrev` (`CurvatureInterface.jacobians`); only that step is "
        "run here (its variance step needs the dense posterior, see below), so the stock "
        "numbers are lower bounds. Ours = the whole predictive (mean and covariance).",
        "",
        C.md_table(
            [
                "layers",
                "stock jacrev / batch (CPU)",
                "stock peak",
                "its (B,C,P) Jacobian",
                "ours predictive / batch (CPU)",
                "ours peak",
                "time stock/ours",
                "memory stock/ours",
            ],
            rows,
        ),
        "",
    ]
    ext = stock.get("extrapolated_32_layers")
    if ext:
        L1, L2 = args.layers[:2]
        lines += [
            f"Linear extrapolation in depth to 32 layers (from {L1} and {L2} layers; rough): "
            f"stock Jacobians ~{C.fmt_bytes(ext['stock_jac_peak_32'])} and "
            f"~{ext['stock_jac_cpu_s_32']:.0f} CPU s per batch; ours (whole predictive) "
            f"~{C.fmt_bytes(ext['ours_pred_peak_32'])} and ~{ext['ours_pred_cpu_s_32']:.0f} CPU s.",
            "",
        ]
    return lines + _render_dense_stock(stock["dense"], runs.get("stock_dense_init", {}), args)


def _render_dense_stock(
    d_info: dict[str, Any], di: dict[str, Any], args: argparse.Namespace
) -> list[str]:
    if not di.get("ok"):
        return [f"Stock dense init run failed: {di.get('error', 'not run')[:500]}", ""]
    dense_bytes_32 = d_info["dense_factor_bytes_32_layers"]
    return [
        "Dense stock `KronLaplace` (`subset_of_weights='all'`, only LoRA trainable, "
        "`CurvlinopsGGN`): constructing it (`Kron.init_from_model`) alone allocated "
        f"**{C.fmt_bytes(d_info['init_peak_delta'])}** at {min(args.layers)} layer(s) "
        f"(the lm_head lora_B output factor is 32000 x 32000 = {C.fmt_bytes(VOCAB_SQUARED * 4)} "
        "in float32)"
        + (f"; error: {d_info['init_error']}" if d_info["init_error"] else "")
        + ". Analytically its dense factors at 32 layers + lm_head take "
        f"**{(dense_bytes_32 or float('nan')) / 1e9:.2f} GB** (the eigenvectors after "
        f"`decompose` as much again). A measured dense `eigh` of side {d_info['eigh_side']} took "
        f"{d_info['eigh_cpu_s']:.1f} CPU s here; cubic extrapolation: "
        f"~{d_info['eigh_4096_est_cpu_s']:.0f} s per 4096-side factor "
        f"({N_SIDE_4096} of them) and ~{d_info['eigh_32000_est_cpu_s'] / 3600:.1f} h for the "
        f"32000-side factor, ~{d_info['decompose_32_layers_est_cpu_s'] / 3600:.1f} h in all to "
        "decompose. Not attempted.",
        "",
    ]


def _render_compression(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    cs = res.get("compression_scaling")
    if not cs:
        return []
    cp_rows = cs["from_root"]
    ms = sorted(int(m) for m in cp_rows)
    rows = [[f"{m:,}", *_compression_cells(cp_rows[str(m)])] for m in ms]
    prow = [
        [
            f"{p['tokens_per_batch']:,}",
            f"{p['compression_cpu_s_per_layer']:.2f} s",
            f"{p['fwdbwd_cpu_s_per_layer']:.2f} s",
            p["compression_over_fwdbwd"],
            f"**{p['projected_fit_ratio']:.2f}x**",
        ]
        for p in cs["projection"]
    ]
    return [
        "## (e) cost of the low-rank compression vs tokens per batch",
        "",
        f"`LowRankFactor.from_root` on a random (4096, m) root, factor_rank={args.factor_rank} "
        "(columns merged in chunks of at most max(256, 2 × rank): a thin QR of [current root, "
        "chunk] and an eigh of its small triangle's Gram, truncated back to the rank):",
        "",
        C.md_table(
            ["root rows m", "CPU time", "peak memory", "creates a 4096 x 4096 tensor"], rows
        ),
        "",
        "Projection per decoder layer (q and v adapters; exact Fisher with C=2, expand: the "
        "lora_A input factor gets one root row per token, the lora_B output factor C rows "
        f"per token) against the measured fwd+bwd cost per token and layer "
        f"({1000 * cs['fwdbwd_cpu_s_per_layer_token']:.2f} ms); projected fit ratio = measured "
        f"fit ratio without compression ({cs['fit_ratio_without_compression']:.2f}x) + "
        "compression / fwd+bwd:",
        "",
        C.md_table(
            [
                "tokens per batch",
                "compression / layer",
                "fwd+bwd / layer",
                "compression / fwd+bwd",
                "projected fit / fwd+bwd",
            ],
            prow,
        ),
        "",
    ]


def _compression_cells(row: dict[str, Any]) -> list[str]:
    if row.get("dxd_tensors"):
        made = "yes: " + ", ".join(row["dxd_tensors"][:2])
    elif "dxd_tensors" in row:
        made = "no"
    else:
        made = "not checked (m = d: its Q and triangle are d x d by construction)"
    return [f"{row['cpu_seconds']:.2f} s", C.fmt_bytes(row["peak_delta_bytes"]), made]


def plot(res: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    st, cs = res.get("storage"), res.get("compression_scaling")
    if not st:
        return False
    fig, ax = plt.subplots(1, 2 if cs else 1, figsize=(10 if cs else 5, 3.8), squeeze=False)
    a = ax[0][0]
    labels = ["per layer", "lm_head", "32 layers\n+ lm_head"]
    ours = [st["per_layer_bytes"], st["lm_head_bytes"], st["extrapolated_32_layers_bytes"]]
    dense = [
        st["dense_per_layer_bytes"],
        st["dense_lm_head_bytes"],
        st["dense_extrapolated_32_layers_bytes"],
    ]
    xs = range(len(labels))
    a.bar([x - 0.2 for x in xs], [v / 1e6 for v in dense], 0.4, label="dense KFAC")
    a.bar([x + 0.2 for x in xs], [v / 1e6 for v in ours], 0.4, label="ours, factor_rank=32")
    a.axhline(100, color="red", ls="--", lw=1, label="100 MB bar")
    a.set_yscale("log")
    a.set_xticks(list(xs))
    a.set_xticklabels(labels)
    a.set_ylabel("factor storage (MB)")
    a.legend(fontsize=7)
    if cs:
        b = ax[0][1]
        pr = cs["projection"]
        b.plot(
            [p["tokens_per_batch"] for p in pr],
            [p["projected_fit_ratio"] for p in pr],
            "o-",
            label="projected fit / fwd+bwd",
        )
        b.axhline(2, color="red", ls="--", lw=1, label="2x bar")
        b.set_xscale("log", base=2)
        b.set_xlabel("tokens per batch (LLaMA-7B layer shapes)")
        b.set_ylabel("ratio")
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    if C.worker_main(WORKERS):
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="decoder depths to run (reduced from 32 to fit CPU time)",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--train-batches", type=int, default=3)
    p.add_argument("--test-batches", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--factor-rank", type=int, default=32)
    p.add_argument("--fisher-type", default="exact", choices=["exact", "mc", "empirical"])
    p.add_argument("--kfac-approx", default="expand", choices=["expand", "reduce"])
    p.add_argument("--marglik-steps", type=int, default=100)
    p.add_argument("--eigh-side", type=int, default=2048, help="side of the measured dense eigh")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (1: robust timing on a shared 2-core machine)",
    )
    p.add_argument("--no-mc", action="store_true", help="skip the extra mc-Fisher fit")
    p.add_argument(
        "--compress-rows",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 2048, 4096, 8192],
        help="root sizes m for the low-rank compression micro-benchmark (empty: skip)",
    )
    p.add_argument("--project-tokens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--no-watch", action="store_true", help="skip the dispatch-mode tensor check")
    args = p.parse_args()
    args.layers = sorted(args.layers)

    base = dict(
        batch=args.batch,
        seq=args.seq,
        train_batches=args.train_batches,
        test_batches=args.test_batches,
        lora_r=args.lora_r,
        factor_rank=args.factor_rank,
        fisher_type=args.fisher_type,
        kfac_approx=args.kfac_approx,
        threads=args.threads,
        seed=args.seed,
        marglik_steps=args.marglik_steps,
        eigh_side=args.eigh_side,
        also_mc=not args.no_mc,
        compress_rows=args.compress_rows,
        compress_watch=[m for m in args.compress_rows if m != 4096],
    )
    runs: dict[str, Any] = {}
    t_start = time.perf_counter()
    for L in args.layers:
        watch = (L == max(args.layers)) and not args.no_watch
        print(f"[{NAME}] ours, {L} layer(s) ...", flush=True)
        runs[f"ours_L{L}"] = C.run_worker(MODULE, "ours", {**base, "layers": L, "watch": watch})
        if not args.skip_stock:
            print(f"[{NAME}] stock jacrev Jacobians, {L} layer(s) ...", flush=True)
            runs[f"stock_jac_L{L}"] = C.run_worker(MODULE, "stock_jacobians", {**base, "layers": L})
    if args.compress_rows:
        print(f"[{NAME}] low-rank compression micro-benchmark ...", flush=True)
        runs["compress"] = C.run_worker(MODULE, "compress", base)
    if not args.skip_stock:
        print(f"[{NAME}] stock dense KronLaplace init ...", flush=True)
        runs["stock_dense_init"] = C.run_worker(
            MODULE, "stock_dense_init", {**base, "layers": min(args.layers)}
        )
    for k, v in runs.items():
        if not v.get("ok"):
            print(f"[{NAME}] {k} FAILED: {v.get('error', '')[:1000]}", flush=True)
    res = summarize(runs, args)
    md = render(res, runs, args)
    png = C.RESULTS_DIR / f"{NAME}.png"
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if plot(res, str(png)):
        md += f"\n![storage and projected fit ratio]({png.name})\n"
    md += f"\nTotal benchmark wall time: {time.perf_counter() - t_start:.0f} s.\n"
    C.publish(NAME, args, res, runs, md)


if __name__ == "__main__":
    main()
