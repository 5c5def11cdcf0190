"""Issue 13's bars where its user measured the failure: adapters that have memorised their
training data (training NLL ≪ 0.01), 3 seeds per task, on test splits.

The three-task benchmark's overfit checkpoints (10 epochs) stop at a training NLL of
0.05-0.7, where the default uses the evidence. Trained for 30 epochs (240 steps of batch 8
on the same 64 training examples and splits), the MAP memorises, and the default switches
to a training-data rule (the leave-one-out rule; the function-space rule before it, kept
as ``la_previous`` by :mod:`benchmarks.llm_rescore_default`). Each task and seed is one
``llm_calibration`` run (one process, so two can share the machine)::

    python -m benchmarks.llm_calibration --tasks T --seeds S --steps 240 --early 0 \\
        --no-baselines --no-diag --threads 1 [--shift] \\
        --run-name 'memo240-{task}-seed{seed}' --out benchmarks/results/llm_memorised_T_seedS

This script merges the per-seed files of each task into ``llm_memorised_<task>_3seeds.{json,md}``,
checks the bars (:mod:`benchmarks.llm_bars`) into ``llm_memorised_bars.{json,md}`` and adds a
per-seed table (training NLL, the rule the default chose, the default's and temperature
scaling's test numbers)::

    python -m benchmarks.llm_memorised
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import _common as C
from benchmarks import llm_bars
from benchmarks import llm_calibration as calib
from benchmarks._common import no_options
from benchmarks.llm_summary import RESULTS, TASKS
from laplace_lora_ext.posterior.tuning import SATURATED_TRAIN_NLL

PREFIX = "llm_memorised"
#: The per-seed table's method columns (a column no seed has is left out).
COLUMNS = {
    "map": "MAP",
    "temp": "temperature",
    "la": "default",
    "la_previous": "previous default (function space)",
    "la_marglik": "plain marglik",
    "la_val": "validation grid",
}


def seed_files(task: str, prefix: str = PREFIX) -> list[Path]:
    """The task's per-seed result files, by seed."""
    paths = RESULTS.glob(f"{prefix}_{task}_seed*.json")
    return sorted(paths, key=lambda p: int(re.search(r"seed(\d+)", p.stem).group(1)))


def merge_seeds(paths: list[Path]) -> dict:
    """One ``llm_calibration`` payload from per-seed payloads (runs combined, summary redone)."""
    payloads = [json.loads(p.read_text()) for p in paths]
    runs: dict = {}
    for payload in payloads:
        for task, per_seed in payload["runs"].items():
            runs.setdefault(task, {}).update(per_seed)
    args = dict(payloads[0]["args"])
    args["seeds"] = sorted(int(s) for per_seed in runs.values() for s in per_seed)
    wall = sum(p.get("wall_s", 0.0) for p in payloads)
    return {"args": args, "runs": runs, "summary": calib.summarize(runs), "wall_s": wall}


def final_tests(payload: dict) -> list[dict]:
    """The test-split rows of every run's last checkpoint."""
    return [
        run["checkpoints"][max(run["checkpoints"], key=int)]["test"]
        for per_seed in payload["runs"].values()
        for run in per_seed.values()
    ]


def per_seed_rows(payload: dict, methods: list[str]) -> list[str]:
    """Markdown rows: task, seed, MAP training NLL, the default's rule, test numbers of
    ``methods``."""
    rows = []
    for task, per_seed in payload["runs"].items():
        for seed, run in sorted(per_seed.items(), key=lambda kv: int(kv[0])):
            step = max(run["checkpoints"], key=int)
            ckpt = run["checkpoints"][step]
            nll = ckpt["_train_nll"]
            rule = "leave-one-out" if nll < SATURATED_TRAIN_NLL else "evidence"
            test = ckpt["test"]
            cells = [
                C.metric_cell(test[m], percent_digits=0) if m in test else "–" for m in methods
            ]
            rows.append(
                f"| {task} | {seed} | {nll:.1e} | {rule} | {ckpt['_temperature']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    return rows


def main(
    prefix: str = PREFIX,
    tasks: tuple[str, ...] = TASKS,
    title: str = "Issue 13's bars at memorisation",
    previous: str = COLUMNS["la_previous"],
) -> None:
    """Merge each task's per-seed ``{prefix}_{task}_seedS`` files, check the bars and add a
    per-seed table; ``previous`` names the files' ``la_previous`` column there."""
    labels = {**COLUMNS, "la_previous": previous}
    merged, payloads = [], []
    for task in tasks:
        paths = seed_files(task, prefix)
        if not paths:
            continue
        payload = merge_seeds(paths)
        dest = RESULTS / f"{prefix}_{task}_3seeds"
        dest.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
        dest.with_suffix(".md").write_text(calib.render(payload["summary"], payload["args"]))
        merged.append(str(dest.with_suffix(".json")))
        payloads.append(payload)
    tests = [t for payload in payloads for t in final_tests(payload)]
    methods = [m for m in COLUMNS if any(m in t for t in tests)]
    rows = [row for payload in payloads for row in per_seed_rows(payload, methods)]
    out = RESULTS / f"{prefix}_bars"
    llm_bars.main([*merged, "--out", str(out)])
    table = [
        "",
        "## Per seed, test: ACC / ECE / NLL / conf",
        "",
        "| task | seed | MAP train NLL | default's rule | T | "
        + " | ".join(labels[m] for m in methods)
        + " |",
        "| --- |" + " --- |" * (4 + len(methods)),
        *rows,
    ]
    md = out.with_suffix(".md")
    text = md.read_text().replace("Issue 13's bars", title, 1)
    md.write_text(text + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    no_options(__doc__)
    main()
