"""``benchmarks/gpu_scale.py --tiny`` runs the CUDA script's code path on CPU in seconds."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_scale


def test_gpu_scale_tiny_smoke(tmp_path):
    pytest.importorskip("bitsandbytes")
    res = gpu_scale.main(["--tiny", "--out-dir", str(tmp_path), "--distributed", "off"])
    for base in ("bf16", "nf4"):
        r = res["bases"][base]
        assert r.get("ok", True), r
        assert r["posterior"]["dense_above"] == []  # the 3000-sided factor is low-rank
        assert r["posterior"]["bar_1GB_met"]
        assert r["fit"]["seconds"] > 0 and r["ratios"]["fit_vs_fwd_bwd"] > 0
        assert len(r["prior_precision"]) >= 1 and min(r["prior_precision"]) > 0
    written = list(tmp_path.glob("gpu_scale_tiny_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["args"]["tiny"]
    assert (tmp_path / written[0].name.replace(".json", ".md")).read_text().startswith("# ")


def test_committed_cuda_run_meets_the_memory_bars():
    """The committed H200 run (the one the docs quote): both bases ran at full depth, the
    posterior took <= 1 GB and no factor side above 2048 was dense."""
    path = gpu_scale.RESULTS_DIR / "gpu_scale_nvidia_h200_2026-11-30.json"
    res = json.loads(path.read_text())
    assert res["shape"]["layers"] == 32 and not res["args"]["tiny"]
    for base in ("bf16", "nf4"):
        r = res["bases"][base]
        assert r.get("ok", True), r
        assert r["posterior"]["bar_1GB_met"] and r["posterior"]["dense_above"] == []
    assert (path.with_suffix(".md")).read_text().startswith("# gpu_scale")
