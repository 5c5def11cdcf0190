"""The report of :mod:`benchmarks.exact_ggn_shift_check`: KFAC against the exact GGN on
fine foods' 10-epoch checkpoints, the shift bar and the task's other bars at every prior
width, and the protocol's readings.

    python -m benchmarks.exact_ggn_shift_check --report
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import _common as C
from benchmarks import llm_larger_splits_report as larger_splits_report
from benchmarks import llm_prior_scale_report as scale_report
from benchmarks.exact_ggn_shift_check import NAME, STRUCTURES
from benchmarks.llm_calibration import RESULTS

TITLES = {"kron": "KFAC (the default's posterior)", "exact": "exact GGN (data space)"}


def load(results: Path = RESULTS) -> dict[int, dict]:
    """seed -> the per-seed JSON (fine foods only)."""
    data = larger_splits_report.load(results, prefix=NAME)
    (runs,) = data.values()
    return runs


def per_factor(runs: dict[int, dict], key: str) -> list[float]:
    """Mean over seeds of a per-factor list stored under ``key``."""
    rows = [r[key] for r in runs.values()]
    return [larger_splits_report.mean(list(v)) for v in zip(*rows, strict=True)]


def default_index(values: list[float]) -> int:
    return min(range(len(values)), key=lambda i: abs(values[i] - 1.0))


def readings(runs: dict[int, dict], part: str) -> tuple[dict, list[str]]:
    """Per posterior: AUROC and variance ratio at ``c = 1``, the values meeting each bar
    and all five."""
    out, lines = {}, []
    for s in STRUCTURES:
        values = runs[min(runs)][s]
        i = default_index(values)
        found = scale_report.values_meeting({"fine_foods_mc": runs}, s, part)["tasks"]
        found = found["fine_foods_mc"]
        out[s] = {
            "auroc_default": per_factor(runs, f"{s}_auroc")[i],
            "variance_ratio_default": per_factor(runs, f"{s}_variance_ratio")[i],
            **found,
        }
        bars = "; ".join(
            f"{b}: {scale_report.spans(v, values)}" for b, v in found["per_bar"].items()
        )
        lines += [
            f"- **{TITLES[s]}**: at c = 1, entropy AUROC (shift against test) "
            f"{out[s]['auroc_default']:.3f}, shift / test variance of the logit difference "
            f"{out[s]['variance_ratio_default']:.2f}.",
            f"  - Values of c meeting each bar: {bars}.",
            f"  - **All five: {scale_report.spans(found['all_bars'], values)}.**",
        ]
    return out, lines


def shape_table(runs: dict[int, dict]) -> list[str]:
    """Per factor and posterior: entropy AUROC and the shift / test variance ratio."""
    values = runs[min(runs)]["kron"]
    cols = {f"{s}_{k}": per_factor(runs, f"{s}_{k}") for s in STRUCTURES
            for k in ("auroc", "variance_ratio")}  # fmt: skip
    lines = ["| c | KFAC AUROC | exact AUROC | KFAC var. ratio | exact var. ratio |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for i, v in enumerate(values):
        label = f"**{v:.3g}**" if i == default_index(values) else f"{v:.3g}"
        lines.append(
            f"| {label} | {cols['kron_auroc'][i]:.3f} | {cols['exact_auroc'][i]:.3f} | "
            f"{cols['kron_variance_ratio'][i]:.2f} | {cols['exact_variance_ratio'][i]:.2f} |"
        )
    return lines


def plot(runs: dict[int, dict], path: Path) -> None:
    """Shift NLL minus temperature scaling's and confidence minus accuracy (test) against
    the prior scale, for both posteriors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    part = scale_report.PART
    for s, color in zip(STRUCTURES, ("tab:blue", "tab:red"), strict=True):
        values = runs[min(runs)][s]
        test = [scale_report.split_summary(runs, "test", s, i, part) for i in range(len(values))]
        shift = [scale_report.split_summary(runs, "shift", s, i, part) for i in range(len(values))]
        gap = [100 * (x["la"]["conf"][0] - x["la"]["acc"][0]) for x in test]
        excess = [100 * (x["la"]["nll"][0] - x["temp"]["nll"][0]) for x in shift]
        ax.plot(values, gap, color=color, ls=":", marker=".", label=f"{s}: conf − ACC, test (±5)")
        ax.plot(values, excess, color=color, ls="--", marker=".",
                label=f"{s}: shift NLL − temperature's, ×100 (≤ 0)")  # fmt: skip
    for y in (-5, 0, 5):
        ax.axhline(y, color="grey", lw=0.8, ls="-" if y == 0 else ":")
    ax.set_xscale("log")
    ax.set_ylim(-20, 25)
    ax.set_xlabel("c (prior precisions = c · the default's)")
    ax.set_ylabel("points (means over 3 seeds, 500 examples each)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(results: Path = RESULTS) -> None:
    runs = load(results)
    lines = ["# Is the shift miss KFAC's? KFAC against the exact GGN (test, diagnostic)", "",
             f"`python -m benchmarks.exact_ggn_shift_check`: fine_foods_mc step 80, seeds "
             f"{sorted(runs)}; protocol in the script's docstring. Means over seeds on all 500 "
             "examples per seed (test: reviews; shift: tweets); ECE, ACC and confidence ×100. "
             "Not a method: the grid is scored on test splits.", "",
             "## Readings (all 500 examples per seed)", ""]  # fmt: skip
    out = {}
    out["all"], more = readings(runs, "all")
    lines += more
    out["original"], more = readings(runs, "original")
    lines += ["", "## The same readings on the benchmark's own 100 examples per seed", "", *more]
    lines += ["", "## Shift against test by posterior and prior scale", "", *shape_table(runs)]
    for s in STRUCTURES:
        lines += ["", f"## {TITLES[s]}", "", *scale_report.grid_table(runs, s)]
    C.write_results(NAME, out, "\n".join(lines))
    plot(runs, results / f"{NAME}.png")
    print("\n".join(lines))
