"""``benchmarks.llm_status``: the bars of today's default, read from committed results."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import llm_status as S


def _bar(name: str, met: bool, value: float = 1.0) -> dict:
    return {"bar": name, "value": value, "target": "≤ 2", "met": met}


def _payloads() -> dict[str, dict]:
    before = {"before": {"value": 0.5, "met": True}}
    ten = {
        "10epochs": {
            "bars": [
                {"task": "a", "regime": "early", **_bar("e", True), **before},
                {"task": "a", "regime": "overfit", **_bar("o", True), **before},
                {"task": "a", "regime": "shift", **_bar("shift", False, 3.5), **before},
            ]
        },
        "memorised": {
            "bars": [
                {"task": "a", "regime": "overfit", **_bar("acc", True), **before},
                {"task": "a", "regime": "shift", **_bar("shift", False), **before},
            ]
        },
        "heldout-memorised": {
            "bars": [{"task": "h", "regime": "overfit", **_bar("acc", True), **before}]
        },
        "heldout-early": {
            "bars": [{"task": "h", "regime": "early", **_bar("ece", True), **before}]
        },
    }
    # every regime re-run with today's code: one file
    assert {s.file for s in S.SOURCES} == {S.REACH_FILE}
    return {S.REACH_FILE: ten}


def test_summary_reads_each_sources_own_rows_and_counts_the_misses():
    summary = S.summarize(_payloads())
    counts = [(b["met"], b["bars"]) for b in summary["benchmarks"]]
    # each regime of kfac_reach_bars.json reads its own rows only
    assert counts == [(2, 3), (1, 2), (1, 1), (1, 1)]
    assert (summary["met"], summary["bars"]) == (5, 7)
    (missed,) = summary["benchmarks"][0]["missed"]
    assert (missed["task"], missed["regime"], missed["bar"]) == ("a", "shift", "shift")
    assert "before" not in missed  # the committed value it is compared with stays out
    (missed,) = summary["benchmarks"][1]["missed"]
    assert missed["regime"] == "memorised shift"  # the status' name for the checkpoint
    table = S.render(summary)
    assert "a shift, shift: 3.5 (target ≤ 2)" in table and "a memorised shift, shift" in table
    assert "| 2 of 3 |" in table and table.endswith("5 of 7 bars met with today's default.\n")


def test_a_source_without_bars_is_an_error_not_a_perfect_score():
    payloads = _payloads()
    payloads[S.REACH_FILE]["heldout-memorised"]["bars"] = []
    with pytest.raises(ValueError, match="kfac_reach_bars.json has no bars for '2 held-out"):
        S.summarize(payloads)


def _committed_reach() -> dict:
    path = S.RESULTS / S.REACH_FILE
    if not path.exists():
        pytest.skip("results not committed")
    return json.loads(path.read_text())


def _committed_summary() -> dict:
    return S.summarize({S.REACH_FILE: _committed_reach()})


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md"])
def test_the_pages_quote_the_committed_status(page):
    summary = _committed_summary()
    text = (S.ROOT / page).read_text()
    block = re.search(r"<!-- status:start -->\n(.*?)<!-- status:end -->", text, flags=re.S)
    assert block is not None, f"{page} lacks the status markers"
    assert block.group(1) == S.render(summary)
    committed = json.loads((S.RESULTS / f"{S.NAME}.json").read_text())
    assert {k: v for k, v in committed.items() if k in summary} == summary


def _seed(acc: float, nll: float) -> dict:
    metrics = {"acc": acc, "ece": 0.1, "nll": nll, "conf": 0.5}
    return {"test": {m: dict(metrics) for m in S.MEMORISED_METHODS}}


def test_memorised_means_average_seeds_in_points_but_nll():
    means = S.memorised_means({"t": [_seed(0.6, 1.0), _seed(0.7, 2.0)]})
    cell = means["la"]["t"]
    assert cell["acc"] == pytest.approx(65.0) and cell["nll"] == pytest.approx(1.5)
    assert cell["seeds"] == 2
    assert "| **Laplace-LoRA, default** | 65.0 / 10.0 / 1.500 / 50 |" in S.render_memorised(means)


def test_readme_quotes_the_committed_memorised_means():
    per_seed = S._memorised_per_seed(_committed_reach())
    if not all(per_seed.values()):
        pytest.skip("results not committed")
    text = (S.ROOT / "README.md").read_text()
    block = re.search(r"<!-- memorised-now:start -->\n(.*?)<!-- memorised-now:end -->", text, re.S)
    assert block is not None and block.group(1) == S.render_memorised(S.memorised_means(per_seed))


def _one_seed(acc: float, conf: float) -> dict:
    map_ = {"acc": [0.6], "ece": [0.3], "nll": [2.0], "conf": [0.95]}
    temp = {"acc": [0.6], "ece": [0.05], "nll": [0.7], "conf": [0.6]}
    default = {"acc": [acc], "ece": [0.05], "nll": [0.7], "conf": [conf]}
    return {"map": map_, "temp": temp, "default": default}


def test_per_seed_bars_count_each_seed_and_name_the_defaults_misses():
    tests = {"b": [_one_seed(0.6, 0.6), _one_seed(0.55, 0.6), _one_seed(0.6, 0.4)]}
    (row,) = S.per_seed_bars(tests)
    assert row["seeds"] == 3 and row["default"] == [10, 12] and row["temp"] == [12, 12]
    assert row["default_missed"] == {
        "ACC within 1 point of MAP": 1,
        "conf within 5 points of ACC": 1,
    }
    assert (
        "| b | 3 | 10 of 12 | 12 of 12 | ACC within 1 point of MAP: 1; conf"
        in S.render_per_seed([row])
    )


def test_as_summary_wraps_one_seeds_metrics_and_renames_the_methods():
    out = S._as_summary({"la": {"acc": 0.5, "nll": 0.7}, "x": {}}, {"la": "default"})
    assert out == {"default": {"acc": [0.5], "nll": [0.7]}}


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md"])
def test_the_pages_quote_the_committed_per_seed_bars(page):
    tests = S.seed_tests(_committed_reach())
    if not all(tests.values()):
        pytest.skip("results not committed")
    text = (S.ROOT / page).read_text()
    block = re.search(r"<!-- status-seeds:start -->\n(.*?)<!-- status-seeds:end -->", text, re.S)
    assert block is not None and block.group(1) == S.render_per_seed(S.per_seed_bars(tests))


def _reach_seed(task: str, seed: int) -> dict:
    return {"task": task, "seed": seed, "step": 240, "la_previous": {}} | {
        m: {"acc": seed / 10} for m in S.MEMORISED_METHODS
    }


def test_memorised_per_seed_reads_the_reach_bars_seeds_by_task_in_seed_order():
    seeds = [
        _reach_seed("bbc_headlines_mc", 1),
        _reach_seed("fine_foods_mc", 0),
        _reach_seed("bbc_headlines_mc", 0),
    ]
    out = S._memorised_per_seed({"memorised": {"seeds": seeds}})
    assert [len(out[t]) for t in S.MEMORISED_TASKS] == [1, 0, 2]
    assert [p["test"]["la"]["acc"] for p in out["bbc_headlines_mc"]] == [0.0, 0.1]
    assert set(out["fine_foods_mc"][0]["test"]) == set(S.MEMORISED_METHODS)


def test_seed_tests_read_both_memorised_regimes_as_one_seed_summaries():
    reach = {
        "memorised": {"seeds": [_reach_seed("a", 1), _reach_seed("a", 0)]},
        "heldout-memorised": {"seeds": [_reach_seed("h", 2)]},
    }
    tests = S.seed_tests(reach)
    assert list(tests) == ["3 tasks, memorised", "2 held-out tasks, memorised"]
    memorised, heldout = tests.values()
    assert [t["default"]["acc"] for t in memorised] == [[0.1], [0.0]]  # the file's order
    assert heldout == [{"map": {"acc": [0.2]}, "temp": {"acc": [0.2]}, "default": {"acc": [0.2]}}]
