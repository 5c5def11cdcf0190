"""The report of :mod:`benchmarks.llm_prior_scale_check`: issue 13's 10-epoch bars at every
prior width of its two grids, and the protocol's readings.

    python -m benchmarks.llm_prior_scale_check --report
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import _common as C
from benchmarks import llm_bars
from benchmarks import llm_larger_splits_report as larger_splits_report
from benchmarks.llm_calibration import RESULTS

METRICS = ("acc", "ece", "nll", "brier", "conf")
GRIDS = {"factor": "c · the default's precisions", "delta_b": "one δ_B for every lora_B"}
PART = "all"  # the readings' part; "original" (the benchmark's 100) is reported alongside


def load(results: Path = RESULTS) -> dict[str, dict[int, dict]]:
    """task -> seed -> the per-seed JSON of the check."""
    return larger_splits_report.load(results, prefix="llm_prior_scale")


def seed_mean(rows: list[dict]) -> dict[str, tuple[float]]:
    """Mean over seeds of each metric, as ``llm_bars`` reads it (``metric -> (mean,)``)."""
    return {k: (larger_splits_report.mean([r[k] for r in rows]),) for k in METRICS}


def split_summary(runs: dict[int, dict], split: str, grid: str, i: int, part: str) -> dict:
    """``method -> metric -> (mean,)`` for MAP, temperature and the ``i``-th grid value."""
    return {
        "map": seed_mean([r[split]["map"][part] for r in runs.values()]),
        "temp": seed_mean([r[split]["temp"][part] for r in runs.values()]),
        "la": seed_mean([r[split][grid][i][part] for r in runs.values()]),
    }


def bars_at(runs: dict[int, dict], grid: str, i: int, part: str = PART) -> list[dict]:
    """Issue 13's overfit bars (and the shift bar where there is a shift split) at value
    ``i`` of ``grid``, on the means over seeds."""
    rows = llm_bars.overfit_bars(split_summary(runs, "test", grid, i, part))
    if all("shift" in r for r in runs.values()):
        rows += llm_bars.shift_bars(split_summary(runs, "shift", grid, i, part))
    return rows


def values_meeting(data: dict[str, dict[int, dict]], grid: str, part: str = PART) -> dict:
    """Per task: grid values at which each bar holds and at which all hold; and the values
    at which every bar of every task holds."""
    out: dict = {"tasks": {}}
    common = None
    for task, runs in data.items():
        values = runs[min(runs)][grid]
        per_bar: dict[str, list[float]] = {}
        every = []
        for i, v in enumerate(values):
            rows = bars_at(runs, grid, i, part)
            for b in rows:
                per_bar.setdefault(b["bar"], [])
                if b["met"]:
                    per_bar[b["bar"]].append(v)
            if all(b["met"] for b in rows):
                every.append(v)
        out["tasks"][task] = {"per_bar": per_bar, "all_bars": every}
        common = set(every) if common is None else common & set(every)
    out["every_task"] = sorted(common or [])
    return out


def spans(values: list[float], grid: list[float]) -> str:
    """Grid values as runs of neighbours, e.g. ``0.01–0.316, 100``; ``none`` if empty."""
    if not values:
        return "none"
    idx = sorted(grid.index(v) for v in values)
    runs, start = [], idx[0]
    for a, b in zip(idx, [*idx[1:], None], strict=True):
        if b != a + 1:
            runs.append(f"{grid[start]:.3g}" + ("" if a == start else f"–{grid[a]:.3g}"))
            if b is not None:
                start = b
    return ", ".join(runs)


def reading_lines(data: dict[str, dict[int, dict]], part: str) -> tuple[dict, list[str]]:
    """The readings, per grid, as numbers and markdown bullets."""
    out, lines = {}, []
    for grid, what in GRIDS.items():
        found = values_meeting(data, grid, part)
        out[grid] = found
        first = next(iter(data.values()))
        values = first[min(first)][grid]
        lines.append(f"- **{what}** ({len(values)} values, {values[0]:.3g} … {values[-1]:.3g}):")
        for task, r in found["tasks"].items():
            bars = "; ".join(f"{b}: {spans(v, values)}" for b, v in r["per_bar"].items())
            lines.append(f"  - {task}: {bars}. **All of them: {spans(r['all_bars'], values)}.**")
        lines.append(f"  - Every bar of every task: **{spans(found['every_task'], values)}**.")
    return out, lines


def grid_table(runs: dict[int, dict], grid: str, part: str = PART) -> list[str]:
    """Means over seeds at each value: test ACC / ECE / NLL / conf (shift NLL), bars met."""
    shift = all("shift" in r for r in runs.values())
    head = "| value | test ACC / ECE / NLL / conf |" + (" shift NLL |" if shift else "")
    lines = [head + " bars met | missed |", "| --- " * (4 + shift) + "|"]
    ref = split_summary(runs, "test", grid, 0, part)
    for name in ("map", "temp"):
        m = {k: v[0] for k, v in ref[name].items()}
        cells = _cells(m) + (
            f" {split_summary(runs, 'shift', grid, 0, part)[name]['nll'][0]:.3f} |" if shift else ""
        )
        lines.append(f"| {'MAP' if name == 'map' else 'temperature (val.)'} |{cells} | |")
    default_i = None
    if grid == "factor":
        default_i = min(range(len(runs[min(runs)][grid])),
                        key=lambda i: abs(runs[min(runs)][grid][i] - 1.0))  # fmt: skip
    for i, v in enumerate(runs[min(runs)][grid]):
        s = split_summary(runs, "test", grid, i, part)
        m = {k: val[0] for k, val in s["la"].items()}
        cells = _cells(m)
        if shift:
            cells += f" {split_summary(runs, 'shift', grid, i, part)['la']['nll'][0]:.3f} |"
        rows = bars_at(runs, grid, i, part)
        missed = ", ".join(b["bar"] for b in rows if not b["met"])
        label = f"**{v:.3g} (default)**" if i == default_i else f"{v:.3g}"
        n_met = sum(b["met"] for b in rows)
        lines.append(f"| {label} |{cells} {n_met} of {len(rows)} | {missed} |")
    return lines


def _cells(m: dict) -> str:
    return f" {C.metric_cell(m)} |"


def reproduction_lines(data: dict[str, dict[int, dict]], results: Path) -> list[str]:
    """MAP on the same examples against ``llm_larger_splits``' files (same checkpoints?)."""
    diffs = []
    for task, runs in data.items():
        for seed, r in runs.items():
            path = results / f"llm_larger_splits_{task}_seed{seed}.json"
            if path.exists():
                old = json.loads(path.read_text())
                for split in ("test", "shift"):
                    if split in r and split in old:
                        a, b = r[split]["map"][PART], old[split]["map"][PART]
                        diffs.append((task, seed, split, abs(a["nll"] - b["nll"]),
                                      abs(a["acc"] - b["acc"])))  # fmt: skip
    if not diffs:
        return []
    worst = max(diffs, key=lambda d: d[3])
    return [f"- Same checkpoints as `llm_larger_splits`: MAP's NLL on the same examples differs "
            f"by at most {worst[3]:.2g} ({worst[0]} seed {worst[1]}, {worst[2]}), its accuracy "
            f"by at most {100 * max(d[4] for d in diffs):.2g} points."]  # fmt: skip


def plot(data: dict[str, dict[int, dict]], path: Path) -> None:
    """Per grid, the curves behind the conflicting bars: accuracy minus MAP's, confidence
    minus accuracy and (with a shift split) shift NLL minus temperature scaling's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (grid, what) in zip(axes, GRIDS.items(), strict=True):
        for task, runs in data.items():
            values = runs[min(runs)][grid]
            s = [split_summary(runs, "test", grid, i, PART) for i in range(len(values))]
            acc = [100 * (x["la"]["acc"][0] - x["map"]["acc"][0]) for x in s]
            gap = [100 * (x["la"]["conf"][0] - x["la"]["acc"][0]) for x in s]
            ax.plot(values, acc, marker=".", label=f"{task}: ACC − MAP's (≥ −1)")
            ax.plot(values, gap, marker=".", ls=":", label=f"{task}: conf − ACC (±5)")
            if all("shift" in r for r in runs.values()):
                sh = [split_summary(runs, "shift", grid, i, PART) for i in range(len(values))]
                excess = [100 * (x["la"]["nll"][0] - x["temp"]["nll"][0]) for x in sh]
                ax.plot(values, excess, marker=".", ls="--",
                        label=f"{task}: shift NLL − temperature's, ×100 (≤ 0)")  # fmt: skip
        for y in (-5, -1, 0, 5):
            ax.axhline(y, color="grey", lw=0.8, ls="-" if y == 0 else ":")
        ax.set_ylim(-15, 25)
        ax.set_xscale("log")
        ax.set_xlabel(what)
        ax.set_ylabel("points (means over seeds, 500 examples each)", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(results: Path = RESULTS) -> None:
    data = load(results)
    out, lines = {}, ["# Could any prior width meet every 10-epoch bar? (test, diagnostic)", ""]
    seeds = {t: sorted(r) for t, r in data.items()}
    lines += [f"`python -m benchmarks.llm_prior_scale_check`: seeds {seeds}; protocol in the "
              "script's docstring. Means over seeds on all 500 examples per seed; ECE, ACC "
              "and confidence ×100. Not a method: the grids are scored on test splits.", "",
              "## Readings (all 500 examples per seed)", ""]  # fmt: skip
    out["all"], readings = reading_lines(data, "all")
    lines += readings
    out["original"], readings = reading_lines(data, "original")
    lines += ["", "## The same readings on the benchmark's own 100 examples per seed", ""]
    lines += readings
    lines += ["", *reproduction_lines(data, results)]
    for task, runs in data.items():
        for grid, what in GRIDS.items():
            lines += ["", f"## {task}: {what}", "", *grid_table(runs, grid)]
    (results / "llm_prior_scale.json").write_text(json.dumps(out, indent=1))
    (results / "llm_prior_scale.md").write_text("\n".join(lines) + "\n")
    plot(data, results / "llm_prior_scale.png")
    print("\n".join(lines))
