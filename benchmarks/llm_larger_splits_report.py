"""The report of :mod:`benchmarks.llm_larger_splits_check`: per-seed and mean metrics on the
larger splits, and its three pre-registered readings.

    python -m benchmarks.llm_larger_splits_check --report
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks._common import no_options
from benchmarks.llm_calibration import RESULTS

METHODS = ("map", "temp", "la")
NAMES = {"map": "MAP", "temp": "temperature (validation)", "la": "**default**"}


def load(results: Path = RESULTS, prefix: str = "llm_larger_splits") -> dict[str, dict[int, dict]]:
    """task -> seed -> the per-seed JSON of a check (``{prefix}_{task}_seed{seed}.json``)."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(results.glob(f"{prefix}_*_seed*.json")):
        r = json.loads(path.read_text())
        out.setdefault(r["task"], {})[r["seed"]] = r
    return out


def mean(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).mean())


def split_table(runs: dict[int, dict], split: str) -> list[str]:
    """Per seed and mean: ACC / ECE / NLL / conf of each method on the original 100, the
    fresh examples and all."""
    lines = ["| seed | part | n | " + " | ".join(NAMES[m] for m in METHODS) + " |"]
    lines.append("| --- " * (3 + len(METHODS)) + "|")
    for part in ("original", "fresh", "all"):
        for seed in [*sorted(runs), "mean"]:
            seeds = sorted(runs) if seed == "mean" else [seed]
            cells = []
            for m in METHODS:
                rows = [runs[s][split][m][part] for s in seeds]
                acc, ece, nll, conf = (
                    mean([r[k] for r in rows]) for k in ("acc", "ece", "nll", "conf")
                )
                cells.append(f"{100 * acc:.1f} / {100 * ece:.1f} / {nll:.3f} / {100 * conf:.0f}")
            n = runs[seeds[0]][split]["map"][part]["n"]
            lines.append(f"| {seed} | {part} | {n} | " + " | ".join(cells) + " |")
    return lines


def readings(data: dict[str, dict[int, dict]]) -> tuple[dict, list[str]]:
    """The protocol's readings (a), (b), (c) as numbers and as markdown bullets."""
    out, lines = {}, []
    if "bbc_headlines_mc" in data:
        runs = data["bbc_headlines_mc"]
        diff = [100 * (r["test"]["la"]["fresh"]["acc"] - r["test"]["map"]["fresh"]["acc"])
                for r in runs.values()]  # fmt: skip
        out["a_bbc_acc_diff_fresh"] = diff
        verdict = "sampling noise" if mean(diff) >= -1 else "a real loss of accuracy"
        lines.append(
            f"- **(a) BBC accuracy, fresh test examples:** default − MAP = "
            f"{' / '.join(f'{d:+.1f}' for d in diff)} points per seed, mean {mean(diff):+.2f} "
            f"(bar: ≥ −1). Reading: the miss on 100 examples was {verdict}."
        )
    if "fine_foods_mc" in data:
        runs = data["fine_foods_mc"]
        nll = {m: [r["shift"][m]["all"]["nll"] for r in runs.values()] for m in METHODS}
        out["b_shift_nll_all"] = nll
        met = "met" if mean(nll["la"]) <= mean(nll["temp"]) else "missed"
        lines.append(
            f"- **(b) Shift bar, all {runs[min(runs)]['shift']['map']['all']['n']} shift "
            f"examples per seed:** default NLL {' / '.join(f'{v:.3f}' for v in nll['la'])} "
            f"(mean {mean(nll['la']):.3f}) against temperature scaling's "
            f"{' / '.join(f'{v:.3f}' for v in nll['temp'])} (mean {mean(nll['temp']):.3f}): "
            f"{met}."
        )
        test = {m: mean([r["test"][m]["all"]["nll"] for r in runs.values()]) for m in METHODS}
        lines.append(
            "  - For reference, the in-domain test NLL (all examples, mean over seeds): "
            + ", ".join(f"{NAMES[m].strip('*')} {v:.3f}" for m, v in test.items())
            + "."
        )
        lines += oracle_lines(runs, mean(nll["temp"]), out)
    return out, lines


def oracle_lines(runs: dict[int, dict], temp_nll: float, out: dict) -> list[str]:
    """Reading (c): the lowest shift NLL any grid value reaches (a diagnostic on test)."""
    lines = []
    for grid, what in (("factor", "c · default prior"), ("delta_b", "one δ for all lora_B")):
        curves = torch.tensor([r["shift"]["_grid"][f"{grid}_nll"] for r in runs.values()])
        values = runs[min(runs)]["shift"]["_grid"][grid]
        per_seed = curves.min(1)
        best = int(curves.mean(0).argmin())
        out[f"c_{grid}"] = {
            "per_seed_min": per_seed.values.tolist(),
            "per_seed_argmin": [values[i] for i in per_seed.indices.tolist()],
            "common_min": float(curves.mean(0)[best]),
            "common_argmin": values[best],
        }
        test_curves = torch.tensor([r["test"]["_grid"][f"{grid}_nll"] for r in runs.values()])
        out[f"c_{grid}"]["test_nll_at_common_argmin"] = float(test_curves.mean(0)[best])
        verdict = "below" if float(curves.mean(0)[best]) <= temp_nll else "above"
        lines.append(
            f"- **(c) Diagnostic, {what}, chosen on the shift split itself:** per-seed "
            f"minimum {' / '.join(f'{v:.3f}' for v in per_seed.values.tolist())} (at "
            f"{' / '.join(f'{values[i]:.3g}' for i in per_seed.indices.tolist())}); one value "
            f"for all seeds: {float(curves.mean(0)[best]):.3f} at {values[best]:.3g}, "
            f"{verdict} temperature scaling's {temp_nll:.3f}; the in-domain test NLL there: "
            f"{float(test_curves.mean(0)[best]):.3f}."
        )
        lines.append(
            bar_range(values, curves.mean(0), test_curves.mean(0), temp_nll, out[f"c_{grid}"])
        )
    return lines


def bar_range(values, shift_nll, test_nll, temp_nll: float, out: dict) -> str:
    """Where on a grid the seed-mean shift NLL ``shift_nll`` meets temperature scaling's,
    and the seed-mean in-domain test NLL ``test_nll`` there."""
    ok = [i for i in range(len(values)) if float(shift_nll[i]) <= temp_nll]
    if not ok:
        return "  - No value on this grid meets the shift bar."
    i = max(ok, key=lambda j: values[j])  # the narrowest prior that meets it
    out["narrowest_meeting_bar"] = {"value": values[i], "test_nll": float(test_nll[i])}
    return (
        f"  - The narrowest prior on this grid that meets the shift bar: {values[i]:.3g}; "
        f"there the in-domain test NLL is {float(test_nll[i]):.3f}."
    )


def grid_plot(runs: dict[int, dict], path: Path) -> None:
    """Mean NLL over seeds against the prior grids, shift and test, with temperature
    scaling's NLL on each split for reference (the diagnostic of reading (c))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    grids = (("factor", "factor c on the default's prior precisions"),
             ("delta_b", "one prior precision δ_B for every lora_B"))  # fmt: skip
    for ax, (grid, label) in zip(axes, grids, strict=True):
        values = runs[min(runs)]["shift"]["_grid"][grid]
        for split, colour in (("shift", "tab:red"), ("test", "tab:blue")):
            curves = torch.tensor([r[split]["_grid"][f"{grid}_nll"] for r in runs.values()])
            ax.plot(values, curves.mean(0), color=colour, marker=".", label=f"Laplace, {split}")
            temp = mean([r[split]["temp"]["all"]["nll"] for r in runs.values()])
            ax.axhline(temp, color=colour, ls="--", label=f"temperature, {split}")
        if grid == "factor":
            ax.axvline(1.0, color="grey", ls=":", label="the default (c = 1)")
        ax.set(xscale="log", xlabel=label + " (wider ←  → narrower)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("NLL, mean over seeds (500 examples per split)")
    axes[0].legend(fontsize=8)
    fig.suptitle("fine_foods_mc, step 80: NLL against the prior's scale (diagnostic on test)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    data = load()
    numbers, bullets = readings(data)
    lines = [
        "# The 10-epoch overfit checkpoints on larger splits (step 80, 64 training examples)",
        "",
        "`python -m benchmarks.llm_larger_splits_check`: each split's 100 examples of the "
        "benchmark ('original') plus examples no split of that seed used ('fresh'). "
        "Cells: ACC / ECE / NLL / confidence (ECE, ACC and confidence ×100). The default is "
        "`optimize_prior_precision()` with joint MC (1000 draws).",
        "",
        "## Readings (protocol in the script's docstring)",
        "",
        *bullets,
    ]
    for task, runs in data.items():
        for split in ("test", "shift"):
            if split in runs[min(runs)]:
                lines += ["", f"## {task}, {split}", "", *split_table(runs, split)]
    wall = {f"{t} seed {s}": round(r["wall_s"]) for t, rs in data.items() for s, r in rs.items()}
    lines += ["", f"Wall seconds per checkpoint (3 processes on 2 cores): {wall}."]
    if "fine_foods_mc" in data:
        grid_plot(data["fine_foods_mc"], RESULTS / "llm_larger_splits_prior_grid.png")
        lines += ["", "![NLL against the prior scale](llm_larger_splits_prior_grid.png)"]
    (RESULTS / "llm_larger_splits.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "llm_larger_splits.json").write_text(json.dumps(numbers, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    no_options(__doc__)
    main()
