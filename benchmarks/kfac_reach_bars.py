"""Issue 13's bars with today's code (KFAC over the positions that reach the logits, 5e23c4a),
re-scored on re-trained checkpoints (test; nothing is chosen here).

The status' bars came from re-scores made before the KFAC change. This re-runs the default
where those re-scores did, with the code of this checkout (:mod:`benchmarks.llm_status`
now reads all its rows from the results):

* ``prepare`` writes one small result file per task and seed
  (``benchmarks/cache/kfac_reach_bars/{regime}-{task}-seed{seed}.json``), cut from the
  committed benchmark files (``llm_calibration_<task>_3seeds.json`` for the 10-epoch
  regime, ``llm_memorised_<task>_seed<s>.json`` for the memorised one,
  ``llm_heldout_<task>_seed<s>.json``' step 32 of 960 for ``heldout-early``: only those 32
  steps are re-trained, on the 960-step schedule;
  ``prior_loo_mc_draws_heldout_<task>_seed<s>.json``, the status' former re-scores of the
  held-out tasks' step 960, for ``heldout-memorised``), with the library's default Monte
  Carlo draws (``n_samples=None``) as the status' sources use;
* :mod:`benchmarks.llm_rescore_default` ``--method auto --refresh-map`` re-trains each run
  (the cache is not kept between sessions; fine-tuning is not bitwise reproducible across
  machines and thread counts), fits KFAC, runs ``optimize_prior_precision()`` (the
  default, ``"auto"``) and scores it, the file's stored prior (``la_previous``, on today's
  fit and draws), MAP and temperature scaling (the file's temperature) on the rebuilt model;
* ``report`` merges the seeds per task, checks the bars (:mod:`benchmarks.llm_bars`) and
  sets them beside the status' committed bars for the same regime; a task re-scored on only
  some of its seeds gets its bars seed by seed (``seed_bars``), beside the committed file's
  default on the same seed::

    python -m benchmarks.kfac_reach_bars prepare
    python -m benchmarks.llm_rescore_default benchmarks/cache/kfac_reach_bars/X.json \\
        --method auto --refresh-map --out benchmarks/cache/kfac_reach_bars/X-rescored
    python -m benchmarks.kfac_reach_bars report

``restore-map-probs`` re-runs MAP on test for the cached checkpoints whose stored MAP
probabilities are not marked as the rebuilt model's (re-scores made before ``--refresh-map``
stored and marked them; :mod:`benchmarks.bars_bootstrap` reads them).

Writes ``results/kfac_reach_bars.{json,md}`` (bars, per-seed test rows, the largest
difference between the re-trained and the committed MAP metrics).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

from benchmarks import _common as C
from benchmarks import llm_bars, llm_heldout
from benchmarks.llm_calibration import summarize

NAME = "kfac_reach_bars"
CACHE = Path(__file__).resolve().parent / "cache" / NAME
TASKS = ("fine_foods_mc", "tweet_sentiment_mc", "bbc_headlines_mc")
SEEDS = (0, 1, 2)


class Regime(NamedTuple):
    """Where a regime's runs come from and which of their checkpoints are re-scored."""

    pattern: str  #: the committed benchmark file of a task and seed
    status_source: str  #: the status' source of the regime's bars before the KFAC change
    tasks: tuple[str, ...]
    steps: tuple[str, ...] | None = None  #: the checkpoints kept (``None``: all)
    early_only: bool = False  #: read on the early bars (``steps``' only checkpoint)


REGIMES = {
    "10epochs": Regime("llm_calibration_{task}_3seeds.json", "mc_default_draws_bars.json", TASKS),
    "memorised": Regime("llm_memorised_{task}_seed{seed}.json", "prior_loo_mc_draws.json", TASKS),
    # the held-out tasks' early checkpoint (32 of 960 steps): only those steps are re-trained
    "heldout-early": Regime(
        "llm_heldout_{task}_seed{seed}.json",
        "llm_heldout_bars.json",
        llm_heldout.TASKS,
        ("32",),
        early_only=True,
    ),
    # the held-out tasks' memorised checkpoint (960 steps): the status' former per-seed re-scores
    "heldout-memorised": Regime(
        "prior_loo_mc_draws_heldout_{task}_seed{seed}.json",
        "prior_loo_mc_draws_heldout_bars.json",
        llm_heldout.TASKS,
        ("960",),
    ),
}


#: Where a regime's *before* is not on the same models (docs/benchmarks.md).
CAVEATS = {
    "memorised": (
        "Here *before* is `prior_loo_mc_draws`, scored on models re-trained after the "
        "`llm_memorised` files whose checkpoints this run rebuilds: MAP differs, and so do the "
        "bounds of the bars that depend on it."
    ),
    "heldout-memorised": (
        "Pet species' 960-step fine-tunes do not re-train bitwise (step 32 matches to 1e-6; "
        "at step 960, 10-29 of 240 predictions and accuracy by 2-3 differ, *MAP Δ*), so there "
        "*before* is scored on a slightly different model; tweet device's re-train reproduces "
        "its MAP."
    ),
}


def cut(payload: dict, task: str, seed: int, steps: tuple[str, ...] | None = None) -> dict:
    """``payload`` reduced to one task and seed (and ``steps``' checkpoints), scored with the
    default draws."""
    out = dict(payload)
    run = dict(payload["runs"][task][str(seed)])
    if steps is not None:
        run["checkpoints"] = {s: run["checkpoints"][s] for s in steps}
    out["runs"] = {task: {str(seed): run}}
    out["args"] = dict(payload["args"], seeds=[seed], tasks=[task], n_samples=None)
    return out


def prepare(regimes: list[str]) -> list[Path]:
    """Write the per-task, per-seed files to re-score; returns their paths."""
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = []
    for regime in regimes:
        spec = REGIMES[regime]
        for task in spec.tasks:
            for seed in SEEDS:
                source = C.RESULTS_DIR / spec.pattern.format(task=task, seed=seed)
                path = CACHE / f"{regime}-{task}-seed{seed}.json"
                payload = cut(json.loads(source.read_text()), task, seed, spec.steps)
                path.write_text(json.dumps(payload))
                paths.append(path)
    return paths


def rescored(regime: str, task: str) -> dict[int, Path]:
    """The re-scored files of ``task`` in ``regime`` by seed (those written so far)."""
    files = {s: CACHE / f"{regime}-{task}-seed{s}-rescored.json" for s in SEEDS}
    return {s: f for s, f in files.items() if f.exists()}


def merged(task: str, files: list[Path]) -> dict:
    """The re-scored seeds of ``task`` (``files``) as one ``runs`` block with its summary."""
    runs: dict = {task: {}}
    for f in files:
        runs[task] |= json.loads(f.read_text())["runs"][task]
    return {"runs": runs, "summary": summarize(runs)}


def committed_rows(regime: str) -> list[dict]:
    """The bars of ``regime`` as the status read them before the KFAC change."""
    payload = json.loads((C.RESULTS_DIR / REGIMES[regime].status_source).read_text())
    if "rows" in payload:  # an llm_bars file: the rows of the checkpoint re-run here
        wanted = "early" if REGIMES[regime].early_only else "overfit"
        return [r for r in payload["rows"] if r["regime"] == wanted]
    rows = default_draws_rows(payload) if regime == "10epochs" else memorised_rows(payload)
    return [{**r, "regime": _llm_bars_regime(r)} for r in rows]


def default_draws_rows(payload: dict) -> list[dict]:
    """``mc_default_draws_bars``' early and overfit (with shift) bars with the default
    draws, keyed ``task:regime`` there."""
    rows = []
    for key, entry in payload.items():
        task, regime = key.split(":")
        if regime in ("early", "overfit"):
            rows += [{"task": task, "regime": regime, **b} for b in entry["bars"]["default draws"]]
    return rows


def memorised_rows(payload: dict) -> list[dict]:
    """``prior_loo_mc_draws``' bars of the leave-one-out rule (``rule == "loo_default"``),
    the status' memorised source before the KFAC change, named ``memorised`` as it did."""
    return [
        {"regime": "memorised", **{k: v for k, v in row.items() if k != "rule"}}
        for row in payload["bars"]
        if row["rule"] == "loo_default"
    ]


def _llm_bars_regime(row: dict) -> str:
    """The status files the shift bar under its checkpoint and names the memorised one;
    :mod:`benchmarks.llm_bars` says ``shift`` and ``overfit``."""
    if "temperature" in row["bar"]:
        return "shift"
    return "overfit" if row["regime"] == "memorised" else row["regime"]


def bar_rows(regime: str, runs: dict[str, dict]) -> list[dict]:
    """Per bar: today's value (re-trained, re-scored) beside the committed one."""
    before = {(r["task"], r["regime"], r["bar"]): r for r in committed_rows(regime)}
    rows = []
    for task, block in runs.items():
        for row in regime_bars(regime, block["summary"]):
            old = before.get((task, row["regime"], row["bar"]))
            rows.append({**row, "before": old and {k: old[k] for k in ("value", "met")}})
    return rows


def regime_bars(regime: str, summary: dict, method: str = llm_bars.METHOD) -> list[dict]:
    """:func:`benchmarks.llm_bars.check`'s rows for ``method``; a regime that keeps only
    early checkpoints gets the early bars (``check`` reads a lone checkpoint as the overfit
    one)."""
    if not REGIMES[regime].early_only:
        return llm_bars.check(summary, method)
    return [
        {"task": task, "regime": "early", **bar}
        for task, steps in summary.items()
        for bar in llm_bars.early_bars(steps[REGIMES[regime].steps[0]]["test"], method)
    ]


def seed_rows(runs: dict[str, dict]) -> list[dict]:
    """Per task, seed and step: MAP, temperature scaling and the default (test), and the
    largest difference between the re-trained model's MAP metrics and the file's."""
    out = []
    for task, block in runs.items():
        for seed, run in block["runs"][task].items():
            for step, ckpt in run["checkpoints"].items():
                test = ckpt["test"]
                out.append(
                    {
                        "task": task,
                        "seed": int(seed),
                        "step": int(step),
                        "map_diff": ckpt["_rescore_map_max_abs_diff"],
                        **{m: test[m] for m in ("map", "temp", "la", "la_previous")},
                    }
                )
    return out


def bar_cells(row: dict) -> list[str]:
    """A bar's table cells from its regime on: today's value and verdict beside *before*
    (``–`` where the committed source has no such bar)."""
    before = row["before"]
    return [
        row["regime"], row["bar"], f"{row['value']:.4g}", row["target"],
        "yes" if row["met"] else "**no**",
        f"{before['value']:.4g}" if before else "–",
        ("yes" if before["met"] else "no") if before else "–",
    ]  # fmt: skip


def seed_bars_section(rows: list[dict]) -> list[str]:
    """Markdown lines: the bars seed by seed of the tasks not yet re-scored on every seed."""
    n_met = sum(r["met"] for r in rows)
    n_before = sum(r["before"]["met"] for r in rows)
    seeds: dict[str, set[int]] = {}
    for r in rows:
        seeds.setdefault(r["task"], set()).add(r["seed"])
    done = "; ".join(f"{t}: seed {', '.join(map(str, sorted(s)))}" for t, s in seeds.items())
    head = ["task", "seed", "regime", "bar", "today", "target", "met", "before", "met before"]
    table = [[r["task"], str(r["seed"]), *bar_cells(r)] for r in rows]
    return [
        f"Tasks re-scored on some of their {len(SEEDS)} seeds so far ({done}): the bars on "
        f"each seed alone, today's default {n_met} of {len(rows)} met (before: {n_before}; "
        "*before*: the committed file's default on its own model, against that model's MAP).",
        "",
        C.md_table(head, table),
    ]


def render(results: dict[str, dict]) -> str:
    lines = [
        "# Issue 13's bars with today's code (KFAC over the positions that reach the logits)",
        "",
        "Re-trained checkpoints, the default re-run and scored with the default draws "
        "(`python -m benchmarks.kfac_reach_bars`, protocol in its docstring). Test split, "
        "means over seeds; *before*: the committed re-score the status read for the same "
        "regime until now (original checkpoints, code before the change).",
    ]
    for regime, res in results.items():
        rows = res["bars"]
        n_met = sum(r["met"] for r in rows)
        n_before = sum(bool(r["before"] and r["before"]["met"]) for r in rows)
        verdict = f"{n_met} of {len(rows)} met (before: {n_before})"
        lines += ["", f"## {regime}: {verdict if rows else 'no task re-scored on every seed'}", ""]
        if regime in CAVEATS:
            lines += [CAVEATS[regime], ""]
        head = ["task", "regime", "bar", "today", "target", "met", "before", "met before"]
        table = [[r["task"], *bar_cells(r)] for r in rows]
        if rows:
            lines += [C.md_table(head, table), ""]
        if "seed_bars" in res:
            lines += [*seed_bars_section(res["seed_bars"]), ""]
        lines += ["Per seed (ACC / ECE / NLL / confidence):", ""]
        head = ["task", "seed", "step", "MAP", "temperature", "default", "file's prior", "MAP Δ"]
        table = [
            [s["task"], str(s["seed"]), str(s["step"])]
            + [C.metric_cell(s[m]) for m in ("map", "temp", "la", "la_previous")]
            + [f"{s['map_diff']:.1e}"]
            for s in res["seeds"]
        ]
        lines.append(C.md_table(head, table))
    lines += [
        "",
        "*file's prior*: the prior stored in the committed file, on today's fit and draws. "
        "*MAP Δ*: the largest difference between the re-trained model's MAP metrics and the "
        "committed file's (fractions).",
    ]
    return "\n".join(lines)


def seed_bar_rows(regime: str, task: str, seed: int, run: dict) -> list[dict]:
    """The regime's bars on one seed alone: today's default on the re-trained model
    (``run``, re-scored) beside the committed file's default on its own model."""
    spec = REGIMES[regime]
    source = json.loads((C.RESULTS_DIR / spec.pattern.format(task=task, seed=seed)).read_text())
    runs = cut(source, task, seed, spec.steps)["runs"]
    before = {(r["regime"], r["bar"]): r for r in regime_bars(regime, summarize(runs))}
    today = regime_bars(regime, summarize({task: {str(seed): run}}))
    keep = ("value", "met")
    return [
        {**r, "seed": seed, "before": {k: before[(r["regime"], r["bar"])][k] for k in keep}}
        for r in today
    ]


def regime_results(regime: str) -> dict | None:
    """``regime``'s bars over the tasks whose seeds are all re-scored, its per-seed rows,
    and (``seed_bars``) the bars seed by seed for tasks re-scored only in part; ``None``
    before any file is re-scored."""
    done = {t: files for t in REGIMES[regime].tasks if (files := rescored(regime, t))}
    if not done:
        return None
    runs = {t: merged(t, list(files.values())) for t, files in done.items()}
    complete = {t: block for t, block in runs.items() if len(done[t]) == len(SEEDS)}
    out = {"bars": bar_rows(regime, complete), "seeds": seed_rows(runs)}
    partial = {t: files for t, files in done.items() if t not in complete}
    if partial:
        out["seed_bars"] = [
            row
            for task, files in partial.items()
            for seed in files
            for row in seed_bar_rows(regime, task, seed, runs[task]["runs"][task][str(seed)])
        ]
    return out


def report() -> dict[str, dict]:
    results = {r: res for r in REGIMES if (res := regime_results(r)) is not None}
    text = render(results)
    C.write_results(NAME, results, text)
    print(text)
    return results


def _repair_rescores(regimes: list[str], repair: str) -> list[tuple[Path, tuple]]:
    """``(path, record)`` of every checkpoint that ``llm_rescore_default.<repair>`` repaired
    in the re-scores of ``regimes`` (the others are left untouched)."""
    from benchmarks import llm_rescore_default as rescore  # torch, only for these commands

    return [
        (path, record)
        for regime in regimes
        for task in REGIMES[regime].tasks
        for path in rescored(regime, task).values()
        for record in getattr(rescore, repair)(path)
    ]


def restore_map_probs(regimes: list[str]) -> list[str]:
    """Re-store MAP's test probabilities in the re-scores of ``regimes`` made before
    :func:`benchmarks.llm_rescore_default.store_probs` (they kept the file's, which belong to
    another model where re-training was not bitwise); the others are left untouched."""
    return [
        f"{path.name}: {t} seed {s} step {k}"
        for path, (t, s, k) in _repair_rescores(regimes, "restore_map_probs")
    ]


def refit_temperature(regimes: list[str]) -> list[str]:
    """Refit temperature scaling where a re-score's rebuilt MAP is another model than the
    one the file's temperature was fitted on (pet species' 960-step fine-tunes do not
    re-train bitwise); the others are left untouched."""
    return [
        f"{path.name}: {t} seed {s} step {k}: T {old:.3f} -> {new:.3f}"
        for path, (t, s, k, old, new) in _repair_rescores(regimes, "refit_temperature")
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "command", choices=("prepare", "report", "restore-map-probs", "refit-temperature")
    )
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    a = p.parse_args()
    if a.command == "prepare":
        print("\n".join(str(path) for path in prepare(a.regimes)))
    elif a.command == "restore-map-probs":
        print("\n".join(restore_map_probs(a.regimes)) or "every re-score's MAP probabilities match")
    elif a.command == "refit-temperature":
        print("\n".join(refit_temperature(a.regimes)) or "every temperature is its model's")
    else:
        report()


if __name__ == "__main__":
    main()
