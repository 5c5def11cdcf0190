"""Where today's default stands on issue 13's bars: one table from the committed results
that score it (test splits, means over 3 seeds; nothing is run or chosen here).

The bars were measured by several benchmarks, and the calibration files' own ``la`` rows
predate changes to the default's Monte Carlo draws and to the leave-one-out rule. Each
source below is the latest committed re-score of the current default on its checkpoints:

* **10 epochs** (early and overfit checkpoints, fine foods' shift), 3 tasks × 3 seeds:
  ``kfac_reach_bars.json``, regime ``"10epochs"``: the checkpoints re-trained and the
  default (the evidence there) re-run with today's code (KFAC over the positions that reach
  the logits), predicted with the library's default draws;
* **memorised** (30 epochs), the same tasks and seeds: ``kfac_reach_bars.json``, regime
  ``"memorised"``: the checkpoints of the ``llm_memorised`` files re-trained and the default
  (the leave-one-out rule there) re-run with today's code, as for 10 epochs;
* **held-out tasks, memorised** (chosen after the rules were fixed):
  ``kfac_reach_bars.json``, regime ``"heldout-memorised"``: the memorised checkpoints of
  the ``prior_loo_mc_draws_heldout`` re-scores (960 steps) re-trained and the default (the
  leave-one-out rule there) re-run with today's code, as for 10 epochs;
* **held-out tasks, early**: ``kfac_reach_bars.json``, regime ``"heldout-early"``: the
  early checkpoints of the ``llm_heldout`` files (32 of 960 steps) re-trained and the
  default (the evidence there) re-run with today's code and draws, as for 10 epochs.

::

    python -m benchmarks.llm_status

The issue reads its bars on means over seeds. :func:`per_seed_bars` also reads the four
overfit bars on each memorised checkpoint alone (the re-trained models of both memorised
regimes), for the default and for temperature scaling.

Writes ``results/llm_status.{json,md}``, the bars table between ``<!-- status:start/end -->``
and the per-seed one between ``<!-- status-seeds:start/end -->`` in README.md and
docs/benchmarks.md, and between ``<!-- memorised-now:start/end -->`` in
README.md the memorised benchmark's MAP, temperature scaling and default on the same
(re-trained) models: ``kfac_reach_bars.json``'s memorised seeds, test split.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from benchmarks import llm_bars
from benchmarks._common import no_options
from benchmarks.llm_summary import _replace

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAME = "llm_status"


@dataclass(frozen=True)
class Source:
    """One benchmark's bars: where they are read from and how.

    ``rows(payload)`` returns the bar rows (``task``, ``regime``, ``bar``, ``value``,
    ``target``, ``met``) of the committed ``results/<file>``.
    """

    label: str
    checkpoints: str
    file: str
    rows: Callable[[dict], list[dict]]


#: The status' one source file: every regime re-run with today's code.
REACH_FILE = "kfac_reach_bars.json"
#: How the status names the checkpoints of ``kfac_reach_bars.json``' memorised regime
#: (:mod:`benchmarks.llm_bars` calls them ``overfit``, and their shift bar ``shift``).
MEMORISED_REGIME_NAMES = {"overfit": "memorised", "shift": "memorised shift"}


def reach_rows(regime: str) -> Callable[[dict], list[dict]]:
    """The bars of ``regime`` (``"10epochs"``: early, overfit, shift; ``"memorised"``;
    ``"heldout-early"``; ``"heldout-memorised"``) of today's code on the re-trained checkpoints
    (``kfac_reach_bars.json``), without the committed values they are compared with there
    (``before``)."""

    def rows(payload: dict) -> list[dict]:
        out = []
        for row in payload[regime]["bars"]:
            row = {k: v for k, v in row.items() if k != "before"}
            if regime == "memorised":
                row["regime"] = MEMORISED_REGIME_NAMES[row["regime"]]
            out.append(row)
        return out

    return rows


SOURCES = (
    Source("3 tasks, 10 epochs", "early, overfit, shift", REACH_FILE, reach_rows("10epochs")),
    Source("3 tasks, memorised", "30 epochs, shift", REACH_FILE, reach_rows("memorised")),
    Source(
        "2 held-out tasks, memorised",
        "30 epochs",
        REACH_FILE,
        reach_rows("heldout-memorised"),
    ),
    Source("2 held-out tasks, early", "early", REACH_FILE, reach_rows("heldout-early")),
)


def summarize(payloads: dict[str, dict], sources: tuple[Source, ...] = SOURCES) -> dict:
    """Per source: bars met, bars in all, and the missed rows; plus the totals.

    ``payloads``: each source's committed JSON, by file name.
    """
    benchmarks = []
    for source in sources:
        rows = source.rows(payloads[source.file])
        if not rows:
            raise ValueError(f"{source.file} has no bars for {source.label!r}.")
        benchmarks.append(
            {
                "label": source.label,
                "checkpoints": source.checkpoints,
                "file": source.file,
                "met": sum(row["met"] for row in rows),
                "bars": len(rows),
                "missed": [row for row in rows if not row["met"]],
            }
        )
    return {
        "benchmarks": benchmarks,
        "met": sum(b["met"] for b in benchmarks),
        "bars": sum(b["bars"] for b in benchmarks),
    }


def _missed_cell(missed: list[dict]) -> str:
    if not missed:
        return "none"
    return "; ".join(
        f"{row['task']} {row['regime']}, {row['bar']}: {row['value']:g} (target {row['target']})"
        for row in missed
    )


def render(summary: dict) -> str:
    """The markdown table: one row per benchmark, then the total."""
    lines = [
        "| benchmark | checkpoints | bars met | missed: value (target) | source |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b in summary["benchmarks"]:
        lines.append(
            f"| {b['label']} | {b['checkpoints']} | {b['met']} of {b['bars']} | "
            f"{_missed_cell(b['missed'])} | `{b['file']}` |"
        )
    lines.append("")
    lines.append(f"{summary['met']} of {summary['bars']} bars met with today's default.")
    return "\n".join(lines) + "\n"


MEMORISED_TASKS = ("fine_foods_mc", "tweet_sentiment_mc", "bbc_headlines_mc")
MEMORISED_METHODS = {
    "map": "MAP",
    "temp": "temperature scaling (validation)",
    "la": "**Laplace-LoRA, default**",
}


def memorised_means(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """``{method: {task: {metric: mean over seeds}}}`` on the test split, for
    ACC, ECE, confidence (×100) and NLL; ``per_seed``: each task's per-seed payloads."""
    out: dict[str, dict[str, dict]] = {}
    for method in MEMORISED_METHODS:
        for task, payloads in per_seed.items():
            rows = [p["test"][method] for p in payloads]
            out.setdefault(method, {})[task] = {
                m: mean(r[m] for r in rows) * (1 if m == "nll" else 100)
                for m in ("acc", "ece", "nll", "conf")
            } | {"seeds": len(rows)}
    return out


def render_memorised(means: dict[str, dict[str, dict]]) -> str:
    """Methods × tasks, cells ``ACC / ECE / NLL / confidence``."""
    tasks = list(next(iter(means.values())))
    lines = ["| method | " + " | ".join(f"`{t}`" for t in tasks) + " |"]
    lines.append("| --- |" + " --- |" * len(tasks))
    for method, label in MEMORISED_METHODS.items():
        cells = (means[method][t] for t in tasks)
        lines.append(
            f"| {label} | "
            + " | ".join(
                f"{c['acc']:.1f} / {c['ece']:.1f} / {c['nll']:.3f} / {c['conf']:.0f}" for c in cells
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _memorised_per_seed(reach: dict) -> dict[str, list[dict]]:
    """Each memorised task's seeds (``reach``: ``kfac_reach_bars.json``), as ``{"test":
    {method: metrics}}`` for :data:`MEMORISED_METHODS`; empty lists where not committed."""
    seeds = reach.get("memorised", {}).get("seeds", [])
    return {
        task: [
            {"test": {m: row[m] for m in MEMORISED_METHODS}}
            for row in sorted(seeds, key=lambda r: r["seed"])
            if row["task"] == task
        ]
        for task in MEMORISED_TASKS
    }


def _as_summary(metrics: dict[str, dict], names: dict[str, str]) -> dict:
    """One seed's metrics ``{method: {metric: value}}`` in :mod:`benchmarks.llm_bars`' form
    (``{name: {metric: [value]}}``), methods renamed by ``names``."""
    return {new: {k: [v] for k, v in metrics[old].items()} for old, new in names.items()}


def seed_tests(reach: dict) -> dict[str, list[dict]]:
    """Each memorised checkpoint's test metrics, one entry per task and seed, for both
    memorised regimes of ``reach`` (``kfac_reach_bars.json``: the re-trained models), in
    the file's order."""
    names = {"map": "map", "temp": "temp", "la": "default"}
    return {
        label: [_as_summary(row, names) for row in reach.get(regime, {}).get("seeds", [])]
        for label, regime in (
            ("3 tasks, memorised", "memorised"),
            ("2 held-out tasks, memorised", "heldout-memorised"),
        )
    }


def per_seed_bars(tests: dict[str, list[dict]]) -> list[dict]:
    """Per benchmark, the four overfit bars read on each seed alone, for the default and for
    temperature scaling (its accuracy is MAP's, so it meets that bar by construction); and
    the default's misses by bar."""
    out = []
    for label, seeds in tests.items():
        bars = {
            m: [r for t in seeds for r in llm_bars.overfit_bars(t, m)] for m in ("default", "temp")
        }
        row = {"label": label, "seeds": len(seeds)}
        row |= {m: [sum(r["met"] for r in rows), len(rows)] for m, rows in bars.items()}
        row["default_missed"] = dict(Counter(r["bar"] for r in bars["default"] if not r["met"]))
        out.append(row)
    return out


def render_per_seed(rows: list[dict]) -> str:
    """Bars met per seed: the default against temperature scaling."""
    lines = [
        "| benchmark | checkpoints | default | temperature scaling (validation) "
        "| the default's misses |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        missed = "; ".join(f"{bar}: {n}" for bar, n in r["default_missed"].items()) or "none"
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['default'][0]} of {r['default'][1]} | "
            f"{r['temp'][0]} of {r['temp'][1]} | {missed} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    reach = json.loads((RESULTS / REACH_FILE).read_text())
    summary = summarize({REACH_FILE: reach})
    means = memorised_means(_memorised_per_seed(reach))
    seeds = per_seed_bars(seed_tests(reach))
    table, memorised, per_seed = render(summary), render_memorised(means), render_per_seed(seeds)
    extra = {"memorised_now": means, "per_seed": seeds}
    (RESULTS / f"{NAME}.json").write_text(json.dumps(summary | extra, indent=1))
    (RESULTS / f"{NAME}.md").write_text(
        "# Issue 13's bars with today's default (test, means over 3 seeds)\n\n"
        + table
        + "\n## The overfit bars read on each seed alone\n\n"
        + per_seed
        + "\n## Memorised, same models\n\n"
        + memorised
    )
    for page in (ROOT / "README.md", ROOT / "docs" / "benchmarks.md"):
        _replace(page, "status", table)
        _replace(page, "status-seeds", per_seed)
    _replace(ROOT / "README.md", "memorised-now", memorised)
    print(table + "\n" + per_seed + "\n" + memorised)


if __name__ == "__main__":
    no_options(__doc__)
    main()
