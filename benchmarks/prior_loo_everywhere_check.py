"""Dev study (issue 13): should the leave-one-out prior be the default on adapters that have
NOT memorised their training data too?

The default uses the leave-one-out rule only below a training NLL of 0.01 and the evidence
(``lora_marglik``) above. The three-task benchmark's checkpoints (10 epochs, training NLL
0.05-1.6) all use the evidence, and there the shift bar is missed. The leave-one-out rule
estimates held-out fit from the training data alone, much as temperature scaling does from
validation data, so it may help there too; its premise (a training point's own curvature
is negligible) holds only near memorisation, so it may also harm the early checkpoints.

The runs: each checkpoint of the benchmark (3 tasks × 3 seeds × steps 16 and 80) re-scored
with ``method="leave_one_out"`` against the file's own default prior, same fit and draws::

    python -m benchmarks.llm_rescore_default benchmarks/results/llm_calibration_T_3seeds.json \\
        --method leave_one_out --out benchmarks/results/prior_loo_everywhere_T

**The decision rule, fixed before the runs, on the validation split only** (50 examples per
seed; test and shift numbers are recorded but not used):

1. Overfit checkpoints (step 80, 9): the leave-one-out rule's mean validation NLL is lower
   than the current default's, and lower on at least 5 of 9.
2. Early checkpoints (step 16, 9): its mean validation NLL is at most 1.01 × the default's.

If both hold, ``"leave_one_out"`` becomes the default at every training NLL. If only (1)
holds, the switching threshold becomes the value in :data:`THRESHOLDS` with the lowest mean
validation NLL over all 18 checkpoints (ties: the smallest). Otherwise nothing changes.
This script applies the rule and writes ``prior_loo_everywhere.{json,md}``::

    python -m benchmarks.prior_loo_everywhere_check
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

from benchmarks import _common as C
from benchmarks._common import no_options
from benchmarks.llm_summary import RESULTS, TASKS

PREFIX = "prior_loo_everywhere"
THRESHOLDS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
EARLY, OVERFIT = "16", "80"


def load_rows(prefix: str = PREFIX) -> list[dict]:
    """One row per checkpoint of the re-scored files ``{prefix}_{task}.json`` (or their
    partial files): task, seed, step, training NLL and every split's metrics of ``la`` (the
    candidate) and ``la_previous`` (the file's default), plus MAP/temperature."""
    rows = []
    for task in TASKS:
        path = RESULTS / f"{prefix}_{task}.json"
        if not path.exists():
            path = path.with_suffix(".partial.json")
        if not path.exists():
            continue
        for seed, run in json.loads(path.read_text())["runs"][task].items():
            for step, ckpt in run["checkpoints"].items():
                if "validation" not in ckpt:
                    continue  # not re-scored yet (a partial file)
                rows.append({"task": task, "seed": int(seed), "step": step, **_splits(ckpt)})
    return rows


def _splits(ckpt: dict) -> dict:
    loo = ckpt["_prior"]["la"]  # lora_A spread-matched, every other tensor at one δ_B
    out = {
        "train_nll": ckpt["_train_nll"],
        "seconds": ckpt["_default_s"],
        "loo_delta_b": statistics.mode(loo),
        "previous_delta_b": statistics.mode(ckpt["_prior"]["la_previous"]),
    }
    for split in ("validation", "test", "shift"):
        if split in ckpt:
            out[split] = {m: v for m, v in ckpt[split].items() if not m.startswith("_")}
    return out


def nll(row: dict, method: str, split: str = "validation") -> float:
    return row[split][method]["nll"]


def chosen_nll(row: dict, threshold: float) -> float:
    """Validation NLL of the default with leave-one-out below ``threshold``."""
    return nll(row, "la" if row["train_nll"] < threshold else "la_previous")


def decide(rows: list[dict]) -> dict:
    """Apply the module's rule (validation NLL only)."""
    over = [r for r in rows if r["step"] == OVERFIT]
    early = [r for r in rows if r["step"] == EARLY]
    mean = statistics.fmean
    c1 = mean(nll(r, "la") for r in over) < mean(nll(r, "la_previous") for r in over)
    wins = sum(nll(r, "la") < nll(r, "la_previous") for r in over)
    c1 = c1 and wins >= 5
    ratio = mean(nll(r, "la") for r in early) / mean(nll(r, "la_previous") for r in early)
    c2 = ratio <= 1.01
    by_threshold = {t: mean(chosen_nll(r, t) for r in rows) for t in THRESHOLDS}
    if c1 and c2:
        verdict = "leave_one_out at every training NLL"
    elif c1:
        best = min(by_threshold, key=lambda t: (by_threshold[t], t))
        verdict = f"leave_one_out below a training NLL of {best}"
    else:
        verdict = "no change"
    return {
        "overfit_wins": wins,
        "overfit_n": len(over),
        "condition_1": c1,
        "early_ratio": ratio,
        "condition_2": c2,
        "mean_val_nll_by_threshold": by_threshold,
        "verdict": verdict,
    }


def _cells(row: dict, split: str, method: str) -> str:
    if split not in row:
        return ""
    return C.metric_cell(row[split][method], percent_digits=0)


SPLITS = ("validation", "test", "shift")


def render_report(
    title: str,
    columns: list[str],
    rows: list[dict],
    decision: dict,
    cells: Callable[[dict, str], list[str]],
) -> str:
    """A study's markdown: one table row per checkpoint and split (``cells(row, split)``
    gives its cells), then the decision."""
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        lines += ["| " + " | ".join(cells(r, split)) + " |" for split in SPLITS if split in r]
    lines += ["", "ACC / ECE / NLL / confidence (×100 but NLL).", "", "## Decision", ""]
    lines += [f"- {k}: {v}" for k, v in decision.items()]
    return "\n".join(lines) + "\n"


def write_report(prefix: str, rows: list[dict], decision: dict, markdown: str) -> None:
    """``{prefix}.json`` (rows and decision) and ``{prefix}.md`` under results; prints the
    markdown."""
    out = RESULTS / prefix
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "decision": decision}, indent=1))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def method_cells(r: dict, split: str) -> list[str]:
    """MAP and temperature (validation rows only), the file's default, the candidate."""
    val = split == "validation"
    ref = [_cells(r, split, "map"), _cells(r, split, "temp")] if val else ["", ""]
    return [*ref, _cells(r, split, "la_previous"), _cells(r, split, "la")]


def _row_cells(r: dict, split: str) -> list[str]:
    head = [r["task"], str(r["seed"]), r["step"], f"{r['train_nll']:.3f}", split]
    return [*head, *method_cells(r, split), f"{r['loo_delta_b']:.3g}", f"{r['seconds']:.0f}"]


def render(rows: list[dict], decision: dict) -> str:
    columns = [
        "task", "seed", "step", "train NLL", "split", "MAP", "temperature",
        "default (evidence)", "leave-one-out", "LOO δ_B", "LOO s",
    ]  # fmt: skip
    title = "The leave-one-out prior on unmemorised checkpoints"
    return render_report(title, columns, rows, decision, _row_cells)


def main() -> None:
    rows = load_rows()
    decision = decide(rows)
    write_report(PREFIX, rows, decision, render(rows, decision))


if __name__ == "__main__":
    no_options(__doc__)
    main()
