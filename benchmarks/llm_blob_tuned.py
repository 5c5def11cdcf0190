"""BLoB re-run with its KL step size chosen on validation data, beside the zero-shot model.

The first BLoB runs (:mod:`benchmarks.llm_baselines`: the paper's KL lr 0.01, the KL cycle
capped at 5 steps) did not fit their training data. Here the KL lr is chosen per task on
seed 0's **validation** split, never on test:

1. seed 0: train BLoB once per KL lr in ``--kl-lrs`` (the MAP run's budget and LoRA init
   otherwise, as in ``llm_baselines``), score the validation split at the last step
   (10 samples) and keep the KL lr with the lowest validation NLL;
2. seeds 1 and 2: train with that KL lr only; with ``--reuse-first-runs``, where that is
   the first runs' KL lr (0.01), their BLoB rows are taken as they are (re-running fine
   foods seed 0 and tweets seeds 0-1 reproduced them: the same training NLL, entropies and
   metrics to 1e-9), and only the zero-shot model is scored. ``--resume`` reads the choice
   from the selection file instead of making it again.

Each seed's kept run is scored on test (and the shifted split) at both checkpoints as
method ``blob``, and the untrained base model (adapters off) as ``zero_shot``, in
``llm_baselines``' layout: ``results/llm_blob_tuned_<task>_seed<s>.json``, which
:mod:`benchmarks.llm_summary` merges over the first runs' BLoB rows. The selection is
written to ``results/llm_blob_tuned_<task>_selection.{json,md}`` (``--out``'s folder).

    python -m benchmarks.llm_blob_tuned --tasks fine_foods_mc --seeds 0 1 2 --shift \\
        --run-name 'demo-{task}-seed{seed}' --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import llm_calibration as calib
from benchmarks.baselines import blob
from benchmarks.finetune import build_model
from benchmarks.finetune import load_trainable_state_dict as load_state
from benchmarks.llm_baselines import BLOB_SAMPLES, score_states, split_loaders, train_blob_run
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.inputs import forward_logits

KL_LRS = (1e-2, 1e-3, 1e-4)
#: The KL lr of the first runs (``llm_baselines``: the paper's).
FIRST_KL_LR = 1e-2


def blob_probs(wrapper: Any, loader: Any, seed: int) -> torch.Tensor:
    """BLoB's predictive ``(N, C)`` (``BLOB_SAMPLES`` Flipout samples)."""
    return blob.predict_probs(wrapper, loader, BLOB_SAMPLES, seed)


def zero_shot_probs(peft_model: Any, wrapper: Any, loader: Any) -> torch.Tensor:
    """The base model's softmax ``(N, C)``: every adapter switched off."""
    out = []
    with torch.no_grad(), peft_model.disable_adapter():
        for batch in loader:
            out.append(torch.softmax(forward_logits(wrapper, batch).double(), -1).float())
    return torch.cat(out)


def validation_score(run: dict, data: Any, collate: Any, args: Any, seed: int) -> dict:
    """Validation metrics of ``run``'s last checkpoint (BLoB's predictive)."""
    peft_model, _, wrapper = run["model"]
    load_state(peft_model, run["states"][args.steps])
    loader = make_loader(data.validation, collate, args.la_batch_size)
    probs = blob_probs(wrapper, loader, seed)
    labels = torch.cat([b["labels"] for b in loader])
    return classification_metrics(probs, labels)


def select_kl_lr(cfg: Any, data: Any, steps: list[int], args: Any) -> tuple[float, dict, list]:
    """``(kl_lr, kept run, rows)``: one BLoB run per KL lr, kept by validation NLL."""
    rows, best = [], None
    for kl_lr in args.kl_lrs:
        run = train_blob_run(cfg, data, steps, args, kl_lr=kl_lr)
        collate = make_collate(run["model"][1], data.kind, cfg.seq_len)
        val = validation_score(run, data, collate, args, cfg.seed)
        sigma = torch.cat([m.sigma.detach().flatten() for m in blob.blob_modules(run["model"][0])])
        rows.append({
            "kl_lr": kl_lr, "val": val, "final_train_nll": run["final_nll"],
            "train_s": run["train_s"][0], "median_sigma": float(sigma.median()),
        })  # fmt: skip
        print(f"kl_lr {kl_lr:g}: val NLL {val['nll']:.3f}, train NLL {run['final_nll']:.3f}")
        if best is None or val["nll"] < best[0]:
            best = (val["nll"], kl_lr, run)
        else:
            del run
    return best[1], best[2], rows


def score_run(run: dict, data: Any, shifted: Any, steps: list[int], args: Any, seed: int):
    """``(checkpoints, cost)`` in ``llm_baselines``' layout: ``blob`` per checkpoint, and
    ``zero_shot`` (the same at every checkpoint: no adapter is used)."""
    peft_model, tokenizer, wrapper = run["model"]
    collate = make_collate(tokenizer, data.kind, args.seq_len)
    loaders = split_loaders(data, shifted, collate, args.la_batch_size)
    out: dict = {}
    zero = score_states(wrapper, loaders, lambda m, ld: zero_shot_probs(peft_model, m, ld))
    for s in steps:
        load_state(peft_model, run["states"][s])
        res = score_states(wrapper, loaders, lambda m, ld: blob_probs(m, ld, seed))
        out[s] = {"blob": res, "zero_shot": zero}
    cost = {"blob_train_s": run["train_s"], "blob_kl_cycle": run["kl_cycle"]}
    return out, cost | {"blob_final_train_nll": run["final_nll"]}


def selection_table(task: str, kl_lr: float, rows: list[dict]) -> str:
    lines = [
        f"# BLoB's KL lr on `{task}`, seed 0, chosen by validation NLL: {kl_lr:g}",
        "",
        "| KL lr | val ACC | val ECE ×100 | val NLL | final training-batch NLL | median σ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        v = r["val"]
        lines.append(
            f"| {r['kl_lr']:g} | {100 * v['acc']:.1f} | {100 * v['ece']:.1f} | {v['nll']:.3f} "
            f"| {r['final_train_nll']:.3f} | {r['median_sigma']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def first_run(task: str, seed: int, results: Path) -> dict | None:
    """The first BLoB run of ``task`` and ``seed`` (``llm_baselines``' file, KL lr
    :data:`FIRST_KL_LR`), or ``None``."""
    path = results / f"llm_baselines_{task}_seed{seed}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["runs"][task][str(seed)]


def reused_scores(task: str, seed: int, data: Any, shifted: Any, steps: list[int], args: Any):
    """``(checkpoints, cost)`` of the first run's BLoB rows (trained with the chosen KL lr
    already) and the zero-shot model scored here: no BLoB training."""
    run = first_run(task, seed, Path(args.out).parent)
    cfg = calib.finetune_config(task, seed, args)
    peft_model, tokenizer, wrapper = build_model(cfg, data)
    collate = make_collate(tokenizer, data.kind, cfg.seq_len)
    loaders = split_loaders(data, shifted, collate, args.la_batch_size)
    zero = score_states(wrapper, loaders, lambda m, ld: zero_shot_probs(peft_model, m, ld))
    checkpoints = {
        s: {"blob": run["checkpoints"][str(s)]["blob"], "zero_shot": zero} for s in steps
    }
    cost = {k: v for k, v in run["cost"].items() if k.startswith("blob_")}
    return checkpoints, cost | {"blob_rows_from": f"llm_baselines_{task}_seed{seed}.json"}


def run_task(task: str, args: argparse.Namespace) -> None:
    sel = Path(args.out).parent / f"llm_blob_tuned_{task}_selection"
    kl_lr, chosen_on = None, None
    if args.resume:
        chosen = json.loads(sel.with_suffix(".json").read_text())
        kl_lr, chosen_on = chosen["kl_lr"], chosen["seed"]
    for seed in args.seeds:
        t0 = time.perf_counter()
        cfg = calib.finetune_config(task, seed, args)
        args.seq_len = cfg.seq_len
        data, shifted = calib.load_splits(task, seed, args)
        steps = [s for s in (args.early, args.steps) if s]
        reuse = (
            args.reuse_first_runs
            and kl_lr == FIRST_KL_LR
            and first_run(task, seed, Path(args.out).parent)
        )
        if kl_lr is None:  # the first seed chooses
            kl_lr, run, rows = select_kl_lr(cfg, data, steps, args)
            chosen_on = seed
            payload = {"task": task, "seed": seed, "kl_lr": kl_lr, "rows": rows}
            sel.with_suffix(".json").write_text(json.dumps(payload, indent=1))
            sel.with_suffix(".md").write_text(selection_table(task, kl_lr, rows))
        elif not reuse:
            run = train_blob_run(cfg, data, steps, args, kl_lr=kl_lr)
        if reuse:
            checkpoints, cost = reused_scores(task, seed, data, shifted, steps, args)
            run = None
        else:
            checkpoints, cost = score_run(run, data, shifted, steps, args, seed)
        cost |= {"blob_kl_lr": kl_lr, "blob_kl_lr_chosen_on": f"seed {chosen_on} validation"}
        out = {
            "args": vars(args),
            "runs": {task: {seed: {"checkpoints": checkpoints, "cost": cost}}},
        }
        out["wall_s"] = time.perf_counter() - t0
        dest = Path(args.out).parent / f"llm_blob_tuned_{task}_seed{seed}.json"
        dest.write_text(json.dumps(json.loads(json.dumps(out, default=str)), indent=1))
        print(f"wrote {dest} ({out['wall_s'] / 60:.1f} min)")
        del run


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kl-lrs", type=float, nargs="+", default=list(KL_LRS))
    p.add_argument("--blob-eps", type=float, default=0.05)
    p.add_argument(
        "--resume", action="store_true", help="take the KL lr from the task's selection file"
    )
    p.add_argument(
        "--reuse-first-runs",
        action="store_true",
        help="where the chosen KL lr is the first runs' (0.01), take their BLoB rows (they "
        "re-run bitwise) and score only the zero-shot model",
    )
    return calib.parse(argv, p)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for task in args.tasks:
        run_task(task, args)


if __name__ == "__main__":
    main()
