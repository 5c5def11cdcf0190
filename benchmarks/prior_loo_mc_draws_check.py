"""Dev study (issue 13): should the leave-one-out rule score its grid with the predictive's
default draws instead of 100?

The leave-one-out rule (:func:`laplace_lora_ext.loo_prior.best_loo_precision`) picks
``δ_B`` by the NLL of the training labels under the joint MC predictive, 100 antithetic
draws with common random numbers. Since 0f8bec8 the predictive itself draws
:func:`laplace_lora_ext.links.default_draws` (10,000 for up to 14 classes): with a wide
posterior over more than two classes, 100 draws changed the top class of up to 8.8 of 50
validation inputs (:mod:`benchmarks.mc_draws_check`). The rule's grid NLL carries that
error too, and it could move the ``δ_B`` it picks. The candidate is the same rule with the
default draws (``n_samples=None``), on the same leave-one-out cache.

Data: the nine memorised checkpoints (3 tasks × 3 seeds, step 240 of
``prior_loo_draws_{task}.json``, rebuilt from the cache), with a fresh KFAC fit. Both
rules run on one leave-one-out cache in the same process; both priors are scored with the
library's predictive (joint MC, default draws, a generator seeded with the seed, the same
draws for both) on the validation, test and (fine foods) shift splits. The files' stored
priors are not used: the cached memorised checkpoints are re-trainings
(:mod:`benchmarks.memorised_map_check`).

**The decision rule, fixed before the runs, on the validation split only** (50 examples per
seed; test and shift are recorded, not used). The candidate is the same rule computed with
less Monte Carlo error, so it is adopted unless validation data say it is worse:

1. over the 9 checkpoints its mean validation NLL is at most 1.005 × the current rule's, and
2. on no task is its mean validation NLL (3 seeds) above 1.02 × the current rule's.

If both hold, ``optimize_prior_precision()``'s leave-one-out rule scores its grid with the
default draws; otherwise it keeps 100. The rule's seconds are recorded for both.

::

    python -m benchmarks.prior_loo_mc_draws_check TASK SEED
    python -m benchmarks.prior_loo_mc_draws_check --report

Writes ``results/prior_loo_mc_draws_{task}_seed{seed}.json``; ``--report`` writes
``results/prior_loo_mc_draws.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from benchmarks import llm_bars
from benchmarks import llm_calibration as calib
from benchmarks.llm_prior_scale_report import seed_mean
from benchmarks.tasks import make_loader
from laplace_lora_ext import loo_prior
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.jacobian_cache import LogitJacobianCache
from laplace_lora_ext.prior import lora_a_mask

NAME = "prior_loo_mc_draws"
TASKS = ("fine_foods_mc", "tweet_sentiment_mc", "bbc_headlines_mc")
STEP = "240"
RULES = {"loo_100": 100, "loo_default": None}  # the rule's n_samples
MEAN_RATIO, TASK_RATIO = 1.005, 1.02


def source(task: str) -> Path:
    return C.RESULTS_DIR / f"prior_loo_draws_{task}.json"


def run(task: str, seed: int) -> Path:
    """Both rules on one memorised checkpoint; returns the JSON written."""
    c, args = calib.cached_checkpoint(source(task), seed, STEP)
    la = Laplace(c.wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(make_loader(c.data.train, c.collate, args.la_batch_size))
    t0 = time.perf_counter()
    cache = loo_prior.loo_cache(la, la._fit_batches(la._fit_loaders))
    out = {"task": task, "seed": seed, "step": int(STEP), "train_nll": float(la.loss) / la.n_data,
           "cache_s": time.perf_counter() - t0, "priors": {}, "seconds": {}}  # fmt: skip
    is_b = ~lora_a_mask(la.lora_param_names)
    for name, n in RULES.items():
        t0 = time.perf_counter()
        prior = loo_prior.best_loo_precision(la, [cache], n).detach().clone()
        out["seconds"][name], out["priors"][name] = time.perf_counter() - t0, prior
        out[f"delta_b_{name}"] = float(prior[is_b][0])
    splits = {"validation": c.data.validation, "test": c.data.test}
    if c.shifted is not None:
        splits["shift"] = c.shifted.test
    T = c.ckpt["_temperature"]
    for split, examples in splits.items():
        cache = LogitJacobianCache(la, make_loader(examples, c.collate, args.la_batch_size),
                                   in_eigenbasis=True)  # fmt: skip
        logits, labels = cache.logits.float(), cache.labels
        probs = {"map": logits.softmax(-1), "temp": (logits / T).softmax(-1)}
        for name in RULES:
            la.prior_precision = out["priors"][name]
            probs[name] = cache.probs(la, "mc", None, torch.Generator().manual_seed(seed))
        out[split] = {m: classification_metrics(p.float(), labels) for m, p in probs.items()}
    out["priors"] = {k: v.tolist() for k, v in out["priors"].items()}
    path = C.RESULTS_DIR / f"{NAME}_{task}_seed{seed}.json"
    path.write_text(json.dumps(out, indent=1))
    return path


def load() -> list[dict]:
    """This check's per-seed files, by task (the held-out benchmark's files share the name's
    prefix, ``{NAME}_heldout_*``, and are not read)."""
    paths = [p for t in TASKS for p in sorted(C.RESULTS_DIR.glob(f"{NAME}_{t}_seed*.json"))]
    return [json.loads(p.read_text()) for p in paths]


def decide(rows: list[dict]) -> dict:
    """The module's rule (validation NLL only)."""
    mean = statistics.fmean
    new = mean(r["validation"]["loo_default"]["nll"] for r in rows)
    old = mean(r["validation"]["loo_100"]["nll"] for r in rows)
    ratios = {}
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if mine:
            ratios[task] = mean(r["validation"]["loo_default"]["nll"] for r in mine) / mean(
                r["validation"]["loo_100"]["nll"] for r in mine
            )
    c1, c2 = new <= MEAN_RATIO * old, all(v <= TASK_RATIO for v in ratios.values())
    verdict = "adopt the default draws" if c1 and c2 and len(rows) == 9 else "no change"
    return {"checkpoints": len(rows), "mean_val_nll_default_draws": new,
            "mean_val_nll_100_draws": old, "condition_1": c1, "task_ratios": ratios,
            "condition_2": c2, "verdict": verdict}  # fmt: skip


def bars(rows: list[dict]) -> list[dict]:
    """Issue 13's overfit bars (and shift) per task and rule on the means over seeds."""
    out = []
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        for name in RULES:
            test = {m: seed_mean([r["test"][m] for r in mine]) for m in ("map", name)}
            found = llm_bars.overfit_bars(test, method=name)
            if all("shift" in r for r in mine):
                shift = {m: seed_mean([r["shift"][m] for r in mine]) for m in ("temp", name)}
                found += llm_bars.shift_bars(shift, method=name)
            out += [{"task": task, "rule": name, **b} for b in found]
    return out


def render(rows: list[dict], decision: dict, bar_rows: list[dict]) -> str:
    cell = C.metric_cell
    lines = ["# The leave-one-out rule's grid with the default draws (validation)", "",
             "`python -m benchmarks.prior_loo_mc_draws_check`; protocol and rule in its "
             "docstring. Both rules on one leave-one-out cache; both priors scored with the "
             "default draws. Cells: ACC / ECE / NLL / confidence (×100 but NLL).", "",
             "| task | seed | train NLL | δ_B (100 / default draws) | rule s (100 / default) "
             "| split | MAP | temperature | rule, 100 draws | rule, default draws |",
             "| --- " * 10 + "|"]  # fmt: skip
    for r in rows:
        for split in ("validation", "test", "shift"):
            if split not in r:
                continue
            d = f"{r['delta_b_loo_100']:.3g} / {r['delta_b_loo_default']:.3g}"
            s = f"{r['seconds']['loo_100']:.1f} / {r['seconds']['loo_default']:.1f}"
            m = r[split]
            lines.append(f"| {r['task']} | {r['seed']} | {r['train_nll']:.1e} | {d} | {s} | "
                         f"{split} | {cell(m['map'])} | {cell(m['temp'])} | "
                         f"{cell(m['loo_100'])} | {cell(m['loo_default'])} |")  # fmt: skip
    ratios = ", ".join(f"{t} {v:.4f}" for t, v in decision["task_ratios"].items())
    lines += ["", "## Decision (validation NLL)", "",
              f"- Mean validation NLL over {decision['checkpoints']} checkpoints: default draws "
              f"{decision['mean_val_nll_default_draws']:.4f}, 100 draws "
              f"{decision['mean_val_nll_100_draws']:.4f} (condition 1, ≤ {MEAN_RATIO} ×: "
              f"{decision['condition_1']}).",
              f"- Per task, default draws / 100 draws: {ratios} (condition 2, ≤ {TASK_RATIO}: "
              f"{decision['condition_2']}).",
              f"- **Verdict: {decision['verdict']}.**", "",
              "## Issue 13's bars on test (means over seeds; recorded, not used)", "",
              "| task | rule | bar | value | target | met |", "| --- " * 6 + "|"]  # fmt: skip
    for b in bar_rows:
        met = "yes" if b["met"] else "**no**"
        lines.append(f"| {b['task']} | {b['rule']} | {b['bar']} | {b['value']} | {b['target']} "
                     f"| {met} |")  # fmt: skip
    return "\n".join(lines)


def report() -> None:
    rows = load()
    decision, bar_rows = decide(rows), bars(rows)
    C.write_results(
        NAME, {"decision": decision, "bars": bar_rows}, render(rows, decision, bar_rows)
    )
    print(render(rows, decision, bar_rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", nargs="?", choices=TASKS)
    parser.add_argument("seed", nargs="?", type=int)
    parser.add_argument("--report", action="store_true")
    a = parser.parse_args()
    if a.report:
        report()
    elif a.task is None or a.seed is None:
        parser.error("give a task and a seed, or --report")
    else:
        print(f"wrote {run(a.task, a.seed)}")
