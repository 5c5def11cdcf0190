"""Rebuild the quoted tables of the causal calibration benchmark from committed results.

Reads ``results/llm_calibration_<task>_3seeds.json`` (one per task), every
``results/llm_baselines_<task>_seed<s>.json`` (deep ensembles, one file per task and seed)
and ``results/llm_blob_tuned_<task>_seed<s>.json`` (BLoB and the zero-shot model;
:func:`baseline_runs`), then writes

* ``results/llm_calibration_<task>_3seeds_all.{json,md}`` where baselines exist (the
  ``llm_calibration`` run with their methods merged in; see :func:`llm_baselines.merge`);
* ``results/llm_calibration_bars.{json,md}`` (:mod:`benchmarks.llm_bars`, on the merged runs);
* the methods × tasks table between ``<!-- readme-summary:start/end -->`` in README.md and
  the bars and tables between ``<!-- bars:start/end -->`` in docs/benchmarks.md.

    python -m benchmarks.llm_summary

Prose stays outside the markers and is edited by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import llm_bars
from benchmarks import llm_calibration as calib
from benchmarks._common import no_options
from benchmarks.llm_baselines import merge

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("fine_foods_mc", "tweet_sentiment_mc", "bbc_headlines_mc")
LABELS = {
    "map": "MAP",
    "temp": "temperature scaling (validation)",
    "la": "**Laplace-LoRA, default (no validation)**",
    "la_probit": "LA, probit",
    "la_marglik": "LA, plain marglik",
    "la_val": "LA, validation grid",
    "la_diag": "LA, diagonal",
    "la_last": "LA, last block",
    "mc_dropout": "MC dropout",
    "ckpt_ens": "checkpoint ensemble",
    "deep_ens": "deep ensemble (M=3)",
    "blob": "BLoB (KL lr chosen on validation)",
    "zero_shot": "zero-shot base model (no fine-tuning)",
}


def merged_run(task: str) -> Path | None:
    """The task's results JSON, with its baselines merged in (``_all``) where there are any."""
    path = RESULTS / f"llm_calibration_{task}_3seeds.json"
    if not path.exists():
        return None
    payload = baseline_runs(task)
    if not payload["runs"]:
        return path
    merged = merge(json.loads(path.read_text()), payload)
    dest = path.with_name(path.stem + "_all")
    dest.with_suffix(".json").write_text(json.dumps(merged, indent=1, default=str))
    dest.with_suffix(".md").write_text(calib.render(merged["summary"], merged["args"]))
    return dest.with_suffix(".json")


def baseline_runs(task: str) -> dict:
    """``{"runs": task -> seed -> run}`` of the task's training-time baselines: the
    ``llm_baselines`` files (deep ensemble, BLoB's first runs) with the ``llm_blob_tuned``
    files' ``blob`` and ``zero_shot`` rows merged over them per checkpoint (its BLoB where
    there is one; the costs likewise)."""
    runs: dict = {}
    for path in sorted(RESULTS.glob(f"llm_baselines_{task}_seed*.json")):
        for t, per_seed in json.loads(path.read_text())["runs"].items():
            for seed, run in per_seed.items():
                runs.setdefault(t, {})[seed] = run
    for path in sorted(RESULTS.glob(f"llm_blob_tuned_{task}_seed*.json")):
        for t, per_seed in json.loads(path.read_text())["runs"].items():
            for seed, run in per_seed.items():
                target = runs.setdefault(t, {}).setdefault(seed, {"checkpoints": {}, "cost": {}})
                for step, methods in run["checkpoints"].items():
                    target["checkpoints"].setdefault(step, {}).update(methods)
                target["cost"].update(run["cost"])
    return {"runs": runs}


def methods_table(summaries: dict[str, dict]) -> str:
    """Overfit checkpoint, test: ``ACC / ECE / NLL`` per method (named, in ``LABELS`` order)
    and task (:func:`llm_bars.method_cells`)."""
    tasks = list(summaries)
    cells = llm_bars.method_cells(summaries)
    rows = ["| method | " + " | ".join(f"`{t}`" for t in tasks) + " |"]
    rows.append("| --- |" + " --- |" * len(tasks))
    for method, label in LABELS.items():
        if method in cells:
            rows.append(
                f"| {label} | " + " | ".join(cells[method].get(t, "") for t in tasks) + " |"
            )
    return "\n".join(rows) + "\n"


def _replace(path: Path, marker: str, body: str) -> None:
    text = path.read_text()
    pattern = rf"<!-- {marker}:start -->.*<!-- {marker}:end -->"
    if not re.search(pattern, text, flags=re.S):
        raise ValueError(f"{path} has no <!-- {marker}:start/end --> markers.")
    new = f"<!-- {marker}:start -->\n{body}<!-- {marker}:end -->"
    path.write_text(re.sub(pattern, lambda _: new, text, flags=re.S))


def main() -> None:
    runs = [p for p in (merged_run(t) for t in TASKS) if p is not None]
    bars_out = RESULTS / "llm_calibration_bars"
    llm_bars.main([*map(str, runs), "--out", str(bars_out)])
    summaries: dict[str, dict] = {}
    for path in runs:
        summaries |= json.loads(path.read_text())["summary"]
    table = methods_table(summaries)
    _replace(ROOT / "README.md", "readme-summary", table)
    bars = bars_out.with_suffix(".md").read_text().split("\n", 2)[2]  # drop the H1
    parts = bars.split("\n## ")
    parts = [parts[0]] + [p for p in parts[1:] if not p.startswith("overfit checkpoint, test")]
    body = "#### The bars\n\n" + "\n#### ".join(parts).strip() + "\n\n"
    body += "#### Every method, overfit checkpoint, test: ACC / ECE / NLL\n\n" + table + "\n"
    _replace(ROOT / "docs" / "benchmarks.md", "bars", body)
    print(table)


if __name__ == "__main__":
    no_options(__doc__)
    main()
