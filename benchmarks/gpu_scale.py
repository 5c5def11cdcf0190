"""Laplace-LoRA at full LLaMA-2-7B depth on CUDA: fit, marglik prior, GLM predictive.

Self-contained (torch, transformers, peft, laplace-torch, this package; bitsandbytes for
the nf4 case) and short: run it as soon as a GPU is available,

    python -m benchmarks.gpu_scale                 # CUDA: 32 layers, bf16 and nf4 bases
    python -m benchmarks.gpu_scale --tiny          # CPU smoke test, seconds (tests run it)

Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` with LLaMA-2-7B shapes (hidden 4096,
intermediate 11008, 32 layers, 32 heads, vocab 32000) and random weights; the base in
bfloat16 (``--bases bf16``) or quantized to nf4 with bitsandbytes (``nf4``, bf16 compute);
LoRA r=8 (alpha 16) on ``q_proj``, ``v_proj`` and ``lm_head`` with ``lora_B`` moved off zero
(a "trained" adapter); read through ``LastTokenChoiceLM`` with 2 answer tokens. Curvature in
float32 (the package's default for a bf16 model), ``factor_rank="auto"`` (the default).

For each base: time and peak GPU memory of (1) a plain forward+backward of the summed
cross-entropy over the fit batches, (2) ``la.fit``, (3) ``optimize_prior_precision(
method="marglik")``, (4) the GLM predictive (mean and covariance) and probabilities with
``link_approx="mc"``; the model's own footprint (parameters and buffers), the posterior's
bytes (factors + mean), and a check that every factor side above 2048 is low-rank.
Where two GPUs exist, also a 2-rank NCCL fit (``torch.distributed``, ``DistributedSampler``),
its time and its agreement with the single-GPU fit.

Writes ``benchmarks/results/gpu_scale_<gpu>_<date>.json`` and ``.md`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"

LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)
TINY = dict(hidden=64, intermediate=96, layers=2, heads=4, vocab=3000)  # vocab > 2048
CHOICES = 2


# ---------------------------------------------------------------------- device helpers
class Meter:
    """Wall time (synchronised) and peak memory of a block: CUDA allocator peak on a GPU,
    the process's peak RSS growth on a CPU (``/proc/self/status``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Meter:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss("VmRSS")
            _reset_rss_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _rss("VmHWM")
        self.extra = max(0, self.peak - self.base)

    def as_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds, "peak_bytes": self.peak, "extra_bytes": self.extra}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()})"


# ---------------------------------------------------------------------- model and data
def _quantize_nf4_(model: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Replace every ``nn.Linear`` of the decoder layers by a bitsandbytes nf4 ``Linear4bit``
    (in place, before LoRA is added); ``lm_head`` stays bf16, as with ``from_pretrained``."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    device="meta",
                )
                weight = child.weight.data.to("cpu")
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q.to(device))  # quantizes on the move
                del child, weight


def build_model(shape: dict[str, int], base: str, device: torch.device, seed: int) -> nn.Module:
    """Random-weight Llama with LoRA r=8 on q, v, lm_head, wrapped for 2 answer tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from laplace_lora_ext import LastTokenChoiceLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    if base == "nf4":
        _quantize_nf4_(model, device, torch.bfloat16)
    elif base != "bf16":
        raise ValueError(f"base must be 'bf16' or 'nf4', got {base!r}.")
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]
    )
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
    vocab = shape["vocab"]
    ids = [7 + i * (vocab // (CHOICES + 1)) for i in range(CHOICES)]
    return LastTokenChoiceLM(peft_model, ids).eval()


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def make_data(n: int, seq: int, vocab: int, seed: int) -> _Dataset:
    g = torch.Generator().manual_seed(seed)
    return _Dataset(
        {
            "input_ids": torch.randint(3, vocab, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "labels": torch.randint(0, CHOICES, (n,), generator=g),
        }
    )


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def model_bytes(model: nn.Module) -> int:
    """Parameters and buffers as stored (4-bit codes as uint8, plus their scales)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
    return total


def posterior_bytes(la: Any) -> dict[str, Any]:
    """Bytes of the fitted factors and the mean; sides above 2048 must be low-rank."""
    from laplace_lora_ext.lowrank import LowRankFactor

    factors, dense_above = 0, []
    for F in la.H_facs.kfacs:
        for f in F:
            if isinstance(f, LowRankFactor):
                factors += sum(t.numel() * t.element_size() for t in f.stored_tensors())
            else:
                factors += f.numel() * f.element_size()
                if len(f) > 2048:
                    dense_above.append(len(f))
    mean = la.mean.numel() * la.mean.element_size()
    total = factors + mean
    return {
        "factors": factors,
        "mean": mean,
        "total": total,
        "bar_1GB_met": total <= 1e9,  # issue bar: the fitted posterior takes <= 1 GB
        "dense_above": dense_above,
    }


# ---------------------------------------------------------------------- one base
def run_base(base: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from laplace import Laplace

    import laplace_lora_ext  # noqa: F401

    shape = TINY if args.tiny else LLAMA2_7B
    t0 = time.perf_counter()
    model = build_model(shape, base, device, args.seed)
    out: dict[str, Any] = {"base": base, "build_seconds": time.perf_counter() - t0}
    out["model_bytes"] = model_bytes(model)
    train = make_data(args.batch * args.fit_batches, args.seq, shape["vocab"], seed=1)
    test = make_data(args.batch * args.test_batches, args.seq, shape["vocab"], seed=2)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch)
    test_batches = [_to(b, device) for b in torch.utils.data.DataLoader(test, args.batch)]

    def fwd_bwd() -> None:
        for b in loader:
            b = _to(b, device)
            labels = b.pop("labels")
            logits = model(b).float()
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    fwd_bwd()  # warm-up (kernels, allocator)
    out["fwd_bwd"] = _measure(device, fwd_bwd)
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    out["n_lora_params"] = la.n_params
    out["fit"] = _measure(device, lambda: la.fit(loader))
    out["posterior"] = posterior_bytes(la)
    out["log_marglik_at_prior_1"] = float(la.log_marginal_likelihood())
    out["marglik"] = _measure(
        device, lambda: la.optimize_prior_precision(method="marglik", n_steps=args.marglik_steps)
    )
    out["prior_precision"] = la.prior_precision.reshape(-1).tolist()

    def predictive() -> None:
        for b in test_batches:
            la.predictive_moments(b)

    predictive()  # warm-up
    out["glm_predictive"] = _measure(device, predictive)
    gen = torch.Generator(device=device).manual_seed(0)
    out["mc_probs"] = _measure(
        device,
        lambda: [
            la(b, link_approx="mc", n_samples=args.mc_samples, generator=gen) for b in test_batches
        ],
    )
    fb = out["fwd_bwd"]["seconds"]
    out["ratios"] = {
        "fit_vs_fwd_bwd": out["fit"]["seconds"] / fb,
        "glm_predictive_per_batch_vs_fwd_bwd_per_batch": (
            out["glm_predictive"]["seconds"] / args.test_batches
        )
        / (fb / args.fit_batches),
        "fit_peak_vs_model": out["fit"]["peak_bytes"] / out["model_bytes"],
        "predictive_peak_vs_model": out["glm_predictive"]["peak_bytes"] / out["model_bytes"],
    }
    return out


def _measure(device: torch.device, fn: Callable[[], Any]) -> dict[str, float]:
    with Meter(device) as m:
        fn()
    return m.as_dict()


# ---------------------------------------------------------------------- 2-rank NCCL
def _distributed_worker(rank: int, world: int, args: argparse.Namespace, port: int, q: Any) -> None:
    from laplace import Laplace
    from torch.utils.data.distributed import DistributedSampler

    import laplace_lora_ext  # noqa: F401

    backend = "nccl" if torch.cuda.is_available() and not args.gloo else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    try:
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        shape = TINY if args.tiny else LLAMA2_7B
        model = build_model(shape, "bf16", device, args.seed)
        train = make_data(args.batch * args.fit_batches, args.seq, shape["vocab"], seed=1)
        sampler = DistributedSampler(train, world, rank, shuffle=False)
        loader = torch.utils.data.DataLoader(train, batch_size=args.batch, sampler=sampler)
        la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
        fit = _measure(device, lambda: la.fit(loader))
        q.put(
            {
                "rank": rank,
                "backend": backend,
                "fit": fit,
                "log_marglik_at_prior_1": float(la.log_marginal_likelihood()),
            }
        )
    finally:
        torch.distributed.destroy_process_group()


def run_distributed(args: argparse.Namespace) -> dict[str, Any]:
    """2-rank fit in spawned processes (NCCL on 2 GPUs; gloo on CPU with ``--gloo``)."""
    import socket

    ctx = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_distributed_worker, args=(r, 2, args, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        return {"ok": False, "error": f"exit codes {[p.exitcode for p in procs]}"}
    ranks = sorted((q.get() for _ in procs), key=lambda r: r["rank"])
    return {"ok": True, "ranks": ranks}


# ---------------------------------------------------------------------- report
def _gb(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def render(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = [
        f"# gpu_scale: Laplace-LoRA at {'tiny (smoke test)' if a['tiny'] else 'LLaMA-2-7B'} "
        f"shapes on {res['gpu']} ({res['date']})",
        "",
        f"{res['shape']}; LoRA r=8 on q_proj, v_proj, lm_head; batch {a['batch']} x "
        f"{a['seq']} tokens, {a['fit_batches']} fit and {a['test_batches']} predictive "
        f"batches; marglik {a['marglik_steps']} steps; mc {a['mc_samples']} samples. "
        f"torch {res['torch']}. Peak = allocator peak during the step (CPU: peak RSS).",
        "",
        "| base | model | fwd+bwd | fit (x fwd+bwd) | fit peak (x model) | posterior "
        "| marglik | GLM predictive / batch (x fwd+bwd / batch) | predictive peak "
        "| mc probs / batch | dense factors > 2048 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for base, r in res["bases"].items():
        if not r.get("ok", True):
            lines.append(f"| {base} | FAILED: {r['error'][:300]} |" + " |" * 9)
            continue
        rt, nb = r["ratios"], a["test_batches"]
        lines.append(
            f"| {base} | {_gb(r['model_bytes'])} | {r['fwd_bwd']['seconds']:.2f} s "
            f"| {r['fit']['seconds']:.2f} s ({rt['fit_vs_fwd_bwd']:.2f}x) "
            f"| {_gb(r['fit']['peak_bytes'])} ({rt['fit_peak_vs_model']:.2f}x) "
            f"| {_gb(r['posterior']['total'])} "
            f"({'<=' if r['posterior']['bar_1GB_met'] else '>'} 1 GB) "
            f"| {r['marglik']['seconds']:.2f} s "
            f"| {r['glm_predictive']['seconds'] / nb:.2f} s "
            f"({rt['glm_predictive_per_batch_vs_fwd_bwd_per_batch']:.2f}x) "
            f"| {_gb(r['glm_predictive']['peak_bytes'])} "
            f"| {r['mc_probs']['seconds'] / nb:.2f} s "
            f"| {r['posterior']['dense_above'] or 'none'} |"
        )
    d = res.get("distributed", {})
    lines += ["", "## 2-rank fit", ""]
    if d.get("ok"):
        ref = res["bases"].get("bf16", {}).get("log_marglik_at_prior_1")
        for r in d["ranks"]:
            lines.append(
                f"- rank {r['rank']} ({r['backend']}): fit {r['fit']['seconds']:.2f} s, peak "
                f"{_gb(r['fit']['peak_bytes'])}, log marglik at prior 1: "
                f"{r['log_marglik_at_prior_1']:.6g} (single process: {ref})"
            )
    else:
        lines.append(f"- not run: {d.get('error', d.get('skipped', '?'))}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--bases", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--fit-batches", type=int, default=8)
    p.add_argument("--test-batches", type=int, default=2)
    p.add_argument("--marglik-steps", type=int, default=100)
    p.add_argument("--mc-samples", type=int, default=1000)
    p.add_argument("--distributed", choices=["auto", "off"], default="auto")
    p.add_argument("--gloo", action="store_true", help="run the 2-rank fit on CPU with gloo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.batch, args.fit_batches = min(args.seq, 8), min(args.batch, 2), 2
        args.test_batches = 1
        args.marglik_steps, args.mc_samples = min(args.marglik_steps, 5), 10
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("gpu_scale needs CUDA; run with --tiny for the CPU smoke test.")
    device = torch.device("cuda:0" if cuda else "cpu")
    res: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "date": dt.date.today().isoformat(),
        "gpu": _gpu_name(device),
        "torch": torch.__version__,
        "shape": TINY if args.tiny else LLAMA2_7B,
        "bases": {},
    }
    for base in args.bases:
        try:
            res["bases"][base] = run_base(base, args, device)
        except Exception as exc:  # record, keep going (e.g. no bitsandbytes)
            res["bases"][base] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if cuda:  # the previous base's model and posterior are gone: free their blocks
            torch.cuda.empty_cache()
    n_gpu = torch.cuda.device_count() if cuda else 0
    if args.distributed == "off":
        res["distributed"] = {"skipped": "--distributed off"}
    elif n_gpu >= 2 or args.gloo:
        res["distributed"] = run_distributed(args)
    else:
        res["distributed"] = {"skipped": f"{n_gpu} GPU(s); needs 2 (or --gloo on CPU)"}
    md = render(res)
    slug = re.sub(r"[^a-z0-9]+", "_", res["gpu"].lower()).strip("_")
    name = f"gpu_scale_{'tiny_' if args.tiny else ''}{slug}_{res['date']}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out_dir / f"{name}.md").write_text(md)
    print(md)
    print(f"wrote {args.out_dir / name}.json and .md")
    return res


if __name__ == "__main__":
    main()
