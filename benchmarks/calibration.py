"""Calibration benchmark: MAP vs Laplace-LoRA (and baselines) along LoRA fine-tuning.

For each seed: fine-tune (resumable cache, :mod:`benchmarks.finetune`), then at every
checkpoint evaluate on the test split:

* ``map``         the fine-tuned model's softmax;
* ``la_kron``     Laplace-LoRA: KFAC (exact Fisher, expand), marglik prior, joint-MC GLM;
* ``la_kron_probit`` the same posterior with the probit link;
* ``la_diag``     diagonal GGN Laplace, marglik prior, joint-MC GLM;
* ``la_last``     KFAC Laplace over the last block's LoRA matrices only;
* ``la_lowrank``  KFAC with low-rank factors (``factor_rank``), joint-MC GLM;
* ``temp``        temperature scaling fitted on the validation split (the only method that
  sees validation data).

Metrics: accuracy, ECE (15 bins, torchmetrics), NLL, Brier; mean ± std over seeds.
Writes ``<out>.json``, ``<out>.md`` and plots ``<out>_steps.png`` (metrics vs training
steps) and ``<out>_reliability.png`` (MAP vs Laplace-LoRA, last checkpoint).

Run the default demo (about 15 minutes on 2 CPU cores)::

    python -m benchmarks.calibration
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from laplace import Laplace
from tqdm.auto import tqdm

import laplace_lora_ext  # noqa: F401  (registers subset_of_weights="lora")
from benchmarks.finetune import MODELS, FinetuneConfig, classification_metrics, train
from benchmarks.tasks import TASKS, load_task, make_collate, make_loader
from laplace_lora_ext import LastTokenChoiceLM

RESULTS = Path(__file__).parent / "results"
ALL_METHODS = ("map", "la_kron", "la_kron_probit", "la_diag", "la_last", "la_lowrank", "temp")
EARLY_METHODS = ("map", "la_kron", "temp")
METRICS = ("acc", "ece", "nll", "brier", "conf")
#: Default learning rate per model (see docs/benchmarks.md for why not the paper's 5e-5).
DEFAULT_LR = {"minilm": 2e-3, "smollm2": 1e-3}
#: Default task per model.
DEFAULT_TASK = {"minilm": "fine_foods", "smollm2": "fine_foods_mc"}


# ------------------------------------------------------------------------------ methods
def laplace_model(peft_model: torch.nn.Module, wrapper: torch.nn.Module, kind: str, data):
    """The module Laplace sees: choice-token logits for causal LMs, the PeftModel else."""
    if kind == "causal":
        return LastTokenChoiceLM(peft_model, wrapper.target_ids.tolist())
    return peft_model


def last_block_regex(model: torch.nn.Module) -> str:
    """Regex matching the LoRA layers of the highest-numbered transformer block."""
    idx = [
        int(m.group(1))
        for n, _ in model.named_modules()
        if "lora_A" not in n and (m := re.search(r"layers?\.(\d+)\.", n))
    ]
    last = max(idx)
    return rf"layers?\.{last}\."


def fit_laplace(model, train_loader, structure: str, prior: str, prior_mean=None, **kw) -> Any:
    """Fit the LoRA curvature, then the prior precision by marglik.

    ``prior_mean``: optional callable ``la -> (P,)`` tensor setting the prior's centre
    before the fit (default: zero).
    """
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure=structure, **kw
    )
    if prior_mean is not None:
        la.prior_mean = prior_mean(la)
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik", prior_structure=prior, n_steps=200, lr=0.1)
    return la


def predict(
    la, loader, links: tuple[str, ...], n_samples: int, seed: int
) -> dict[str, torch.Tensor]:
    """Class probabilities ``(N, C)`` per link, from one GLM predictive pass.

    The Gaussian over logits (mean, covariance) is computed once per batch and every link
    in ``links`` is applied to it, so a probit column costs no extra backward passes.
    """
    from laplace_lora_ext.links import apply_link

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {link: [] for link in links}
    for batch in loader:
        f_mu, f_var = la.predictive_moments(batch)
        for link in links:
            probs = apply_link(link, f_mu, f_var, n_samples, gen)
            out[link].append(probs.float())
    return {link: torch.cat(v) for link, v in out.items()}


@torch.no_grad()
def logits_of(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    from laplace_lora_ext.inputs import forward_logits

    logits, labels = [], []
    for batch in loader:
        logits.append(forward_logits(model, batch).float())
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def temperature(val_logits: torch.Tensor, val_labels: torch.Tensor) -> float:
    """Temperature minimising the validation NLL (LBFGS on log T)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(val_logits / log_t.exp(), val_labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def evaluate_checkpoint(
    peft_model, wrapper, data, cfg, args, seed: int, methods: list[str]
) -> dict[str, dict]:
    """Metrics of each method in ``methods`` at the loaded checkpoint."""
    collate = make_collate(wrapper_tokenizer(wrapper, peft_model), data.kind, cfg.seq_len)
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    test_loader = make_loader(data.test, collate, args.la_batch_size)
    model = laplace_model(peft_model, wrapper, data.kind, data)
    extra = data.kind == "encoder"  # the modules_to_save classifier head joins the posterior
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    test_logits, test_labels = logits_of(model, test_loader)
    if "map" in methods:
        results["map"] = classification_metrics(test_logits.softmax(-1), test_labels)
    if "temp" in methods:
        val_logits, val_labels = logits_of(model, make_loader(data.validation, collate, 16))
        T = temperature(val_logits, val_labels)
        results["temp"] = classification_metrics((test_logits / T).softmax(-1), test_labels)
        results["temp"]["temperature"] = T
    specs = {
        "la_kron": ("kron", {}),
        "la_diag": ("diag", {}),
        "la_last": ("kron", {"lora_modules": last_block_regex(peft_model)}),
        "la_lowrank": ("kron", {"factor_rank": args.factor_rank, "rank_threshold": 256}),
    }
    kron_probs = None
    for name, (structure, kw) in specs.items():
        if name not in methods and not (name == "la_kron" and "la_kron_probit" in methods):
            continue
        t0 = time.perf_counter()
        la = fit_laplace(
            model,
            train_loader,
            structure,
            args.prior,
            include_extra_params=extra and name != "la_last",
            **kw,
        )
        timings[f"{name}_fit_s"] = time.perf_counter() - t0
        links = ("mc",) if name in methods else ()
        if name == "la_kron" and "la_kron_probit" in methods:
            links += ("probit",)
        t0 = time.perf_counter()
        probs = predict(la, test_loader, links, args.n_samples, seed)
        timings[f"{name}_predict_s"] = time.perf_counter() - t0
        if "mc" in probs:
            results[name] = classification_metrics(probs["mc"], test_labels)
            results[name]["prior_precision"] = la.prior_precision.tolist()
        if "probit" in probs:
            results["la_kron_probit"] = classification_metrics(probs["probit"], test_labels)
        if name == "la_kron" and "mc" in probs:
            kron_probs = probs["mc"]
    results["_timings"] = timings
    results["_probs"] = {"map": test_logits.softmax(-1).tolist(), "labels": test_labels.tolist()}
    if kron_probs is not None:
        results["_probs"]["la_kron"] = kron_probs.tolist()
    return results


def wrapper_tokenizer(wrapper, peft_model):
    return peft_model._benchmark_tokenizer


# ------------------------------------------------------------------------------ driver
def finetuned(args: argparse.Namespace, seed: int, save_every: int):
    """Fine-tune one seed (or reuse its cached checkpoints).

    Returns ``(cfg, data, (peft_model, wrapper), seconds)``; the run's checkpoints live in
    ``cfg.run_dir`` (named after model, task, seed, lr, steps and n_train, so runs with
    other settings never reuse them).
    """
    cfg = FinetuneConfig(
        model=args.model,
        task=args.task,
        seed=seed,
        data_seed=seed,
        n_train=args.n_train,
        n_test=args.n_test,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        save_every=save_every,
        run_name=f"{args.model}-{args.task}-seed{seed}-lr{args.lr:g}-s{args.steps}-n{args.n_train}",
    )
    data = load_task(args.task, args.n_train, None, args.n_test, seed=seed)
    t0 = time.perf_counter()
    _, (peft_model, tokenizer, wrapper) = train(cfg, data, progress=True)
    peft_model._benchmark_tokenizer = tokenizer
    return cfg, data, (peft_model, wrapper), time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    all_runs: dict[str, Any] = {"args": vars(args), "runs": {}}
    steps = sorted(set(args.checkpoints + [args.steps]))
    early = [m for m in args.methods if m in args.early_methods]
    for seed in args.seeds:
        cfg, data, (peft_model, wrapper), finetune_s = finetuned(args, seed, min(steps))
        per_step = {}
        for step in tqdm(steps, desc=f"seed {seed}: checkpoints"):
            peft_model, wrapper = load_checkpoint(peft_model, wrapper, cfg, step)
            methods = args.methods if step == args.steps else early
            per_step[step] = evaluate_checkpoint(
                peft_model, wrapper, data, cfg, args, seed, methods
            )
            summary = {
                m: round(v["ece"], 4) for m, v in per_step[step].items() if not m.startswith("_")
            }
            tqdm.write(f"seed {seed} step {step}: ECE {summary}")
        all_runs["runs"][seed] = {"finetune_s": finetune_s, "steps": per_step}
    return all_runs


def load_checkpoint(peft_model, wrapper, cfg, step):
    from benchmarks.finetune import load_trainable_state_dict

    ckpt = torch.load(cfg.run_dir / f"step{step}.pt", map_location="cpu", weights_only=False)
    load_trainable_state_dict(peft_model, ckpt["trainable"])
    peft_model.eval()
    wrapper.eval()
    return peft_model, wrapper


# ------------------------------------------------------------------------------ reporting
def aggregate(all_runs: dict) -> dict[int, dict[str, dict[str, tuple[float, float]]]]:
    """step -> method -> metric -> (mean, std) over seeds."""
    seeds = list(all_runs["runs"])
    steps = list(all_runs["runs"][seeds[0]]["steps"])
    out: dict = {}
    for step in steps:
        out[step] = {}
        methods = [m for m in all_runs["runs"][seeds[0]]["steps"][step] if not m.startswith("_")]
        for m in methods:
            out[step][m] = {}
            for metric in METRICS:
                vals = torch.tensor([all_runs["runs"][s]["steps"][step][m][metric] for s in seeds])
                std = float(vals.std()) if len(vals) > 1 else 0.0
                out[step][m][metric] = (float(vals.mean()), std)
    return out


def markdown_table(agg: dict, step: int, n_seeds: int) -> str:
    lines = [
        f"Test metrics at step {step} (mean ± std over {n_seeds} seeds; ECE ×100, 15 bins)",
        "",
        "| method | ACC (%) | ECE (×100) | NLL | Brier | conf (%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m, vals in agg[step].items():
        acc, ece, nll, brier, conf = (vals[k] for k in METRICS)
        lines.append(
            f"| {m} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} | {100 * ece[0]:.1f} ± "
            f"{100 * ece[1]:.1f} | {nll[0]:.3f} ± {nll[1]:.3f} | {brier[0]:.3f} ± {brier[1]:.3f} | "
            f"{100 * conf[0]:.1f} |"
        )
    return "\n".join(lines)


def plots(all_runs: dict, agg: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(agg)
    methods = list(agg[steps[-1]])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("acc", "ece", "nll"), strict=True):
        for m in methods:
            have = [s for s in steps if m in agg[s]]
            mean = [agg[s][m][metric][0] for s in have]
            std = [agg[s][m][metric][1] for s in have]
            ax.errorbar(have, mean, yerr=std, marker="o", capsize=3, label=m)
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(metric.upper())
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p1 = out.with_name(out.name + "_steps.png")
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    first = next(iter(all_runs["runs"].values()))["steps"]
    last = first[steps[-1]]["_probs"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), sharey=True)
    labels = torch.tensor(last["labels"])
    for ax, m in zip(axes, ("map", "la_kron"), strict=True):
        if m not in last:
            continue
        probs = torch.tensor(last[m])
        conf, pred = probs.max(-1)
        correct = (pred == labels).float()
        edges = torch.linspace(0, 1, 16)
        centers, accs, counts = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = (conf > lo) & (conf <= hi)
            if sel.any():
                centers.append(float((lo + hi) / 2))
                accs.append(float(correct[sel].mean()))
                counts.append(int(sel.sum()))
        ax.bar(centers, accs, width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set_title(f"{m} (step {steps[-1]})")
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p2 = out.with_name(out.name + "_reliability.png")
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    p.add_argument(
        "--task",
        default=None,
        choices=sorted(TASKS),
        help="default: fine_foods for minilm, fine_foods_mc for smollm2",
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--checkpoints", type=int, nargs="*", default=[100])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=None, help=f"default per model: {DEFAULT_LR}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--la-batch-size", type=int, default=16)
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--factor-rank", type=int, default=16)
    p.add_argument("--prior", default="layerwise", choices=["scalar", "layerwise"])
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument(
        "--early-methods",
        default=",".join(EARLY_METHODS),
        help="methods evaluated at checkpoints before the last (the last runs all --methods)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default, all cores; 1 when sharing the machine)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the markdown and plots from the existing JSON (no training)",
    )
    p.add_argument(
        "--out", default=None, help="output prefix (default results/calibration_<model>_<task>)"
    )
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.early_methods = [m for m in args.early_methods.split(",") if m]
    args.task = args.task or DEFAULT_TASK[args.model]
    args.lr = DEFAULT_LR[args.model] if args.lr is None else args.lr
    if TASKS[args.task].kind != MODELS[args.model][0]:
        ok = sorted(t for t, spec in TASKS.items() if spec.kind == MODELS[args.model][0])
        p.error(f"task {args.task!r} does not fit model {args.model!r}; choose from {ok}")
    unknown = (set(args.methods) | set(args.early_methods)) - set(ALL_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}")
    return args


def load_runs(path: Path) -> dict:
    """A results JSON written by :func:`main`, with integer seeds and steps again."""
    all_runs = json.loads(path.read_text())
    all_runs["runs"] = {
        int(seed): {**r, "steps": {int(k): v for k, v in r["steps"].items()}}
        for seed, r in all_runs["runs"].items()
    }
    return all_runs


def report(all_runs: dict, args: argparse.Namespace, out: Path) -> None:
    """Write ``<out>.md`` and the plots from ``all_runs``; print the last step's table."""
    agg = aggregate(all_runs)
    n_seeds = len(all_runs["runs"])
    steps_md = "\n\n".join(markdown_table(agg, s, n_seeds) for s in sorted(agg))
    header = (
        f"# Calibration: {args.model} on {args.task}\n\n"
        f"{n_seeds} seeds, {args.n_train} train / {args.n_test} test examples, "
        f"{args.steps} steps, lr {args.lr:g}, batch {args.batch_size}; "
        f"wall time {all_runs['wall_s'] / 60:.1f} min. conf: mean top-class probability "
        "(below ACC: underconfident, above: overconfident).\n\n"
    )
    out.with_suffix(".md").write_text(header + steps_md + "\n")
    paths = plots(all_runs, agg, out)
    print(markdown_table(agg, max(agg), n_seeds))
    print(
        f"\nwrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, "
        + ", ".join(map(str, paths))
    )


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS / f"calibration_{args.model}_{args.task}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        all_runs = load_runs(out.with_suffix(".json"))
        report(all_runs, argparse.Namespace(**all_runs["args"]), out)
        return
    t0 = time.perf_counter()
    all_runs = run(args)
    all_runs["aggregate"] = {str(s): v for s, v in aggregate(all_runs).items()}
    all_runs["wall_s"] = time.perf_counter() - t0
    out.with_suffix(".json").write_text(json.dumps(all_runs, indent=1, default=str))
    report(all_runs, args, out)


if __name__ == "__main__":
    main()
