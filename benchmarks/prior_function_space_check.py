"""Dev study (issue 13): the evidence's ``lora_B`` prior (``method="lora_marglik"``) against
the function-space prior (``method="function_space"``) on the three-task benchmark's cached
runs (the same tasks, seeds, splits and checkpoints as ``llm_calibration``).

Both rules are scored on the validation split (where the choice is made) and on the test
and shift splits (the bars), with MAP and temperature scaling for reference. One KFAC fit
per checkpoint serves both rules; MC with 1000 joint samples.

    python -m benchmarks.prior_function_space_check --tasks fine_foods_mc --seeds 0 1 2 \\
        --shift --run-name 'demo-{task}-seed{seed}' --out benchmarks/results/prior_fs_ff

writes ``OUT.json`` (per seed and the summary, the ``llm_calibration`` layout with methods
``map``, ``temp``, ``la`` (lora_marglik) and ``la_fs`` (function_space)) and ``OUT.md``.
"""

# ruff: noqa: E501  (a dev study: one printed line per checkpoint)

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import llm_bars
from benchmarks import llm_calibration as calib
from benchmarks.finetune import load_run
from benchmarks.prior_study import blocks_of, metrics
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.evaluation import classification_metrics

RULES = {"la": "lora_marglik", "la_fs": "function_space"}


def score_checkpoint(wrapper, data, shifted, collate, args) -> dict:
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    splits = {"val": data.validation, "test": data.test}
    if shifted is not None:
        splits["shift"] = shifted.test
    caches = {
        k: blocks_of(la, make_loader(v, collate, args.la_batch_size)) for k, v in splits.items()
    }
    logits = {k: torch.cat([f for f, _, _ in c]).float() for k, c in caches.items()}
    labels = {k: torch.cat([y for _, _, y in c]) for k, c in caches.items()}
    T = float(calib.temperature(logits["val"], labels["val"]))
    out: dict = {k: {} for k in caches}
    for k in caches:
        for name, scale in (("map", 1.0), ("temp", T)):
            out[k][name] = classification_metrics((logits[k] / scale).softmax(-1), labels[k])
    priors = {}
    for name, method in RULES.items():
        la.optimize_prior_precision(method=method)
        priors[name] = la.prior_precision.clone()
        for k, cache in caches.items():
            out[k][name] = metrics(la, cache, priors[name])
    out["_train_nll"] = float(la.loss / la.n_data)
    out["_temperature"] = T
    is_b = torch.tensor(["lora_B" in n for n in la.lora_param_names])
    out["_delta_b_median"] = {n: float(p[is_b].median()) for n, p in priors.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    args = calib.parse(argv)
    torch.set_num_threads(args.threads or 1)
    runs: dict = {}
    t0 = time.perf_counter()
    for task in args.tasks:
        runs[task] = {}
        for seed in args.seeds:
            cfg = calib.finetune_config(task, seed, args)
            data, shifted = calib.load_splits(task, seed, args)
            runs[task][str(seed)] = {"checkpoints": {}}
            for step in [s for s in (args.early, args.steps) if s]:
                _, tok, wrapper, _ = load_run(cfg, step, data)
                collate = make_collate(tok, data.kind, cfg.seq_len)
                res = score_checkpoint(wrapper, data, shifted, collate, args)
                runs[task][str(seed)]["checkpoints"][str(step)] = res
                line = " | ".join(
                    f"{k} " + ", ".join(
                        f"{m} {100 * v['acc']:.0f}/{100 * v['ece']:.1f}/{v['nll']:.3f}/{100 * v['conf']:.0f}"
                        for m, v in res[k].items()
                    )
                    for k in ("val", "test", "shift") if k in res
                )  # fmt: skip
                print(f"{task} s{seed} step {step} dB {res['_delta_b_median']}: {line}", flush=True)
    summary = calib.summarize(runs)
    val_runs = {
        t: {s: {"checkpoints": {k: {"test": c["val"]} for k, c in r["checkpoints"].items()}}
            for s, r in per_seed.items()}
        for t, per_seed in runs.items()
    }  # fmt: skip
    val_summary = calib.summarize(val_runs)
    rows = {name: llm_bars.check(summary, name) for name in RULES}
    payload = {"args": vars(args), "runs": runs, "summary": summary, "bars": rows}
    payload["val_summary"] = val_summary
    payload["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    md = "# Validation split (the choice)\n\n" + calib.render(val_summary, vars(args))
    md += "\n# Test and shift splits (the bars)\n\n" + calib.render(summary, vars(args))
    for name, r in rows.items():
        md += f"\n## bars with `{name}` ({RULES[name]}) as the default\n\n"
        md += llm_bars.render(r, {t: len(s) for t, s in runs.items()}).split("\n", 2)[2]
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
