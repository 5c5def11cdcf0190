"""Training-time baselines on :mod:`benchmarks.llm_calibration`'s tasks, splits, seeds and
checkpoints: a deep ensemble of independently seeded LoRA adapters and BLoB.

MC dropout and the checkpoint ensemble need no extra training and run inside
``llm_calibration`` itself. The two methods here change training, so they get their own
runs, with the same task, split, seed, step count and learning rate as the MAP run whose
Laplace posterior they are compared with:

* ``deep_ens``  the MAP run plus ``--members - 1`` runs that differ only in their seed
  (:func:`benchmarks.baselines.ensembles.deep_ensemble_configs`), each member at the
  same checkpoint (early and final);
* ``blob``      BLoB (:mod:`benchmarks.baselines.blob`) trained from the same LoRA init for
  the same number of steps, 10 samples at test time. Scaled to this machine: the MAP's
  learning rate (1e-3 for 80 steps instead of 1e-4 for 5000), the KL cycle capped by
  :func:`~benchmarks.baselines.blob.scaled_kl_cycle`, paper values otherwise (ε 0.05,
  σ_p 0.2, KL lr 0.01, γ 8).

Per task and seed it writes the same ``checkpoints -> split -> method -> metrics`` layout
as ``llm_calibration`` and, given ``--merge`` (that run's JSON), one combined table with
every method. Costs are measured in this run: fine-tuning seconds per run (a cached run
costs nothing, so only runs trained here are timed) and prediction seconds per example.

    python -m benchmarks.llm_baselines --tasks fine_foods_mc --seeds 0 1 2 \\
        --run-name 'demo-{task}-seed{seed}' --shift \\
        --merge benchmarks/results/llm_calibration_fine_foods_mc_3seeds.json

``--load A.json B.json --merge ...`` merges earlier runs (e.g. one file per seed) without
running them again.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import llm_calibration as calib
from benchmarks.baselines import blob, ensembles
from benchmarks.finetune import build_model, train, trainable_state_dict
from benchmarks.finetune import load_trainable_state_dict as load_state
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.evaluation import classification_metrics

BLOB_SAMPLES = 10


def split_loaders(data: Any, shifted: Any, collate: Any, batch_size: int) -> dict[str, Any]:
    splits = {"test": data.test}
    if shifted is not None:
        splits["shift"] = shifted.test
    return {s: make_loader(ex, collate, batch_size) for s, ex in splits.items()}


def timed_probs(fn, loader: Any) -> tuple[torch.Tensor, float]:
    """``(probs (N, C), seconds per example)`` of ``fn(loader)``."""
    t0 = time.perf_counter()
    probs = fn(loader)
    return probs, (time.perf_counter() - t0) / len(probs)


def deep_ensemble(cfg: Any, data: Any, steps: list[int], args: Any) -> dict:
    """Train (or load) the members; ``{"states": step -> [state], "train_s": [...]}``."""
    states: dict[int, list] = {s: [] for s in steps}
    train_s, model = [], None
    for member in ensembles.deep_ensemble_configs(cfg, args.members):
        result, model = train(member, data, progress=True)
        if result.step_seconds:  # trained here (not loaded from the cache)
            train_s.append(sum(result.step_seconds))
        for s in steps:
            states[s].append(ensembles.checkpoint_states(member.run_dir, steps=[s])[0])
    return {"states": states, "train_s": train_s, "model": model}


def train_blob_run(cfg: Any, data: Any, steps: list[int], args: Any, kl_lr: float = 0.01) -> dict:
    """BLoB from the MAP run's LoRA init, its KL step at ``kl_lr`` (the paper's 0.01 by
    default); ``{"states": step -> state, "train_s", "model", "kl_cycle", "final_nll"}``."""
    peft_model, tokenizer, wrapper = build_model(cfg, data)
    blob.apply_blob(peft_model, eps=args.blob_eps, seed=cfg.seed)
    collate = make_collate(tokenizer, data.kind, cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen,
        drop_last=True,
    )  # fmt: skip
    cycle = blob.scaled_kl_cycle(len(data.train), cfg.batch_size, cfg.steps)
    states: dict[int, dict] = {}

    def keep(step: int, _model: Any) -> None:
        if step in steps:
            states[step] = trainable_state_dict(peft_model)

    res = blob.train_blob(
        wrapper, loader, cfg.steps, lr=cfg.lr, kl_lr=kl_lr, kl_cycle=cycle, seed=cfg.seed,
        callback=keep, warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
    )  # fmt: skip
    return {
        "states": states,
        "train_s": [sum(res.step_seconds)],
        "model": (peft_model, tokenizer, wrapper),
        "kl_cycle": cycle,
        "final_nll": res.nll[cfg.steps],
    }


def score_states(wrapper, loaders, predict) -> dict[str, dict]:
    """split -> metrics (+ seconds per example, entropies) of ``predict(wrapper, loader)``."""
    out = {}
    for split, loader in loaders.items():
        probs, s_per_ex = timed_probs(lambda ld: predict(wrapper, ld), loader)
        labels = torch.cat([b["labels"] for b in loader])
        out[split] = classification_metrics(probs, labels) | {"s_per_example": s_per_ex}
        out[split]["_entropy"] = calib.entropy(probs).tolist()
    return out


def run_task(task: str, seed: int, args: argparse.Namespace) -> dict:
    cfg = calib.finetune_config(task, seed, args)
    data, shifted = calib.load_splits(task, seed, args)
    steps = [s for s in (args.early, args.steps) if s]
    out: dict = {"checkpoints": {s: {} for s in steps}, "cost": {}}

    ens = deep_ensemble(cfg, data, steps, args)
    peft_model, tokenizer, wrapper = ens["model"]
    collate = make_collate(tokenizer, data.kind, cfg.seq_len)
    loaders = split_loaders(data, shifted, collate, args.la_batch_size)
    for s in steps:
        predict = functools.partial(
            ensembles.predict_probs, states=ens["states"][s], owner=peft_model
        )
        res = score_states(wrapper, loaders, predict)
        out["checkpoints"][s]["deep_ens"] = res
    out["cost"]["deep_ens_train_s"] = ens["train_s"]
    del ens, peft_model, wrapper

    bl = train_blob_run(cfg, data, steps, args)
    peft_model, _, wrapper = bl["model"]

    for s in steps:
        load_state(peft_model, bl["states"][s])
        res = score_states(
            wrapper, loaders, lambda m, ld: blob.predict_probs(m, ld, BLOB_SAMPLES, seed)
        )
        out["checkpoints"][s]["blob"] = res
    out["cost"] |= {"blob_train_s": bl["train_s"], "blob_kl_cycle": bl["kl_cycle"]}
    out["cost"]["blob_final_train_nll"] = bl["final_nll"]
    return out


# ------------------------------------------------------------------------ merge
def merge(main: dict, extra: dict) -> dict:
    """``main`` (an llm_calibration JSON) with ``extra``'s methods added per checkpoint and
    split, and the shift AUROC of each added method."""
    for task, per_seed in extra["runs"].items():
        for seed, run in per_seed.items():
            target = main["runs"][task][seed]
            target["baseline_cost"] = run["cost"]
            for step, methods in run["checkpoints"].items():
                ckpt = target["checkpoints"][step]
                for method, splits in methods.items():
                    for split, metrics in splits.items():
                        ckpt[split][method] = {k: v for k, v in metrics.items() if k[0] != "_"}
                        ckpt[split]["_entropy"][method] = metrics["_entropy"]
                    if "shift" in splits:
                        ent = ckpt["test"]["_entropy"][method], ckpt["shift"]["_entropy"][method]
                        auroc = calib.auroc(torch.tensor(ent[0]), torch.tensor(ent[1]))
                        ckpt["shift_auroc"][method] = auroc
    main["summary"] = calib.summarize(main["runs"])
    return main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=3, help="deep-ensemble size")
    p.add_argument("--blob-eps", type=float, default=0.05)
    p.add_argument("--merge", default=None, help="llm_calibration JSON to add these methods to")
    p.add_argument(
        "--load", nargs="+", default=None, help="skip the runs: merge these llm_baselines JSONs"
    )
    args = calib.parse(argv, p)
    if args.out == str(calib.RESULTS / "llm_calibration"):
        args.out = str(calib.RESULTS / "llm_baselines")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.load:  # merge earlier runs' results only (e.g. one file per seed)
        payload = {"runs": {}}
        for path in args.load:
            for task, per_seed in json.loads(Path(path).read_text())["runs"].items():
                payload["runs"].setdefault(task, {}).update(per_seed)
    else:
        t0 = time.perf_counter()
        runs = {t: {seed: run_task(t, seed, args) for seed in args.seeds} for t in args.tasks}
        payload = {"args": vars(args), "runs": runs, "wall_s": time.perf_counter() - t0}
        payload = json.loads(json.dumps(payload, default=str))  # int keys -> str, as on disk
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        print(f"wall time {payload['wall_s'] / 60:.1f} min; wrote {out}.json")
    if args.merge:
        merged = merge(json.loads(Path(args.merge).read_text()), payload)
        dest = Path(args.merge).with_name(Path(args.merge).stem + "_all")
        dest.with_suffix(".json").write_text(json.dumps(merged, indent=1, default=str))
        dest.with_suffix(".md").write_text(calib.render(merged["summary"], merged["args"]))
        print(calib.render(merged["summary"], merged["args"]))
        print(f"wrote {dest}.json, {dest}.md")


if __name__ == "__main__":
    main()
