"""Report of :mod:`benchmarks.prior_threshold_check`: pool its checkpoints with the
10-epoch benchmark's, apply the pre-registered decision on the switch's threshold, and
print the test numbers for the record.

Writes ``results/prior_threshold.{json,md}``.
"""

from __future__ import annotations

import json
from statistics import mean

from benchmarks import _common as C
from benchmarks._common import no_options
from benchmarks.llm_bars import overfit_bars
from benchmarks.prior_threshold_check import CURRENT, RESULTS, TASKS, THRESHOLDS

OLD = "prior_loo_everywhere_{task}.json"  # the 10-epoch benchmark, both rules on validation
METHODS = ("evidence", "leave_one_out", "map", "temp")  # the trajectory files' method names


def new_rows(task: str) -> list[dict]:
    """One row per scored trajectory checkpoint of ``task``, every seed (validation and
    test metrics)."""
    rows = []
    for path in sorted(RESULTS.glob(f"prior_threshold_{task}_seed*.json")):
        rows += _checkpoint_rows(task, json.loads(path.read_text()))
    return rows


def _checkpoint_rows(task: str, payload: dict) -> list[dict]:
    rows = []
    for step, c in payload["checkpoints"].items():
        rows.append({
            "task": task, "source": "trajectory", "seed": payload["seed"], "step": int(step),
            "train_nll": c["train_nll"],
            "validation": {k: c["validation"][k]["nll"] for k in METHODS},
            "test": {k: c["test"][k] for k in METHODS},
        })  # fmt: skip
    return rows


def old_rows(task: str) -> list[dict]:
    """The 10-epoch benchmark's checkpoints: ``la`` there is leave-one-out, ``la_previous``
    the evidence (its default), both on the same fit and draws."""
    payload = json.loads((RESULTS / OLD.format(task=task)).read_text())
    rows = []
    for seed, run in payload["runs"][task].items():
        for step, c in run["checkpoints"].items():
            v = c["validation"]
            rows.append({
                "task": task, "source": "10-epoch", "seed": int(seed), "step": int(step),
                "train_nll": c["_train_nll"],
                "validation": {"evidence": v["la_previous"]["nll"],
                               "leave_one_out": v["la"]["nll"], "map": v["map"]["nll"],
                               "temp": v["temp"]["nll"]},
            })  # fmt: skip
    return rows


def rule_name(row: dict, tau: float) -> str:
    """The rule the default would use at ``row`` with threshold ``tau``: leave one out below
    it, else the evidence."""
    return "leave_one_out" if row["train_nll"] < tau else "evidence"


def rule_nll(row: dict, tau: float) -> float:
    """The validation NLL of :func:`rule_name`'s rule at ``row``."""
    return row["validation"][rule_name(row, tau)]


def decide(rows: list[dict], thresholds=THRESHOLDS, current: float = CURRENT) -> dict:
    """The pre-registered decision: keep ``current`` unless another threshold's mean
    validation NLL over ``rows`` is at least 1 % lower and its per-task mean is lower on at
    least 2 of the tasks (the lowest such mean wins)."""
    tasks = sorted({r["task"] for r in rows})
    per_task = {
        tau: {t: mean(rule_nll(r, tau) for r in rows if r["task"] == t) for t in tasks}
        for tau in thresholds
    }
    pooled = {tau: mean(rule_nll(r, tau) for r in rows) for tau in thresholds}
    need = min(2, len(tasks))
    better = [
        tau for tau in thresholds
        if tau != current and pooled[tau] <= 0.99 * pooled[current]
        and sum(per_task[tau][t] < per_task[current][t] for t in tasks) >= need
    ]  # fmt: skip
    chosen = min(better, key=pooled.get) if better else current
    return {"pooled": pooled, "per_task": per_task, "chosen": chosen, "qualifying": better}


def render(rows: list[dict], decision: dict) -> str:
    """Markdown: the per-checkpoint validation NLLs, the decision, the test record."""
    lines = [
        "# The default's switch threshold (validation; test for the record)",
        "",
        "Validation NLL per checkpoint (trajectory checkpoints first):",
        "",
        "| task | source | seed | step | train NLL | MAP | temp (fit here) | evidence "
        "| leave-one-out |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["source"] != "trajectory", r["task"], r["seed"],
                                          r["step"])):  # fmt: skip
        v = r["validation"]
        lines.append(
            f"| {r['task']} | {r['source']} | {r['seed']} | {r['step']} | "
            f"{r['train_nll']:.4g} | {v['map']:.3f} | {v['temp']:.3f} | "
            f"{v['evidence']:.3f} | {v['leave_one_out']:.3f} |"
        )
    tasks = sorted(decision["per_task"][CURRENT])
    lines += ["", "Mean validation NLL of the switch rule at each threshold τ:", "",
              "| τ | pooled | " + " | ".join(tasks) + " |",
              "| --- | --- | " + " | ".join("---" for _ in tasks) + " |"]  # fmt: skip
    for tau, value in decision["pooled"].items():
        per = " | ".join(f"{decision['per_task'][tau][t]:.4f}" for t in tasks)
        mark = " (current)" if tau == CURRENT else ""
        lines.append(f"| {tau:g}{mark} | {value:.4f} | {per} |")
    lines += ["", f"**Decision: τ = {decision['chosen']:g}** (qualifying: "
              f"{[f'{t:g}' for t in decision['qualifying']] or 'none'}).", ""]  # fmt: skip
    lines += _test_record([r for r in rows if "test" in r], decision["chosen"])
    return "\n".join(lines) + "\n"


def _test_record(rows: list[dict], tau: float) -> list[str]:
    """Test ACC / ECE / NLL / confidence of the trajectory checkpoints (not used to decide)."""
    lines = [
        "Test split, for the record (ACC / ECE / NLL / confidence, ×100 where percent):",
        "",
        "| task | seed | step | train NLL | MAP | temp | evidence | leave-one-out | default "
        "| overfit bars met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(m: dict) -> str:
        return C.metric_cell(m, percent_digits=0)

    for r in rows:
        t = r["test"]
        default = t[rule_name(r, tau)]
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['step']} | {r['train_nll']:.4g} | {fmt(t['map'])} | "
            f"{fmt(t['temp'])} | {fmt(t['evidence'])} | {fmt(t['leave_one_out'])} | "
            f"{fmt(default)} | {_bars_met(t['map'], default)} |"
        )
    counts = {name: _count_met(rows, name, tau) for name in ("temp", "evidence",
              "leave_one_out", "default")}  # fmt: skip
    lines += ["", "Overfit bars met over these checkpoints (one seed and 100 test examples "
              "each): " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "."]  # fmt: skip
    return lines


def _count_met(rows: list[dict], name: str, tau: float) -> str:
    """``"met of total"`` overfit bars of method ``name`` (or the switch rule at ``tau``)."""
    met = total = 0
    for r in rows:
        key = rule_name(r, tau) if name == "default" else name
        bars = _checkpoint_bars(r["test"]["map"], r["test"][key])
        met, total = met + sum(b["met"] for b in bars), total + len(bars)
    return f"{met} of {total}"


def _checkpoint_bars(map_metrics: dict, method: dict) -> list[dict]:
    """:func:`benchmarks.llm_bars.overfit_bars` of one checkpoint's metrics (one seed, so
    each "mean" is the single value)."""
    summary = {m: {k: [v] for k, v in d.items()} for m, d in
               (("map", map_metrics), ("la", method))}  # fmt: skip
    return overfit_bars(summary)


def _bars_met(map_metrics: dict, default: dict) -> str:
    """The issue's four overfit bars of one checkpoint (one seed, 100 test examples): which
    are missed."""
    bars = _checkpoint_bars(map_metrics, default)
    missed = [b["bar"] for b in bars if not b["met"]]
    return f"{len(bars) - len(missed)} of {len(bars)}" + (
        f" (missed: {'; '.join(missed)})" if missed else ""
    )


def main() -> None:
    rows = [r for t in TASKS for r in new_rows(t)] + [r for t in TASKS for r in old_rows(t)]
    decision = decide(rows)
    payload = {"rows": rows, "decision": {**decision, "pooled": {str(k): v for k, v in
               decision["pooled"].items()}, "per_task": {str(k): v for k, v in
               decision["per_task"].items()}}}  # fmt: skip
    (RESULTS / "prior_threshold.json").write_text(json.dumps(payload, indent=1))
    md = render(rows, decision)
    (RESULTS / "prior_threshold.md").write_text(md)
    print(md)


if __name__ == "__main__":
    no_options(__doc__)
    main()
