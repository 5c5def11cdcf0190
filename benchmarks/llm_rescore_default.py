"""Re-score one ``llm_calibration`` result file after the default prior changed, without
re-running its other methods (MAP, temperature, marglik and the validation grid do not
depend on the default; the fine-tuning is cached).

For each run and checkpoint in the file: rebuild the fine-tuned model, fit the same KFAC
posterior, call ``optimize_prior_precision()`` (the current default) and score it with the
same joint MC predictive (``--n-samples`` of the file, generator seeded with the run's seed)
on the test split and, if the file has one, the shifted split (metrics and the entropy
AUROC), and so are ``la_probit`` and ``la_last``, which use the default's prior too.
The previous default's rows move to ``la_previous`` (and its prior to
``_prior["la_previous"]``); ``la`` becomes the current default. MAP's and the default's
probabilities are stored on the shifted split as on test (``_probs``, ``_labels``). The
markdown table and the reliability plot are redrawn. Used for the memorised benchmark
(:mod:`benchmarks.llm_memorised`) when its default moved from the function-space rule to the
leave-one-out rule::

    python -m benchmarks.llm_rescore_default benchmarks/results/llm_memorised_T_seedS.json

``--method M --out NEW`` scores a candidate default instead (``optimize_prior_precision(method=M)``)
and writes a new file. It also re-scores the file's own default (its stored prior, ``la_previous``)
in the same run, with the same fit and Monte Carlo draws, on every split including the
validation split (rows ``map``, ``temp``, ``la``, ``la_previous``), so that a candidate can be
chosen on validation data and compared on test without confounds (used by
:mod:`benchmarks.prior_loo_everywhere_check`). A stopped candidate run resumes from its
``NEW.partial.json``, skipping the checkpoints it has scored::

    python -m benchmarks.llm_rescore_default benchmarks/results/llm_calibration_T_3seeds.json \
        --method leave_one_out --out benchmarks/results/prior_loo_everywhere_T

``--steps S ...`` keeps only those checkpoints (the file is written to ``--out``).
``--refresh-map`` (with ``--out``) also re-scores MAP and temperature scaling (the file's
temperature) on the rebuilt model, keeping the file's rows as ``map_file`` / ``temp_file``,
and stores the rebuilt model's MAP probabilities on test, marked :data:`MAP_PROBS_REBUILT`
(since 2026-12-04; before, the file's were kept, which belong to another model where
re-training is not bitwise: :func:`restore_map_probs` repairs such a file): for checkpoints
re-trained where the cache was lost (:mod:`benchmarks.kfac_reach_bars`).

Each checkpoint records ``_rescore_map_max_abs_diff``, the largest difference between the
file's MAP metrics and the rebuilt model's: a cached checkpoint that is not the model of
the file's MAP and temperature rows shows there (:mod:`benchmarks.memorised_map_check`).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import llm_calibration as calib
from benchmarks.finetune import predict_probs
from benchmarks.tasks import make_loader
from laplace_lora_ext import eigenbasis, loo_prior
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.jacobian_cache import LogitJacobianCache

#: Candidate priors that are not (yet) a method of ``optimize_prior_precision``, by the name
#: ``--method`` takes (dev studies): each sets ``la.prior_precision`` from ``fit``'s data.
CANDIDATES = {
    # the leave-one-out rule with its kernel's lora_A redrawn (benchmarks.prior_loo_redrawn_check)
    "leave_one_out_redrawn_a": lambda la: loo_prior.loo_precision(
        la, la._fit_batches(la._fit_loaders), kernel_lora_a="redrawn", kernel_draws=1
    ),
    # the redrawn kernel averaged over 8 draws (benchmarks.prior_loo_draws_check)
    "leave_one_out_8_draws": lambda la: loo_prior.loo_precision(
        la, la._fit_batches(la._fit_loaders), kernel_draws=8
    ),
    # the current rule with its grid scored by 100 draws, as until the change to the
    # default draws (the held-out re-score: the previous draws on the re-trained models)
    "leave_one_out_100_grid_draws": lambda la: loo_prior.loo_precision(
        la, la._fit_batches(la._fit_loaders), n_samples=100
    ),
}


def tune(la, method: str | None) -> None:
    """``la.optimize_prior_precision(method=method)``, or the candidate of that name."""
    if method in CANDIDATES:
        CANDIDATES[method](la)
    else:
        la.optimize_prior_precision(method=method)


def score_rows(rows: dict, name: str, probs: torch.Tensor, labels: torch.Tensor) -> None:
    """Store ``probs`` ``(N, C)`` as method ``name``'s metrics and entropies in ``rows``."""
    rows[name] = classification_metrics(probs, labels)
    rows.setdefault("_entropy", {})[name] = calib.entropy(probs).tolist()


def score_previous(la, cache, rows: dict, previous: torch.Tensor, args, seed: int) -> None:
    """``la_previous``: the file's default prior ``previous`` ``(L,)`` on this fit, same draws."""
    chosen = la.prior_precision
    la.prior_precision = previous.to(chosen)
    score_rows(rows, "la_previous", calib.mc_probs(cache, la, args, seed), cache.labels)
    la.prior_precision = chosen


def map_max_abs_diff(rows: dict, cache: LogitJacobianCache) -> float | None:
    """Largest absolute difference between the file's MAP metrics (``rows["map"]``) and
    those of the model in ``cache``: 0 (to float noise) when the rebuilt model is the one
    the file's other rows were computed on; ``None`` for a split without a MAP row (a
    candidate run's validation split, scored afresh), which has nothing to compare."""
    if "map" not in rows:
        return None
    new = classification_metrics(cache.logits.softmax(-1).float(), cache.labels)
    return max(abs(float(new[k]) - float(rows["map"][k])) for k in calib.METRICS)


def largest_map_diff(diffs: list[float | None]) -> float | None:
    """The largest of a checkpoint's per-split :func:`map_max_abs_diff`, skipping the
    splits without a MAP row (``None``); ``None`` if no split has one (the benchmarks'
    test split always does)."""
    return max((d for d in diffs if d is not None), default=None)


def map_check_text(diff: float | None) -> str:
    """:func:`largest_map_diff` for a progress line."""
    return "n/a (no MAP row)" if diff is None else f"{diff:.2e}"


def rescore_checkpoint(
    wrapper,
    data,
    shifted,
    collate,
    args,
    seed: int,
    ckpt: dict,
    method: str | None = None,
    refresh_map: bool = False,
) -> None:
    """Replace ``ckpt``'s ``la`` rows (test, shift, AUROC, prior) by the current default, or
    by ``method`` (then ``la_previous`` is re-scored in the same run, validation included).
    ``refresh_map`` also re-scores ``map`` and ``temp`` (the file's temperature) on the
    rebuilt model, for checkpoints re-trained on another machine (the file's rows move to
    ``map_file`` and ``temp_file``)."""
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    previous = torch.tensor(ckpt["_prior"]["la"], dtype=la._dtype)
    t0 = time.perf_counter()
    tune(la, method)
    ckpt["_default_s"] = time.perf_counter() - t0
    ckpt["_eigenbasis"] = eigenbasis.supports(la)  # the search's fast path (since cb4c4d0)
    splits = {"test": data.test} | ({"shift": shifted.test} if "shift" in ckpt else {})
    if method is not None:
        splits["validation"] = data.validation
        ckpt["validation"] = {"_entropy": {}}
    regex = calib.last_block_regex(wrapper)
    last = {i for i, n in enumerate(la.lora_param_names) if re.search(regex, n)}
    probs, map_diffs = {}, []
    for split, examples in splits.items():
        cache = LogitJacobianCache(la, make_loader(examples, collate, args.la_batch_size))
        rows = ckpt[split]
        map_diffs.append(map_max_abs_diff(rows, cache))
        if method is not None:
            score_previous(la, cache, rows, previous, args, seed)
        elif "la_previous" not in rows:
            rows["la_previous"] = rows["la"]
            rows["_entropy"]["la_previous"] = rows["_entropy"]["la"]
        probs[split] = calib.mc_probs(cache, la, args, seed)
        if split == "validation":  # the candidate, with MAP and temperature for reference
            new = {"la": probs[split], **map_and_temperature(cache, ckpt["_temperature"])}
        else:  # the rows of the file that use the default prior
            new = {
                "la": probs[split],
                "la_probit": cache.probs(la, "probit").float(),
                "la_last": calib.mc_probs(cache, la, args, seed, last),
            }
            new = {name: p for name, p in new.items() if name in rows}
            if refresh_map:
                keep_file_rows(rows)
                new |= map_and_temperature(cache, ckpt["_temperature"])
        for name, p in new.items():
            score_rows(rows, name, p, cache.labels)
        store_probs(rows, split, cache, probs[split], refresh_map)
    ckpt["_rescore_map_max_abs_diff"] = largest_map_diff(map_diffs)  # the file's model?
    ckpt["_prior"]["la_previous"] = (
        previous.tolist() if method else ckpt["_prior"].get("la_previous", ckpt["_prior"]["la"])
    )
    ckpt["_prior"]["la"] = la.prior_precision.tolist()
    if "shift_auroc" in ckpt:
        ent_in, ent_out = ckpt["test"]["_entropy"], ckpt["shift"]["_entropy"]
        ckpt["shift_auroc"] = {
            m: calib.auroc(torch.tensor(ent_in[m]), torch.tensor(ent_out[m])) for m in ent_in
        }


def store_probs(
    rows: dict, split: str, cache: LogitJacobianCache, la_probs: torch.Tensor, refresh_map: bool
) -> None:
    """Store a split's per-example probabilities for :mod:`benchmarks.bars_bootstrap`: on
    test the default's replace the file's; MAP's too when ``refresh_map`` re-scored MAP on a
    rebuilt model (the file's would belong to another model where re-training was not
    bitwise); on the shifted split both, as on test (the benchmark did not store them)."""
    if split == "shift" or (split == "test" and refresh_map):
        keep_probs(rows, cache, la_probs)
    elif split == "test":
        rows["_probs"]["la"] = la_probs.tolist()


#: Set on a split whose stored MAP probabilities were computed on the model this re-score
#: rebuilt (:func:`keep_probs`, :func:`restore_map_probs`), which is the model of its
#: ``map`` row whenever ``--refresh-map`` re-scored that row.
MAP_PROBS_REBUILT = "_map_probs_rebuilt"


def map_probs_match(rows: dict, tol: float = 1e-6) -> bool:
    """Whether a split's stored MAP probabilities (``rows["_probs"]["map"]``) are its
    ``map`` row's model's: computed on the rebuilt model where ``--refresh-map`` re-scored the
    row on it (:data:`MAP_PROBS_REBUILT`; a re-score before :func:`store_probs` kept the
    file's, another model where re-training is not bitwise), and in any case giving the
    row's metrics to ``tol`` (a check: one prediction of 240 moves accuracy by 4e-3)."""
    if "map_file" in rows and not rows.get(MAP_PROBS_REBUILT):
        return False
    probs = torch.tensor(rows["_probs"]["map"], dtype=torch.float64)
    new = classification_metrics(probs / probs.sum(-1, keepdim=True), torch.tensor(rows["_labels"]))
    return max(abs(float(new[k]) - float(rows["map"][k])) for k in calib.METRICS) <= tol


def stale_map_probs(runs: dict) -> list[tuple[str, str, str]]:
    """``(task, seed, step)`` of every checkpoint in ``runs`` (``task -> seed -> run``)
    whose stored MAP test probabilities are not its ``map`` row's model's
    (:func:`map_probs_match`)."""
    return [
        (task, seed, step)
        for task, per_seed in runs.items()
        for seed, run in per_seed.items()
        for step, ckpt in run["checkpoints"].items()
        if not map_probs_match(ckpt["test"])
    ]


def repair_checkpoints(
    path: Path, stale: Callable[[dict], bool], repair: Callable[[Any, Any], Any]
) -> list:
    """``repair(checkpoint, args)`` on each checkpoint of the re-score ``path`` that
    ``stale(entry)`` selects, rebuilt from the cache (:func:`calib.cached_checkpoints`, torch
    at the file's threads); ``repair`` edits the checkpoint's entry and returns a record.
    The file is rewritten only if a checkpoint was repaired, and nothing is rebuilt where
    none is stale. Returns the records."""
    payload = json.loads(path.read_text())
    runs = payload["runs"]
    entries = [
        c
        for per_seed in runs.values()
        for r in per_seed.values()
        for c in r["checkpoints"].values()
    ]
    if not any(stale(entry) for entry in entries):
        return []
    args = argparse.Namespace(**payload["args"])
    torch.set_num_threads(args.threads or 1)
    done = [
        repair(c, args) for c in calib.cached_checkpoints(runs, args, skip=lambda k: not stale(k))
    ]
    path.write_text(json.dumps(payload, indent=1, default=str))
    return done


def restore_map_probs(path: Path) -> list[tuple[str, str, str]]:
    """Re-store MAP's test probabilities in a ``--refresh-map`` re-score (``path``) where
    they are not its ``map`` row's model's (:func:`stale_map_probs`: the file's, kept by a
    re-score before :func:`store_probs`): each such checkpoint is rebuilt from the cache and
    its MAP re-run on test; the result must give the stored ``map`` row, or this raises. Returns
    the ``(task, seed, step)`` restored; a file without any is neither rebuilt nor written."""

    def restore(c: Any, args: Any) -> tuple[str, str, str]:
        rows = c.ckpt["test"]
        probs, labels = predict_probs(c.wrapper, c.data.test, c.collate, args.la_batch_size)
        if not torch.equal(labels, torch.tensor(rows["_labels"])):
            raise ValueError(f"{path}: {c.task} seed {c.seed}: test labels differ from the file's")
        rows["_probs"]["map"] = probs.tolist()
        rows[MAP_PROBS_REBUILT] = True
        if not map_probs_match(rows):
            raise ValueError(f"{path}: {c.task} seed {c.seed}: MAP re-run differs from its row")
        return c.task, str(c.seed), c.step

    return repair_checkpoints(path, lambda ckpt: not map_probs_match(ckpt["test"]), restore)


#: Set on a checkpoint whose temperature was refitted on its rebuilt model
#: (:func:`refit_temperature`); ``_temperature_file`` keeps the file's.
TEMPERATURE_REFIT = "_temperature_refit"


def stale_temperature(ckpt: dict, tol: float = 1e-4) -> bool:
    """Whether ``ckpt``'s temperature was fitted on another model than its ``map`` row's: a
    ``--refresh-map`` re-score whose rebuilt MAP differs from the file's (``map_file``) by
    more than ``tol`` in a metric (re-training was not bitwise), not refitted yet."""
    rows = ckpt["test"]
    if "map_file" not in rows or ckpt.get(TEMPERATURE_REFIT):
        return False
    return max(abs(float(rows["map"][k]) - float(rows["map_file"][k])) for k in calib.METRICS) > tol


def refit_temperature(path: Path) -> list[tuple[str, str, str, float, float]]:
    """Refit temperature scaling on the rebuilt model's validation logits where the file's
    temperature belongs to another model (:func:`stale_temperature`), and re-score its test
    row from the stored MAP probabilities (``softmax(log p_MAP / T)``, as
    :mod:`benchmarks.bars_bootstrap` reads it). Returns ``(task, seed, step, T_file, T)``
    per checkpoint refitted; a file without any is neither rebuilt nor written."""

    def refit(c: Any, args: Any) -> tuple[str, str, str, float, float]:
        model = argparse.Namespace(model=c.wrapper)  # validation_logits reads .model only
        val = make_loader(c.data.validation, c.collate, args.la_batch_size)
        T = calib.temperature(*calib.validation_logits(model, val))
        rows = c.ckpt["test"]
        log_map = torch.tensor(rows["_probs"]["map"], dtype=torch.float64).log()
        score_rows(rows, "temp", torch.softmax(log_map / T, -1), torch.tensor(rows["_labels"]))
        record = (c.task, str(c.seed), c.step, c.ckpt["_temperature"], T)
        c.ckpt["_temperature_file"] = c.ckpt["_temperature"]
        c.ckpt["_temperature"] = T
        c.ckpt[TEMPERATURE_REFIT] = True
        return record

    return repair_checkpoints(path, stale_temperature, refit)


def keep_probs(rows: dict, cache: LogitJacobianCache, la_probs: torch.Tensor) -> None:
    """Store MAP's (from ``cache``) and the default's probabilities ``(N, C)`` and the labels
    in a split's ``rows`` (``_probs``, ``_labels``), as the benchmark does on test."""
    map_probs = cache.logits.softmax(-1).float()
    rows["_probs"] = {"map": map_probs.tolist(), "la": la_probs.tolist()}
    rows["_labels"] = cache.labels.tolist()
    rows[MAP_PROBS_REBUILT] = True


def map_and_temperature(cache: LogitJacobianCache, T: float) -> dict[str, torch.Tensor]:
    """MAP's and temperature scaling's probabilities ``(N, C)`` on ``cache``'s model (the
    temperature ``T`` as the file fitted it)."""
    logits = cache.logits.float()
    return {"map": logits.softmax(-1), "temp": (logits / T).softmax(-1)}


def keep_file_rows(rows: dict) -> None:
    """Keep the file's ``map`` and ``temp`` rows as ``map_file`` / ``temp_file`` (once)
    before they are re-scored on the rebuilt model."""
    for name in ("map", "temp"):
        rows.setdefault(f"{name}_file", rows[name])


def write_rescored(payload: dict, out: Path, partial: Path) -> None:
    """Write a re-scored file as ``out``'s JSON, markdown table and reliability plot (its
    ``summary`` already recomputed), then drop the ``partial`` resume file."""
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    out.with_suffix(".md").write_text(calib.render(payload["summary"], payload["args"]))
    calib.reliability_plot(payload["runs"], out.with_name(out.name + "_reliability.png"))
    partial.unlink(missing_ok=True)
    print(f"wrote {out}.json, {out}.md")


def keep_steps(runs: dict, steps: list[str]) -> None:
    """Drop from ``runs`` (``task -> seed -> run``) every checkpoint whose step is not in
    ``steps``."""
    for per_seed in runs.values():
        for run in per_seed.values():
            run["checkpoints"] = {s: c for s, c in run["checkpoints"].items() if s in steps}


def main(
    path: str,
    method: str | None = None,
    out: str | None = None,
    steps: list[str] | None = None,
    refresh_map: bool = False,
) -> None:
    out = Path(out or path).with_suffix("")
    partial = out.with_suffix(".partial.json")
    resume = method is not None and partial.exists()  # a candidate run that was stopped
    payload = json.loads((partial if resume else Path(path).with_suffix(".json")).read_text())
    if steps:
        keep_steps(payload["runs"], steps)
    args = argparse.Namespace(**payload["args"])
    torch.set_num_threads(args.threads or 1)
    scored = (lambda ckpt: "validation" in ckpt) if resume else (lambda ckpt: False)
    for c in calib.cached_checkpoints(payload["runs"], args, skip=scored):
        rescore_checkpoint(
            c.wrapper, c.data, c.shifted, c.collate, args, c.seed, c.ckpt, method, refresh_map
        )
        partial.write_text(json.dumps(payload, default=str))
        line = calib.summary_line(c.ckpt["test"])
        check = map_check_text(c.ckpt["_rescore_map_max_abs_diff"])
        print(f"{c.task} seed {c.seed} step {c.step}: {line}; MAP check {check}", flush=True)
    payload["summary"] = calib.summarize(payload["runs"])
    payload["rescored"] = (
        f"la, la_probit, la_last: optimize_prior_precision(method={method!r}); "
        "la_previous: the default this file was run with"
        + (" (its stored prior, re-scored in this run)" if method else "")
    )
    write_rescored(payload, out, partial)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="an llm_calibration / llm_memorised result JSON")
    parser.add_argument("--method", default=None, help="a candidate prior method")
    parser.add_argument("--out", default=None, help="output base path (default: rewrite)")
    parser.add_argument("--steps", nargs="+", help="only these checkpoints (needs --out)")
    parser.add_argument(
        "--refresh-map",
        action="store_true",
        help="re-score MAP and temperature scaling on the rebuilt model (needs --out)",
    )
    a = parser.parse_args()
    if (a.method or a.steps or a.refresh_map) and not a.out:
        parser.error("--method, --steps and --refresh-map need --out: a new file is written")
    main(a.path, a.method, a.out, a.steps, a.refresh_map)
