"""Re-score the ``la_diag`` rows of one ``llm_calibration`` result file with the current
library, without re-running its other methods.

Why. The three-task benchmark's files (``llm_calibration_{task}_3seeds.json``) were run
before ``lora_marglik`` iterated its Adam rounds to convergence (40b8d7e): their diagonal
posteriors got one round of 200 steps. Nothing else in those files depends on that round
(the Kronecker rows' priors converged in one round or came from other rules).

For each run and checkpoint: rebuild the fine-tuned model (cached, else re-trained with the
file's settings; fine-tuning is deterministic on one thread), fit the diagonal posterior and
call ``optimize_prior_precision()`` exactly as ``llm_calibration.fit_diag`` does, then score
it with the file's joint MC predictive (``n_samples``, generator seeded with the run's seed)
on the test split and, if present, the shifted split (metrics, entropies, shift AUROC). The
old rows move to ``_la_diag_previous`` (skipped by the tables) and the new prior is stored as
``_prior["la_diag"]``. As a check that the rebuilt model is the file's, the MAP metrics are
recomputed from the same logits and their largest absolute difference from the file's
``map`` rows is stored (``_diag_rescore["map_max_abs_diff"]``)::

    python -m benchmarks.llm_rescore_diag benchmarks/results/llm_calibration_T_3seeds.json

A file run without diagonal rows (``--no-diag``, e.g. the memorised checkpoints) gets them
added; ``--out NAME`` writes ``NAME.json`` / ``NAME.md`` instead of overwriting the input.
The markdown table and the reliability plot are redrawn; a stopped run resumes from
``FILE.partial.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import laplace_lora_ext  # noqa: F401
from benchmarks import llm_calibration as calib
from benchmarks.llm_rescore_default import (
    largest_map_diff,
    map_check_text,
    map_max_abs_diff,
    score_rows,
    write_rescored,
)
from benchmarks.tasks import make_loader
from laplace_lora_ext.jacobian_cache import LogitJacobianCache


def rescore_diag(c: calib.CachedCheckpoint, args: argparse.Namespace) -> None:
    """Replace ``c.ckpt``'s ``la_diag`` rows (test, shift, AUROC) by the current library's."""
    ckpt = c.ckpt
    train_loader = make_loader(c.data.train, c.collate, args.la_batch_size)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la = calib.fit_diag(c.wrapper, train_loader)
    ckpt["_diag_fit_s"] = time.perf_counter() - t0
    splits = {"test": c.data.test} | ({"shift": c.shifted.test} if "shift" in ckpt else {})
    diffs = []
    for split, examples in splits.items():
        cache = LogitJacobianCache(la, make_loader(examples, c.collate, args.la_batch_size))
        rows = ckpt[split]
        diffs.append(map_max_abs_diff(rows, cache))
        if "la_diag" in rows and "_la_diag_previous" not in rows:
            rows["_la_diag_previous"] = rows["la_diag"]
        score_rows(rows, "la_diag", calib.mc_probs(cache, la, args, c.seed), cache.labels)
    ckpt["_prior"]["la_diag"] = la.prior_precision.tolist()
    ckpt["_diag_rescore"] = {
        "map_max_abs_diff": largest_map_diff(diffs),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }
    if "shift_auroc" in ckpt:
        ent_in, ent_out = ckpt["test"]["_entropy"], ckpt["shift"]["_entropy"]
        ckpt["shift_auroc"]["la_diag"] = calib.auroc(
            torch.tensor(ent_in["la_diag"]), torch.tensor(ent_out["la_diag"])
        )


def _progress(c: calib.CachedCheckpoint) -> str:
    """One line: the diagonal rows' test NLL and ECE (from the file's old rows, if any)."""
    test = c.ckpt["test"]
    old, new = test.get("_la_diag_previous"), test["la_diag"]
    was = f"{old['nll']:.4f} -> " if old else ""
    was_ece = f"{100 * old['ece']:.2f} -> " if old else ""
    return (
        f"{c.task} seed {c.seed} step {c.step}: la_diag test NLL {was}{new['nll']:.4f}, "
        f"ECE {was_ece}{100 * new['ece']:.2f}; "
        f"MAP check {map_check_text(c.ckpt['_diag_rescore']['map_max_abs_diff'])}"
    )


def main(path: str, out_path: str | None = None) -> None:
    """Re-score ``path`` in place, or into ``out_path`` (a name without suffix)."""
    out = Path(out_path or Path(path).with_suffix(""))
    partial = out.with_suffix(".partial.json")
    source = partial if partial.exists() else Path(path)
    payload = json.loads(source.read_text())
    args = argparse.Namespace(**payload["args"])
    torch.set_num_threads(args.threads or 1)
    for c in calib.cached_checkpoints(
        payload["runs"], args, skip=lambda ckpt: "_diag_rescore" in ckpt
    ):
        rescore_diag(c, args)
        partial.write_text(json.dumps(payload, default=str))
        print(_progress(c), flush=True)
    payload["summary"] = calib.summarize(payload["runs"])
    payload["rescored_diag"] = (
        "la_diag: the current library's diagonal posterior and default prior "
        "(lora_marglik to convergence); _la_diag_previous: the rows this file was run with"
    )
    write_rescored(payload, out, partial)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="an llm_calibration result JSON")
    parser.add_argument("--out", help="write here (a name without suffix), not over path")
    cli = parser.parse_args()
    main(cli.path, cli.out)
