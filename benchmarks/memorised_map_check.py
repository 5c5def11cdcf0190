"""Are the memorised study's MAP rows from the same models as its default rows? (test)

The memorised benchmark's files (``prior_loo_draws_{task}.json``) hold MAP and temperature
rows computed when the checkpoints were first trained, and default (``la``) rows re-scored
later by :mod:`benchmarks.llm_rescore_default`, which rebuilds each model from the
checkpoint cache (``benchmarks/cache/runs``) and did not compare it with the file.
:mod:`benchmarks.llm_rescore_diag`'s MAP check found that two cached checkpoints are not
the models of the file's MAP rows. This script measures how far apart they are: per
checkpoint, the MAP metrics of the cached model on the test split (and the shifted split,
where the file has one) against the file's, and the overfit ACC bar (the default's ACC
within 1 point of MAP's, means over seeds) against either MAP::

    python -m benchmarks.memorised_map_check

``--source``, ``--tasks`` and ``--name`` run it on other result files, e.g. the held-out
checkpoints re-scored with the leave-one-out rule's default draws (re-trained models)::

    python -m benchmarks.memorised_map_check --tasks pet_species_mc \
        --source "prior_loo_mc_draws_heldout_{task}_3seeds.json" \
        --name prior_loo_mc_draws_heldout_map_check

Writes ``results/memorised_map_check.{json,md}``. It reads test splits only to compare two
scorings of the same predictions' reference; nothing is chosen from it.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import torch

from benchmarks import llm_calibration as calib
from benchmarks.tasks import make_loader
from laplace_lora_ext.evaluation import classification_metrics

TASKS = ("fine_foods_mc", "tweet_sentiment_mc", "bbc_headlines_mc")
SOURCE = "prior_loo_draws_{task}.json"
NAME = "memorised_map_check"


def map_metrics(c: calib.CachedCheckpoint, examples: list, batch_size: int) -> dict:
    """The cached model's MAP metrics on ``examples``."""
    loader = make_loader(examples, c.collate, batch_size)
    with torch.no_grad():
        logits = torch.cat([c.wrapper(b) for b in loader])
    labels = torch.cat([b["labels"] for b in loader])
    metrics = classification_metrics(logits.softmax(-1).float(), labels)
    return {k: float(metrics[k]) for k in calib.METRICS}


def check_task(task: str, results: Path, source: str = SOURCE) -> list[dict]:
    """One row per checkpoint of ``task`` in ``source`` (a file name with ``{task}``):
    file's and cached MAP, and the file's default."""
    payload = json.loads((results / source.format(task=task)).read_text())
    args = argparse.Namespace(**payload["args"])
    rows = []
    for c in calib.cached_checkpoints(payload["runs"], args, skip=lambda ckpt: False):
        splits = {"test": c.data.test} | ({"shift": c.shifted.test} if "shift" in c.ckpt else {})
        for split, examples in splits.items():
            file_rows = c.ckpt[split]
            rows.append({
                "task": task, "seed": c.seed, "step": c.step, "split": split,
                "map_file": {k: float(file_rows["map"][k]) for k in calib.METRICS},
                "map_cached": map_metrics(c, examples, args.la_batch_size),
                "default": {k: float(file_rows["la"][k]) for k in calib.METRICS},
            })  # fmt: skip
    return rows


def acc_bar(rows: list[dict], task: str, reference: str) -> tuple[float, float, bool]:
    """(default ACC, MAP ACC, met) in points, means over the task's seeds (test split)."""
    test = [r for r in rows if r["task"] == task and r["split"] == "test"]
    acc = 100 * sum(r["default"]["acc"] for r in test) / len(test)
    ref = 100 * sum(r[reference]["acc"] for r in test) / len(test)
    return acc, ref, acc >= ref - 1 - 1e-6


def command_line(tasks: list[str], source: str, name: str) -> str:
    """The command that reproduces a run: the flags that differ from the defaults."""
    words = ["python", "-m", "benchmarks.memorised_map_check"]
    if list(tasks) != list(TASKS):
        words += ["--tasks", *tasks]
    if source != SOURCE:
        words += ["--source", source]
    if name != NAME:
        words += ["--name", name]
    return shlex.join(words)


def render(rows: list[dict], source: str = SOURCE, command: str | None = None) -> str:
    command = command or command_line(list(TASKS), source, NAME)
    lines = [
        "# The memorised study's MAP rows against the cached checkpoints (test)",
        "",
        f"`{command}`. MAP ACC / NLL / conf from the file "
        f"(`{source}`) and from the cached model the default was re-scored on.",
        "",
        "| task | seed | split | MAP, file | MAP, cached model | default (file) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [
            f"{100 * m['acc']:.0f} / {m['nll']:.3f} / {100 * m['conf']:.1f}"
            for m in (r["map_file"], r["map_cached"], r["default"])
        ]
        lines.append(f"| {r['task']} | {r['seed']} | {r['split']} | " + " | ".join(cells) + " |")
    lines += ["", "Overfit ACC bar (default within 1 point of MAP, means over seeds):", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        acc, ref_file, met_file = acc_bar(rows, task, "map_file")
        _, ref_cached, met_cached = acc_bar(rows, task, "map_cached")
        lines.append(
            f"- {task}: default {acc:.2f}; against the file's MAP {ref_file:.2f} "
            f"({'met' if met_file else 'missed'}), against the cached model's {ref_cached:.2f} "
            f"({'met' if met_cached else 'missed'})"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="MAP rows of a result file against its cache.")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--source", default=SOURCE, help="result file name, with {task}")
    p.add_argument("--name", default=NAME, help="output name under results/")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row for task in a.tasks for row in check_task(task, calib.RESULTS, a.source)]
    out = calib.RESULTS / a.name
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
    report = render(rows, a.source, command_line(a.tasks, a.source, a.name))
    out.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
