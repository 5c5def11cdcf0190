"""The benchmark reports' pure halves, on the committed results (no benchmark is run).

Each long benchmark splits its report into ``summarize`` (every number and the pass/fail
checks, from the workers' results alone) and ``render`` (the markdown). Both are checked
against ``benchmarks/results/<name>.json`` and ``.md``: the summary must be the committed
one and the markdown must be the committed report.
"""

from __future__ import annotations

import copy
import json
import shlex
import types
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def committed(name: str) -> tuple[dict, str]:
    """``(payload, markdown)`` of a committed benchmark result."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not committed")
    return json.loads(path.read_text()), (RESULTS / f"{name}.md").read_text()


def report_body(md: str) -> str:
    """The markdown before the plot link and the total wall time (both added by main())."""
    return md.split("\n![")[0].split("\nTotal benchmark wall time")[0].rstrip()


def as_json(obj):
    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------- bench_scale


def test_bench_scale_summary_and_report_are_the_committed_ones():
    from benchmarks import bench_scale as B

    payload, md = committed("bench_scale")
    args = types.SimpleNamespace(**payload["args"])
    res = B.summarize(payload["runs"], args)
    assert res["bars"] == {
        "storage_le_100MB": True,
        "no_factor_side_above_2048": True,
        "fit_le_2x_fwdbwd": True,
    }
    summary = {k: v for k, v in payload["summary"].items() if k != "bars"}
    assert as_json({k: v for k, v in res.items() if k != "bars"}) == summary
    assert B.render(res, payload["runs"], args).rstrip() == report_body(md)


def test_bench_scale_bars_fail_on_slow_fit_and_large_tensors():
    from benchmarks import bench_scale as B

    payload, _ = committed("bench_scale")
    args = types.SimpleNamespace(**payload["args"])
    runs = copy.deepcopy(payload["runs"])
    deepest = runs[f"ours_L{max(args.layers)}"]
    deepest["fit"]["cpu_seconds"] = 2.5 * deepest["fwdbwd"]["cpu_seconds"]
    deepest["watch"]["square_hits"] = ["aten.mm.default: (4096, 4096)"]
    res = B.summarize(runs, args)
    assert res["bars"]["fit_le_2x_fwdbwd"] is False
    assert res["bars"]["no_factor_side_above_2048"] is False
    assert res["bars"]["storage_le_100MB"] is True
    md = B.render(res, runs, args)
    assert "bar <= 2x: **NOT met**" in md and "**VIOLATED**" in md


def test_bench_scale_report_names_a_failed_worker():
    from benchmarks import bench_scale as B

    payload, _ = committed("bench_scale")
    args = types.SimpleNamespace(**payload["args"])
    runs = copy.deepcopy(payload["runs"])
    runs[f"ours_L{min(args.layers)}"] = {"ok": False, "error": "MemoryError: boom"}
    res = B.summarize(runs, args)
    assert f"L{min(args.layers)}" not in res["time"]
    assert "compression_scaling" not in res  # needs both depths
    assert "failed: MemoryError: boom" in B.render(res, runs, args)


# --------------------------------------------------------------------------- bench_peers


def test_bench_peers_report_is_the_committed_one():
    from benchmarks import bench_peers as B

    payload, md = committed("bench_peers")
    args = types.SimpleNamespace(**payload["args"])
    assert B.render(payload["summary"], payload["runs"], args).rstrip() == report_body(md)
    # without the saved curvatures only the run-level numbers remain
    res = as_json(B.summarize(payload["runs"], args, load=lambda name: None))
    assert res["lowrank"] == res["blora"] == {}
    assert res["exact"] == payload["summary"]["exact"]
    failed = {k: v for k, v in payload["summary"]["stock"].items() if not v["ok"]}
    assert failed and {k: v for k, v in res["stock"].items() if not v["ok"]} == failed


def test_bench_peers_summary_of_identical_curvatures():
    """Every saved curvature equal to ours dense: zero errors, trace ratios and scale 1."""
    import torch

    from benchmarks import bench_peers as B

    payload, _ = committed("bench_peers")
    args = types.SimpleNamespace(**payload["args"])
    g = torch.Generator().manual_seed(0)
    blocks = []
    for sides in ([2, 3], [4, 2], [3]):
        roots = [torch.randn(n, n + 1, generator=g, dtype=torch.float64) for n in sides]
        blocks.append([X @ X.T for X in roots])
    saved = {"H": blocks, "f_var": torch.randn(4, 2, 2, generator=g, dtype=torch.float64)}
    res = B.summarize(payload["runs"], args, load=lambda name: saved)
    for d in res["lowrank"].values():
        assert d["H_rel_frob_err"] == pytest.approx(0, abs=1e-7)
        assert d["trace_ratio_vs_dense"] == pytest.approx(1) and d["f_var_rel_err"] == 0
    for d in res["blora"].values():
        assert d["rel_frob_err_vs_ours_dense"] == pytest.approx(0, abs=1e-7)
        assert d["best_scale"] == pytest.approx(1)
    for d in res["stock"].values():
        assert not d["ok"] or d["rel_frob_err_vs_ours_dense"] == pytest.approx(0, abs=1e-7)
    md = B.render(res, payload["runs"], args)
    assert "## (a) ours: low-rank factors vs dense" in md and "worker failed" not in md


# --------------------------------------------------------------------------- bench_distributed


def test_bench_distributed_summary_and_report_are_the_committed_ones():
    from benchmarks import bench_distributed as B

    payload, md = committed("bench_distributed")
    res = B.summarize(payload["rows"])
    assert res["speedup_2procs_vs"] == payload["speedup_2procs_vs"]
    assert all(res["checks"].values()), res["checks"]
    assert B.render(payload).rstrip() == md.rstrip()


def test_bench_distributed_checks_fail_on_disagreeing_ranks():
    from benchmarks import bench_distributed as B

    payload, _ = committed("bench_distributed")
    rows = copy.deepcopy(payload["rows"])
    two_dense = next(e for e in rows if e["structure"] == B.DENSE and e["processes"] == 2)
    two_dense["max_factor_rel_diff_vs_1proc"] = 1e-3  # more than float32 rounding
    two_dense["identical_on_all_ranks"] = False
    two_low = next(e for e in rows if e["structure"] != B.DENSE and e["processes"] == 2)
    two_low["max_factor_rel_diff_vs_dense_factors"] = 1.5  # much worse than one process
    assert not any(B.summarize(rows)["checks"].values())


def test_bench_distributed_measure_compares_factors_across_ranks_and_configs():
    import torch

    from benchmarks import bench_distributed as B

    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(4, 4, generator=g), torch.randn(3, 3, generator=g)]

    def rank(scale: float = 1.0) -> dict:
        one = {
            "wall_s": [1.0, 3.0, 2.0],
            "combine_s": [0.1, 0.1, 0.1],
            "cpu_s": [1.0, 1.0, 1.0],
            "n_data": 8,
            "loss": 1.0,
            "lml": -2.0 * scale,
            "factors": [scale * f for f in factors],
        }
        return {s: one for s in B.STRUCTURES}

    runs = {label: [rank()] * world for label, world, _ in B.CONFIGS}
    runs[B.CONFIGS[-1][0]] = [rank(2.0), rank(1.0)]  # rank 0 doubled, rank 1 not
    rows = B.measure(runs, {"reps": 3}, {label: [0.0] * 3 for label, *_ in B.CONFIGS})
    first, last = rows[0], rows[len(B.CONFIGS) - 1]
    assert first["fit_wall_s_median"] == 2.0 and first["max_factor_rel_diff_vs_1proc"] == 0
    assert last["fit_cpu_s_median_all_processes"] == 2.0  # summed over the two ranks
    assert last["max_factor_rel_diff_vs_1proc"] == pytest.approx(1.0)
    assert last["lml_rel_diff_vs_1proc"] == pytest.approx(1.0)
    assert not last["identical_on_all_ranks"] and first["identical_on_all_ranks"]


def _larger_splits_run(task: str, seed: int, la_acc: float, grid: list[float]) -> dict:
    part = {"acc": 0.5, "ece": 0.1, "nll": 0.7, "conf": 0.6, "n": 100}
    split = {m: {p: dict(part) for p in ("original", "fresh", "all")} for m in ("map", "temp")}
    split["la"] = {p: dict(part, acc=la_acc) for p in ("original", "fresh", "all")}
    split["_grid"] = {"factor": [0.1, 1, 10], "factor_nll": grid}
    split["_grid"] |= {"delta_b": [1, 10, 100], "delta_b_nll": grid}
    run = {"task": task, "seed": seed, "test": split, "wall_s": 1.0}
    return run | ({"shift": copy.deepcopy(split)} if task == "fine_foods_mc" else {})


def test_larger_splits_readings(tmp_path):
    """Reading (a) compares fresh accuracies with the 1-point bar; (c) takes each seed's and
    the seed-mean curve's minimum over the prior grid."""
    from benchmarks import llm_larger_splits_report as report

    for seed, (acc, grid) in enumerate([(0.49, [0.8, 0.65, 0.9]), (0.50, [0.9, 0.70, 0.6])]):
        for task in ("bbc_headlines_mc", "fine_foods_mc"):
            run = _larger_splits_run(task, seed, acc, grid)
            (tmp_path / f"llm_larger_splits_{task}_seed{seed}.json").write_text(json.dumps(run))
    numbers, lines = report.readings(report.load(tmp_path))
    assert numbers["a_bbc_acc_diff_fresh"] == pytest.approx([-1.0, 0.0])
    assert "sampling noise" in lines[0]  # mean −0.5 ≥ −1
    assert numbers["c_factor"]["per_seed_min"] == pytest.approx([0.65, 0.6])
    assert numbers["c_factor"]["per_seed_argmin"] == [1, 10]
    assert numbers["c_factor"]["common_min"] == pytest.approx(0.675)  # (0.65 + 0.70) / 2
    assert numbers["c_factor"]["common_argmin"] == 1
    (factor_line,) = [line for line in lines if "c · default prior" in line]
    assert "below temperature scaling's 0.700" in factor_line
    assert numbers["c_factor"]["narrowest_meeting_bar"]["value"] == 1  # 0.75 at 10 > 0.7


def test_bbc_accuracy_summary_counts_moves_and_flips():
    """Moves away from MAP's class split into right → wrong and wrong → right; MC flips
    compare the two 1000-draw runs."""
    import torch

    from benchmarks.llm_bbc_accuracy_check import summary

    eye = torch.eye(3)
    labels = torch.tensor([0, 1, 2, 0])
    probs = {
        "map": eye[[0, 1, 0, 1]],  # right, right, wrong, wrong
        "mc1000": eye[[0, 2, 2, 1]],  # one right -> wrong, one wrong -> right
        "mc1000_other": eye[[0, 2, 2, 0]],
        "mc20000": eye[[0, 1, 0, 1]],
        "probit": eye[[1, 1, 0, 1]],
    }
    out = summary(probs, labels, torch.ones(4, 3))
    assert out["acc"]["map"] == 0.5 and out["acc"]["mc1000"] == 0.5
    assert out["moved"]["mc1000"] == 2 and out["moved"]["mc20000"] == 0
    assert (out["right_to_wrong"]["mc1000"], out["wrong_to_right"]["mc1000"]) == (1, 1)
    assert out["right_to_wrong"]["probit"] == 1 and out["mc_flips"] == 1
    assert out["histogram"]["mc1000"] == [1, 1, 2] and out["labels"] == [2, 1, 1]


# ------------------------------------------------------------------ prior_threshold_check
def test_prior_threshold_picks_the_step_nearest_each_target_in_log_scale():
    from benchmarks.prior_threshold_check import pick_steps

    train_nll = {16: 0.5, 32: 0.05, 48: 0.02, 64: 0.009, 80: 0.004, 96: 0.0005}
    # 0.03 -> 48 (log distance 0.41 against 0.51 for 32), 0.01 -> 64, 0.003 -> 80
    assert pick_steps(train_nll) == [48, 64, 80]
    assert pick_steps({16: 0.5, 32: 0.2}) == [32]  # one step nearest every target


def test_prior_threshold_decision_needs_one_percent_and_two_tasks():
    from benchmarks.prior_threshold_report import decide

    def row(task, train_nll, evidence, loo):
        return {"task": task, "train_nll": train_nll,
                "validation": {"evidence": evidence, "leave_one_out": loo}}  # fmt: skip

    # leave-one-out much better at training NLL 0.02 on two tasks: τ = 0.03 or 0.1 wins
    rows = [row("a", 0.02, 1.0, 0.8), row("b", 0.02, 1.0, 0.8), row("c", 0.05, 1.0, 1.2)]
    d = decide(rows, thresholds=(0.01, 0.03, 0.1))
    assert d["qualifying"] == [0.03, 0.1] and d["chosen"] == 0.03  # 0.1 also switches c
    # the same gain on one task only: keep the current threshold
    rows = [row("a", 0.02, 1.0, 0.8), row("b", 0.5, 1.0, 0.8), row("c", 0.5, 1.0, 1.2)]
    assert decide(rows, thresholds=(0.01, 0.03))["chosen"] == 0.01
    # less than 1 % better: keep it
    rows = [row("a", 0.02, 1.0, 0.999), row("b", 0.02, 1.0, 0.999)]
    assert decide(rows, thresholds=(0.01, 0.03))["chosen"] == 0.01


def test_prior_threshold_bars_name_the_missed_ones():
    from benchmarks.prior_threshold_report import _bars_met

    map_m = {"acc": 0.5, "ece": 0.3, "nll": 1.0, "conf": 0.8}
    good = {"acc": 0.5, "ece": 0.1, "nll": 0.7, "conf": 0.52}
    assert _bars_met(map_m, good) == "4 of 4"
    assert _bars_met(map_m, good | {"conf": 0.4}) == "3 of 4 (missed: conf within 5 points of ACC)"


@pytest.mark.parametrize("name", ["bench_prior_search", "bench_prior_search_lowrank_7b"])
def test_bench_prior_search_report_is_the_committed_one(name):
    from benchmarks import bench_prior_search as B

    payload, md = committed(name)
    args = types.SimpleNamespace(**payload["args"])
    assert B.render(payload["summary"], args) == md.rstrip("\n") + "\n"


@pytest.mark.parametrize("name", ["bench_loo_kernel_draws", "bench_loo_kernel_draws_256"])
def test_bench_loo_kernel_draws_report_is_the_committed_one(name):
    from benchmarks import bench_loo_kernel_draws as B

    payload, md = committed(name)
    args = types.SimpleNamespace(**payload["args"])
    assert B.render(payload["summary"], args) == md.rstrip("\n") + "\n"
    assert [label for label, *_ in B.KERNELS] == [k for k in payload["summary"] if k != "fit_cpu_s"]


def test_bench_prior_search_report_compares_with_stock():
    from benchmarks import bench_prior_search as B

    payload, md = committed("bench_prior_search")
    grid = payload["summary"]["gridsearch (21 values)"]
    ratio = grid[B.STOCK]["cpu_s"] / grid["eigenbasis once"]["cpu_s"]
    assert f"ours {ratio:.2f}× faster than stock" in md
    assert "stock's validation batch: 1; ours: 8" in md


def test_mem_probs_check_report_is_the_committed_one():
    from benchmarks import mem_probs_check as M

    payload, md = committed("mem_probs_check")
    assert M.render(payload["summary"]) == md.rstrip("\n") + "\n"
    assert md.count("+0.0 MiB") == 3


def _prior_scale_run(task: str, seed: int, accs: list[float], shift_nll: list[float]) -> dict:
    """A per-seed file of ``llm_prior_scale_check`` on a 3-value grid (MAP: ACC 0.5, ECE
    0.2, NLL 1.0; temperature: shift NLL 0.7)."""
    base = {"acc": 0.5, "ece": 0.2, "nll": 1.0, "brier": 0.6, "conf": 0.5, "n": 100}
    parts = ("original", "fresh", "all")

    def at(**kw) -> dict:
        return {p: dict(base, **kw) for p in parts}

    grid = [at(acc=a, ece=0.05, nll=0.8, conf=a) for a in accs]
    test = {"map": at(), "temp": at(nll=0.7), "factor": grid, "delta_b": copy.deepcopy(grid)}
    run = {"task": task, "seed": seed, "factor": [0.1, 1.0, 10.0], "delta_b": [1.0, 10.0, 100.0],
           "test": test}  # fmt: skip
    if task == "fine_foods_mc":
        shift = [at(nll=v) for v in shift_nll]
        run["shift"] = {"map": at(), "temp": at(nll=0.7), "factor": shift,
                        "delta_b": copy.deepcopy(shift)}  # fmt: skip
    return run


def test_prior_scale_readings_find_no_common_width(tmp_path):
    """BBC keeps MAP's accuracy only at the narrow end, fine foods meets the shift bar only
    at the wide end: each task has a width meeting its bars, no width meets both."""
    from benchmarks import llm_prior_scale_report as report

    for seed in (0, 1):
        bbc = _prior_scale_run("bbc_headlines_mc", seed, [0.47, 0.48, 0.5], [])
        ff = _prior_scale_run("fine_foods_mc", seed, [0.5, 0.5, 0.5], [0.69, 0.75, 0.9])
        for run in (bbc, ff):
            name = f"llm_prior_scale_{run['task']}_seed{seed}.json"
            (tmp_path / name).write_text(json.dumps(run))
    found = report.values_meeting(report.load(tmp_path), "factor")
    assert found["tasks"]["bbc_headlines_mc"]["all_bars"] == [10.0]
    assert found["tasks"]["fine_foods_mc"]["all_bars"] == [0.1]
    assert found["tasks"]["fine_foods_mc"]["per_bar"]["NLL ≤ temperature's"] == [0.1]
    assert found["every_task"] == []
    assert report.spans([0.1, 1.0], [0.1, 1.0, 10.0]) == "0.1–1"
    assert report.spans([0.1, 10.0], [0.1, 1.0, 10.0]) == "0.1, 10"
    report.main(tmp_path)
    text = (tmp_path / "llm_prior_scale.md").read_text()
    assert "Every bar of every task: **none**" in text
    assert (tmp_path / "llm_prior_scale.png").exists()


def test_rescore_keeps_only_the_steps_asked_for():
    from benchmarks.llm_rescore_default import keep_steps

    runs = {"t": {"0": {"checkpoints": {"32": {"a": 1}, "960": {"b": 2}}}}}
    keep_steps(runs, ["960"])
    assert runs == {"t": {"0": {"checkpoints": {"960": {"b": 2}}}}}


def test_rescore_map_check_is_zero_only_for_the_files_model():
    from benchmarks.llm_rescore_default import (
        largest_map_diff,
        map_check_text,
        map_max_abs_diff,
    )
    from laplace_lora_ext.evaluation import classification_metrics

    gen = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(40, 3, generator=gen), torch.arange(40) % 3
    cache = types.SimpleNamespace(logits=logits, labels=labels)
    rows = {
        "map": {k: float(v) for k, v in classification_metrics(logits.softmax(-1), labels).items()}
    }
    assert map_max_abs_diff(rows, cache) < 1e-6
    other = types.SimpleNamespace(
        logits=logits + 0.5 * torch.randn(40, 3, generator=gen), labels=labels
    )
    assert map_max_abs_diff(rows, other) > 1e-2
    assert map_max_abs_diff({"_entropy": {}}, other) is None  # a candidate's new split
    assert largest_map_diff([0.0, None, 0.25]) == 0.25  # the new split is skipped
    assert largest_map_diff([None, None]) is None  # no MAP row anywhere: unknown, not 0
    assert map_check_text(None) == "n/a (no MAP row)" and map_check_text(0.0) == "0.00e+00"


def test_rescore_refresh_map_scores_the_rebuilt_model_and_keeps_the_files_rows():
    from benchmarks.llm_rescore_default import keep_file_rows, map_and_temperature

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    cache = types.SimpleNamespace(logits=logits, labels=torch.tensor([0, 1]))
    rows = {"map": {"acc": 0.5}, "temp": {"acc": 0.25}}
    keep_file_rows(rows)
    probs = map_and_temperature(cache, 2.0)
    assert torch.allclose(probs["map"], logits.float().softmax(-1))
    assert torch.allclose(probs["temp"], (logits.float() / 2).softmax(-1))
    assert rows["map_file"] == {"acc": 0.5} and rows["temp_file"] == {"acc": 0.25}
    rows["map"] = {"acc": 1.0}  # a second call keeps the file's rows, not the new ones
    keep_file_rows(rows)
    assert rows["map_file"] == {"acc": 0.5}


def test_rescore_keeps_the_shift_probabilities_like_the_tests():
    from benchmarks.llm_rescore_default import keep_probs

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cache = types.SimpleNamespace(logits=logits, labels=torch.tensor([0, 1]))
    rows: dict = {"la": {"acc": 1.0}}
    keep_probs(rows, cache, torch.tensor([[0.6, 0.4], [0.3, 0.7]]))
    torch.testing.assert_close(
        torch.tensor(rows["_probs"]["map"]).float(), logits.softmax(-1).float()
    )
    torch.testing.assert_close(
        torch.tensor(rows["_probs"]["la"]), torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    )
    assert rows["_labels"] == [0, 1] and rows["la"] == {"acc": 1.0}


def test_metric_cell_formats_acc_ece_nll_confidence():
    from benchmarks._common import metric_cell

    m = {"acc": 0.6467, "ece": 0.0801, "nll": 0.64912, "conf": 0.5893}
    assert metric_cell(m) == "64.7 / 8.0 / 0.649 / 58.9"
    assert metric_cell(m, percent_digits=0) == "65 / 8.0 / 0.649 / 59"


def test_kfac_reach_bars_cuts_one_seed_with_the_default_draws():
    from benchmarks.kfac_reach_bars import cut

    payload = {
        "args": {"seeds": [0, 1], "tasks": ["t"], "n_samples": 1000, "steps": 80},
        "runs": {"t": {"0": {"checkpoints": {}}, "1": {"checkpoints": {"80": {}}}}},
    }
    out = cut(payload, "t", 1)
    assert out["runs"] == {"t": {"1": {"checkpoints": {"80": {}}}}}
    assert out["args"] == {"seeds": [1], "tasks": ["t"], "n_samples": None, "steps": 80}
    assert payload["args"]["n_samples"] == 1000  # the committed payload is not changed
    payload["runs"]["t"]["1"]["checkpoints"] = {"8": {"a": 1}, "80": {}}
    assert cut(payload, "t", 1, ("8",))["runs"] == {"t": {"1": {"checkpoints": {"8": {"a": 1}}}}}
    assert list(payload["runs"]["t"]["1"]["checkpoints"]) == ["8", "80"]


def test_kfac_reach_bars_reads_the_status_bars_by_regime():
    from benchmarks.kfac_reach_bars import committed_rows

    ten = committed_rows("10epochs")
    memorised = committed_rows("memorised")
    assert {r["regime"] for r in ten} == {"early", "overfit", "shift"}
    assert {r["regime"] for r in memorised} == {"overfit", "shift"}
    assert len(ten) == 19 and len(memorised) == 13  # the status' counts
    early = committed_rows("heldout-early")
    assert {r["regime"] for r in early} == {"early"} and len(early) == 4
    heldout = committed_rows("heldout-memorised")
    assert {r["regime"] for r in heldout} == {"overfit"} and len(heldout) == 8


def test_kfac_reach_bars_gives_an_early_only_regime_the_early_bars():
    from benchmarks.kfac_reach_bars import regime_bars

    def metrics(ece: float, nll: float) -> dict:
        return {"ece": (ece, 0.0, 3), "nll": (nll, 0.0, 3), "acc": (0.8, 0.0, 3)}

    test = {"map": metrics(0.05, 0.50), "la": metrics(0.08, 0.52)}
    rows = regime_bars("heldout-early", {"t": {"32": {"test": test}}})
    assert [(r["regime"], r["met"]) for r in rows] == [("early", False), ("early", False)]
    test["la"] = metrics(0.06, 0.50)
    assert all(r["met"] for r in regime_bars("heldout-early", {"t": {"32": {"test": test}}}))


def test_kfac_reach_bars_reads_a_partly_rescored_regime_seed_by_seed(tmp_path, monkeypatch):
    from benchmarks import kfac_reach_bars as R
    from benchmarks._common import RESULTS_DIR

    spec = R.REGIMES["heldout-memorised"]
    if not (RESULTS_DIR / spec.pattern.format(task=spec.tasks[0], seed=0)).exists():
        pytest.skip("results not committed")
    monkeypatch.setattr(R, "CACHE", tmp_path)

    def rescore(task: str, seed: int) -> None:  # the committed file stands in for a re-score
        source = RESULTS_DIR / spec.pattern.format(task=task, seed=seed)
        payload = R.cut(json.loads(source.read_text()), task, seed, spec.steps)
        (tmp_path / f"heldout-memorised-{task}-seed{seed}-rescored.json").write_text(
            json.dumps(payload)
        )

    assert R.regime_results("heldout-memorised") is None
    first, second = spec.tasks
    rescore(first, 0)
    res = R.regime_results("heldout-memorised")
    assert res["bars"] == [] and [s["seed"] for s in res["seeds"]] == [0]
    rows = res["seed_bars"]
    assert len(rows) == 4 and {(r["task"], r["seed"]) for r in rows} == {(first, 0)}
    assert all(r["before"] == {"value": r["value"], "met": r["met"]} for r in rows)
    text = R.render({"heldout-memorised": res})
    assert "no task re-scored on every seed" in text and f"({first}: seed 0)" in text
    for seed in R.SEEDS:
        rescore(second, seed)
    res = R.regime_results("heldout-memorised")
    assert {r["task"] for r in res["bars"]} == {second} and len(res["bars"]) == 4
    assert {r["task"] for r in res["seed_bars"]} == {first}
    assert all(r["before"]["met"] == r["met"] for r in res["bars"])  # the status' own bars


@pytest.mark.parametrize(
    "name, verdict",
    [
        ("prior_loo_redrawn_check", "adopt the redrawn kernel"),
        ("prior_loo_draws_check", "adopt the 8-draw kernel"),
    ],
)
def test_leave_one_out_kernel_decisions_need_both_conditions(name, verdict):
    import importlib

    decide = importlib.import_module(f"benchmarks.{name}").decide

    def row(task: str, new: float, old: float) -> dict:
        return {"task": task, "validation": {"la": {"nll": new}, "la_previous": {"nll": old}}}

    tasks = ("fine_foods_mc", "tweet_sentiment_mc", "bbc_headlines_mc")
    better = [row(t, 0.5, 0.6) for t in tasks for _ in range(3)]
    assert decide(better)["verdict"] == verdict
    assert decide(better[:8])["verdict"] == "no change"  # all nine checkpoints needed
    one_task_worse = [row(t, 0.7 if t == "bbc_headlines_mc" else 0.3, 0.6) for t in tasks] * 3
    d = decide(one_task_worse)
    assert d["condition_1"] and not d["condition_2"] and d["verdict"] == "no change"


@pytest.mark.parametrize(
    "name", ["prior_loo_everywhere_check", "prior_loo_redrawn_check", "prior_loo_draws_check"]
)
def test_leave_one_out_study_reports_are_the_committed_ones(name):
    import importlib

    study = importlib.import_module(f"benchmarks.{name}")
    prefix = study.PREFIX
    _, md = committed(prefix)
    rows = study.load_rows(prefix)
    assert study.render(rows, study.decide(rows)) == md


def test_chosen_delta_b_reads_lora_b_of_a_per_tensor_or_scalar_prior():
    from benchmarks.bench_prior_search import chosen_delta_b

    names = ["m.lora_A.default.weight", "m.lora_B.default.weight"]
    per_tensor = types.SimpleNamespace(
        prior_precision=torch.tensor([3.0, 7.0]), lora_param_names=names
    )
    scalar = types.SimpleNamespace(prior_precision=torch.tensor([5.0]), lora_param_names=names)
    assert chosen_delta_b(per_tensor) == 7.0 and chosen_delta_b(scalar) == 5.0
    assert chosen_delta_b(per_tensor, torch.tensor([1.0, 9.0])) == 9.0  # a stored prior


def test_loo_shared_pass_check_report_is_the_committed_one():
    from benchmarks import loo_shared_pass_check as B

    payload, md = committed("loo_shared_pass_check")
    assert B.render(payload["summary"]) == md.rstrip("\n") + "\n"
    assert len(payload["summary"]) == len(B.TASKS) * len(B.SEEDS)


def test_default_path_sweep_report_is_the_committed_one():
    from benchmarks import default_path_sweep as S

    payload, md = committed("default_path_sweep_kron")
    args = payload["args"]
    assert S.render(payload["rows"], args["structure"], args["classes"]) == md.rstrip("\n") + "\n"
    failed = {"arch": "opt", "variant": "plain", "memorised_run": True, "error": "ValueError: x"}
    text = S.render([failed], "kron", 2)
    assert "**error** | | ValueError: x |" in text and "0 of 1 runs" in text


def test_map_check_report_names_the_flags_it_ran_with():
    from benchmarks import memorised_map_check as C

    assert (
        C.command_line(list(C.TASKS), C.SOURCE, C.NAME)
        == "python -m benchmarks.memorised_map_check"
    )
    line = C.command_line(["pet_species_mc"], "x_{task}_3seeds.json", "x_check")
    assert shlex.split(line)[3:] == [
        "--tasks",
        "pet_species_mc",
        "--source",
        "x_{task}_3seeds.json",
        "--name",
        "x_check",
    ]
    rows = [
        {
            "task": "t",
            "seed": 0,
            "split": "test",
            **{
                k: {"acc": 0.5, "nll": 0.7, "conf": 0.6}
                for k in ("map_file", "map_cached", "default")
            },
        }
    ]
    assert f"`{line}`" in C.render(rows, "x_{task}_3seeds.json", line)


def test_kfac_reach_bars_report_is_the_committed_one():
    from benchmarks.kfac_reach_bars import render

    payload, md = committed("kfac_reach_bars")
    assert render(payload).rstrip() == md.rstrip()
    ten = payload["10epochs"]["bars"]
    assert len(ten) == 19 and all(r["before"] is not None for r in ten)


def test_rescore_stores_the_rebuilt_models_map_probabilities_only_when_it_refreshed_map():
    from benchmarks.llm_rescore_default import map_probs_match, store_probs
    from laplace_lora_ext.evaluation import classification_metrics

    gen = torch.Generator().manual_seed(1)
    old, new = torch.randn(30, 2, generator=gen), torch.randn(30, 2, generator=gen)
    labels = torch.arange(30) % 2
    la = torch.full((30, 2), 0.5)

    def rows() -> dict:  # the file's test rows, with MAP re-scored on the rebuilt model
        metrics = classification_metrics(new.softmax(-1), labels)
        return {
            "map": {k: float(v) for k, v in metrics.items()},
            "_probs": {"map": old.softmax(-1).tolist(), "la": []},
            "_labels": labels.tolist(),
        }

    cache = types.SimpleNamespace(logits=new.double(), labels=labels)
    stale = rows()
    assert not map_probs_match(stale)  # the file's probabilities belong to another model
    store_probs(stale, "test", cache, la, refresh_map=False)
    assert stale["_probs"]["map"] == old.softmax(-1).tolist()  # MAP kept: not re-scored
    assert stale["_probs"]["la"] == la.tolist()
    fresh = rows()
    store_probs(fresh, "test", cache, la, refresh_map=True)
    assert map_probs_match(fresh) and fresh["_probs"]["la"] == la.tolist()
    # a refreshed map row (map_file kept) needs the rebuilt model's probabilities, not
    # merely ones that give its metrics: the file's model may differ by float noise only
    kept = rows() | {"map_file": {}, "_probs": {"map": new.softmax(-1).tolist(), "la": []}}
    assert not map_probs_match(kept)
    store_probs(kept, "test", cache, la, refresh_map=True)
    assert map_probs_match(kept)


def test_restore_map_probs_rewrites_only_the_stale_checkpoints_and_checks_them(
    tmp_path, monkeypatch
):
    """The restore's control flow with the rebuild and MAP's re-run stubbed: the stale
    checkpoint gets the re-run's probabilities, the matching one is not rebuilt, a re-run
    that does not give the ``map`` row raises, and a file with nothing stale is not written."""
    from benchmarks import llm_rescore_default as R
    from laplace_lora_ext.evaluation import classification_metrics

    gen = torch.Generator().manual_seed(2)
    old, new = torch.randn(20, 3, generator=gen), torch.randn(20, 3, generator=gen)
    labels = torch.arange(20) % 3

    def ckpt(rebuilt: torch.Tensor, stored: torch.Tensor) -> dict:
        metrics = classification_metrics(rebuilt.softmax(-1), labels)
        test = {"map": {k: float(v) for k, v in metrics.items()}, "_labels": labels.tolist()}
        test["map_file"] = test["map"]  # a --refresh-map re-score (the file's row kept)
        return {"test": test | {"_probs": {"map": stored.softmax(-1).tolist(), "la": []}}}

    stored = ckpt(old, old)  # its MAP probabilities stored from the rebuilt model
    stored["test"][R.MAP_PROBS_REBUILT] = True
    runs = {"t": {"0": {"checkpoints": {"8": ckpt(new, old), "16": stored}}}}
    path = tmp_path / "rescored.json"
    path.write_text(json.dumps({"args": {"threads": 1, "la_batch_size": 4}, "runs": runs}))
    rebuilt = []

    def cached(runs, args, skip):  # the rebuild, as calib.cached_checkpoints yields it
        for step, c in runs["t"]["0"]["checkpoints"].items():
            if not skip(c):
                rebuilt.append(step)
                data = types.SimpleNamespace(test=None)
                yield types.SimpleNamespace(
                    task="t", seed=0, step=step, ckpt=c, wrapper=None, data=data, collate=None
                )

    rerun = {"probs": new}
    monkeypatch.setattr(R.calib, "cached_checkpoints", cached)
    monkeypatch.setattr(R, "predict_probs", lambda *a: (rerun["probs"].softmax(-1), labels))
    assert R.restore_map_probs(path) == [("t", "0", "8")] and rebuilt == ["8"]
    restored = json.loads(path.read_text())["runs"]["t"]["0"]["checkpoints"]
    assert restored["8"]["test"]["_probs"]["map"] == new.softmax(-1).tolist()
    assert restored["8"]["test"][R.MAP_PROBS_REBUILT]
    assert restored["16"]["test"]["_probs"]["map"] == old.softmax(-1).tolist()
    before = path.read_text()
    assert R.restore_map_probs(path) == [] and path.read_text() == before  # a no-op now
    runs["t"]["0"]["checkpoints"]["8"] = ckpt(new, old)
    path.write_text(json.dumps({"args": {"threads": 1, "la_batch_size": 4}, "runs": runs}))
    rerun["probs"] = old  # a re-run that is not the row's model
    with pytest.raises(ValueError, match="MAP re-run differs from its row"):
        R.restore_map_probs(path)


def test_refit_temperature_only_where_the_rebuilt_map_is_another_model(tmp_path, monkeypatch):
    """The refit's control flow with the rebuild and the validation pass stubbed: only the
    checkpoint whose rebuilt MAP differs from the file's gets a new temperature, fitted on
    the validation logits, its ``temp`` row re-scored from the stored MAP probabilities;
    a second call is a no-op that does not write."""
    from benchmarks import llm_rescore_default as R
    from laplace_lora_ext.evaluation import classification_metrics

    gen = torch.Generator().manual_seed(3)
    logits, labels = 4 * torch.randn(30, 3, generator=gen), torch.arange(30) % 3
    val_logits = 4 * torch.randn(25, 3, generator=gen)
    val_labels = torch.arange(25) % 3

    def ckpt(map_moved: bool) -> dict:
        m = {k: float(v) for k, v in classification_metrics(logits.softmax(-1), labels).items()}
        test = {"map": m, "map_file": {**m, "acc": m["acc"] + (0.1 if map_moved else 0.0)}}
        test |= {"_probs": {"map": logits.softmax(-1).tolist()}, "_labels": labels.tolist()}
        return {"test": test, "_temperature": 2.0}

    runs = {"t": {"0": {"checkpoints": {"960": ckpt(True), "32": ckpt(False)}}}}
    path = tmp_path / "rescored.json"
    path.write_text(json.dumps({"args": {"threads": 1, "la_batch_size": 4}, "runs": runs}))

    def cached(runs, args, skip):
        for step, c in runs["t"]["0"]["checkpoints"].items():
            if not skip(c):
                data = types.SimpleNamespace(validation=None)
                yield types.SimpleNamespace(
                    task="t", seed=0, step=step, ckpt=c, wrapper=None, data=data, collate=None
                )

    monkeypatch.setattr(R.calib, "cached_checkpoints", cached)
    monkeypatch.setattr(R, "make_loader", lambda *a: None)
    monkeypatch.setattr(R.calib, "validation_logits", lambda *a: (val_logits, val_labels))
    want_T = R.calib.temperature(val_logits, val_labels)
    assert R.refit_temperature(path) == [("t", "0", "960", 2.0, want_T)]
    saved = json.loads(path.read_text())["runs"]["t"]["0"]["checkpoints"]
    assert saved["960"]["_temperature"] == want_T and saved["960"]["_temperature_file"] == 2.0
    want = classification_metrics((logits.double().log_softmax(-1) / want_T).softmax(-1), labels)
    assert saved["960"]["test"]["temp"]["nll"] == pytest.approx(want["nll"], rel=1e-6)
    assert saved["32"]["_temperature"] == 2.0 and "temp" not in saved["32"]["test"]
    before = path.read_text()
    assert R.refit_temperature(path) == [] and path.read_text() == before
