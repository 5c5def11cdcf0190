"""Where the fit's time goes on CUDA: a profiler table of ``la.fit`` at LLaMA-2-7B layer
shapes (fewer layers), plus timings of the dense linear algebra the low-rank factors use.

    python -m benchmarks.gpu_fit_profile --out-dir OUT       # CUDA, about a minute

``gpu_scale`` measured the full-depth fit at 45x a forward+backward on an H200, the same
for bf16 and nf4 bases, so the time is in the curvature code, not the model. This script
says which operations: ``torch.profiler`` self CUDA and CPU times of a fit over the same
batches, and the wall time of one ``qr`` / ``eigh`` / Gram ``eigh`` at the sizes a rank-256
factor of side 4096 merges (chunks of 512 columns). Writes ``gpu_fit_profile.txt``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.gpu_scale import LLAMA2_7B, build_model, make_data


def _time(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def linalg_table(device: torch.device) -> list[str]:
    """Wall seconds of the low-rank merge's building blocks at side 4096, fp32."""
    g = torch.Generator(device=device).manual_seed(0)
    lines = ["op | shape | ms", "---|---|---"]
    for c in (256, 512, 768, 1280):
        R = torch.randn(4096, c, device=device, generator=g)
        S = R.T @ R
        lines.append(f"qr | 4096x{c} | {1e3 * _time(lambda R=R: torch.linalg.qr(R)):.2f}")
        lines.append(f"eigh | {c}x{c} | {1e3 * _time(lambda S=S: torch.linalg.eigh(S)):.2f}")
        svd_ms = 1e3 * _time(lambda R=R: torch.linalg.svd(R, full_matrices=False), 3)
        lines.append(f"svd | 4096x{c} | {svd_ms:.2f}")
        Sb = S.expand(16, c, c).contiguous()
        batch_ms = 1e3 * _time(lambda Sb=Sb: torch.linalg.eigh(Sb), 3)
        lines.append(f"eigh batch 16 | {c}x{c} | {batch_ms:.2f}")
        Sc = S.double().cpu()
        t0 = time.perf_counter()
        torch.linalg.eigh(Sc)
        lines.append(f"eigh cpu f64 | {c}x{c} | {1e3 * (time.perf_counter() - t0):.2f}")
    G = torch.randn(4096, 4096, device=device, generator=g)
    G = G @ G.T
    lines.append(f"eigh | 4096x4096 | {1e3 * _time(lambda: torch.linalg.eigh(G), 2):.2f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out-dir", type=Path, default=Path("."))
    args = p.parse_args()
    from laplace import Laplace

    import laplace_lora_ext  # noqa: F401

    device = torch.device("cuda:0")
    shape = dict(LLAMA2_7B, layers=args.layers)
    model = build_model(shape, "bf16", device, 0)
    loader = torch.utils.data.DataLoader(make_data(32, 256, shape["vocab"], 1), batch_size=4)
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(loader)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    la.fit(loader)
    torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        la.fit(loader)
        torch.cuda.synchronize()
    out = [
        f"# fit profile: {args.layers} layers of LLaMA-2-7B shapes, 8 batches of 4x256",
        f"fit wall: {fit_s:.2f} s",
        "",
        "## by self CUDA time",
        "",
    ]
    out.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    out += ["", "## by CPU total", ""]
    out.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    out += ["", "## linear algebra at side 4096", ""] + linalg_table(device)
    text = "\n".join(out)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_fit_profile.txt").write_text(text)
    print(text[-6000:])


if __name__ == "__main__":
    main()
