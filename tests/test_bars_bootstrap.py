"""``benchmarks.bars_bootstrap``: resampled metrics against the library's metrics on the
resampled examples, and the observed bars against ``llm_bars`` on the whole test sets."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import bars_bootstrap as B
from benchmarks import llm_bars
from laplace_lora_ext.evaluation import classification_metrics


def _probs(seed: int, n: int, c: int, sharp: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharp * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    probs[0] = torch.nn.functional.one_hot(torch.tensor(0), c).double()  # confidence 1.0
    return probs, torch.randint(c, (n,), generator=g)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 40),
    c=st.integers(2, 5),
    sharp=st.floats(0.1, 8.0),
)
def test_resampled_metrics_are_the_metrics_of_the_resampled_examples(seed, n, c, sharp):
    probs, labels = _probs(seed, n, c, sharp)
    index = torch.randint(n, (4, n), generator=torch.Generator().manual_seed(seed + 1))
    got = B.resampled_metrics(probs, labels, index)
    for b in range(4):
        want = classification_metrics(probs[index[b]], labels[index[b]])
        for k in ("acc", "ece", "nll", "conf"):
            assert float(got[k][b]) == pytest.approx(want[k], abs=1e-6), k


def _checkpoint(seed: int) -> dict:
    probs, labels = _probs(seed, 30, 3, 4.0)
    la = torch.softmax(probs.log() / 3.0, -1)
    return {
        "_temperature": 2.0,
        "test": {"_probs": {"map": probs.tolist(), "la": la.tolist()}, "_labels": labels.tolist()},
    }


def test_temperature_scaling_is_maps_probabilities_at_the_stored_temperature():
    ckpt = _checkpoint(0)
    probs, _ = B.checkpoint_probs(ckpt)
    want = torch.softmax(torch.tensor(ckpt["test"]["_probs"]["map"]).log() / 2.0, -1)
    torch.testing.assert_close(probs["temp"][1:], want[1:].double())
    # a saturated row (MAP probability exactly 0) stays finite: log is floored at 1e-12
    assert torch.isfinite(probs["temp"]).all() and float(probs["temp"][0, 0]) > 0.99


def test_the_observed_bars_are_llm_bars_on_the_whole_test_sets(monkeypatch):
    seeds = [{"checkpoints": {"80": _checkpoint(s)}} for s in range(3)]
    monkeypatch.setattr(B, "benchmark_tasks", lambda benchmark: {"t": seeds})
    rows = B.bar_rows("3 tasks, memorised", draws=50)

    def mean(method: str, metric: str) -> tuple[float, float, int]:
        values = []
        for s in seeds:
            probs, labels = B.checkpoint_probs(s["checkpoints"]["80"])
            values.append(classification_metrics(probs[method], labels)[metric])
        return (sum(values) / 3, 0.0, 3)

    test = {m: {k: mean(m, k) for k in ("acc", "ece", "nll", "conf")} for m in B.METHODS}
    want = llm_bars.check({"t": {"80": {"test": test}}})
    assert [(r["bar"], r["met"]) for r in rows] == [(r["bar"], r["met"]) for r in want]
    for got, ref in zip(rows, want, strict=True):
        assert got["value"] == pytest.approx(ref["value"], abs=1e-3)
        assert 0.0 <= got["p_met"] <= 1.0 and 0.0 <= got["temperature_p_met"] <= 1.0
        lo, hi = got["slack_interval_90"]
        assert lo <= hi


def test_the_benchmarks_are_the_status_rows():
    from benchmarks import llm_status

    assert list(B.BENCHMARKS) == [source.label for source in llm_status.SOURCES]


def test_the_committed_report_is_its_json_rendered():
    path = B.C.RESULTS_DIR / f"{B.NAME}.json"
    if not path.exists():
        pytest.skip("results not committed")
    payload = json.loads(path.read_text())
    md = path.with_suffix(".md").read_text()
    assert B.render(payload["rows"], payload["draws"]).rstrip() == md.rstrip()
    assert [r["p_met"] for r in payload["rows"] if not r["met"]] == pytest.approx(
        [0.0, 0.33, 0.36], abs=0.02
    )


def test_the_shift_bar_is_read_where_the_shift_probabilities_are_stored(monkeypatch):
    seeds = []
    for s in range(3):
        ckpt = _checkpoint(s)
        ckpt["shift"] = _checkpoint(s + 10)["test"]
        seeds.append({"checkpoints": {"80": ckpt}})
    monkeypatch.setattr(B, "benchmark_tasks", lambda benchmark: {"t": seeds})
    rows = B.bar_rows("3 tasks, 10 epochs", draws=50)
    (shift,) = [r for r in rows if r["regime"] == "shift"]
    shifted = [B.checkpoint_probs(s["checkpoints"]["80"], "shift") for s in seeds]
    nll = {
        m: sum(classification_metrics(probs[m], labels)["nll"] for probs, labels in shifted) / 3
        for m in ("la", "temp")
    }
    assert shift["value"] == pytest.approx(nll["la"], abs=1e-3)
    assert shift["met"] == (nll["la"] <= nll["temp"])
    assert shift["temperature_met"] is None and shift["temperature_p_met"] is None
    del seeds[1]["checkpoints"]["80"]["shift"]["_probs"]  # one seed without: no shift bar
    assert all(r["regime"] != "shift" for r in B.bar_rows("3 tasks, 10 epochs", draws=5))


def test_a_rescore_whose_map_probabilities_are_another_models_is_refused():
    ckpt = _checkpoint(0)
    test = ckpt["test"]
    probs = torch.tensor(test["_probs"]["map"], dtype=torch.float64)
    metrics = classification_metrics(probs, torch.tensor(test["_labels"]))
    test["map"] = {k: float(v) for k, v in metrics.items()}
    runs = {"t": {"0": {"checkpoints": {"960": ckpt}}}}
    assert B.check_map_probs(runs) is runs
    test["map"]["acc"] += 1 / 30  # MAP re-scored on a rebuilt model that differs
    with pytest.raises(ValueError, match="t seed 0 step 960.*restore-map-probs"):
        B.check_map_probs(runs)


def test_the_committed_bootstrap_reads_the_status_bars():
    """Every observed bar of the bootstrap is the status' bar (value, bound, verdict): the
    two read the same re-scores."""
    boot, reach = (B.C.RESULTS_DIR / f"{n}.json" for n in (B.NAME, "kfac_reach_bars"))
    if not (boot.exists() and reach.exists()):
        pytest.skip("results not committed")
    reach_bars = json.loads(reach.read_text())
    want = {
        (label, r["task"], r["bar"], r["regime"]): (r["value"], r["target"], r["met"])
        for label, regime in B.BENCHMARKS.items()
        for r in reach_bars[regime]["bars"]
    }
    rows = json.loads(boot.read_text())["rows"]
    got = {
        (r["benchmark"], r["task"], r["bar"], r["regime"]): (r["value"], r["target"], r["met"])
        for r in rows
    }
    assert set(got) == set(want) and len(got) == 44  # every bar, both shift bars included
    for key, (value, target, met) in got.items():
        assert want[key][1:] == (target, met) and value == pytest.approx(want[key][0], abs=1e-3)
