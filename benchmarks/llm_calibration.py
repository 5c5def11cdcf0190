"""Calibration of Laplace-LoRA on a causal LLM, where it matters: prior-selection rules at an
early (MAP calibrated) and an overfit (MAP overconfident) checkpoint, and under shift.

For each task and seed: fine-tune SmolLM2-135M-Instruct with LoRA (r=8, α=16, dropout 0.1
on q, v) in the paper's "... Answer:" format for ``--steps`` steps over ``--n-train``
examples (many epochs, so the MAP memorises), keeping the ``--early`` checkpoint too.
At each checkpoint one KFAC fit and one GLM pass per split (logit Jacobian blocks kept in
memory) serve every method:

* ``map``           the fine-tuned model's softmax;
* ``temp``          temperature scaling on the validation split;
* ``la``            **the default**: ``optimize_prior_precision()`` (``"auto"``: here
  ``"lora_marglik"``, each ``lora_A`` at its spread-matched precision, the rest by
  layerwise marglik, since no checkpoint has memorised its data; the function-space rule
  once one has; no validation data), joint MC;
* ``la_probit``     the same posterior with the probit link;
* ``la_marglik``    laplace-torch's marglik (layerwise, Adam 200 steps, lr 0.1), joint MC;
* ``la_val``        ``method="gridsearch"`` on the validation split (scalar δ), joint MC;
* ``la_last``       the default prior, posterior over the last block's LoRA matrices only;
* ``la_diag``       a diagonal posterior (its own fit) with the default prior, joint MC;
* ``mc_dropout``    LoRA dropout on at test time, 10 samples (:mod:`benchmarks.baselines`);
* ``ckpt_ens``      the last three checkpoints of the run (final checkpoint only).

With ``--shift``, a model fine-tuned on ``fine_foods_mc`` is also scored on
``tweet_polarity_mc`` (positive/negative tweets in the same prompt, same answers): metrics
per method and the AUROC of telling shifted from in-domain test inputs by predictive
entropy.

Writes ``results/llm_calibration.{json,md}`` and a reliability plot. The defaults are the
demo (one task, one seed, 64 training examples, 80 steps = 10 epochs; about 15 minutes on
2 CPU cores)::

    python -m benchmarks.llm_calibration

The issue-13 benchmark::

    python -m benchmarks.llm_calibration --tasks fine_foods_mc,tweet_sentiment_mc \
        --seeds 0 1 2 --n-train 128 --n-val 100 --n-test 200 --steps 160 --early 32 --shift \
        --out benchmarks/results/llm_calibration_full
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from laplace import Laplace
from tqdm.auto import tqdm

import laplace_lora_ext  # noqa: F401  (registers subset_of_weights="lora")
from benchmarks.baselines import ensembles, mc_dropout
from benchmarks.calibration import last_block_regex, temperature
from benchmarks.finetune import FinetuneConfig, load_trainable_state_dict, train
from benchmarks.tasks import load_task, make_collate, make_loader
from laplace_lora_ext import guards
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.jacobian_cache import LogitJacobianCache

RESULTS = Path(__file__).parent / "results"
METHODS = (
    "map", "temp", "la", "la_probit", "la_marglik", "la_val", "la_last", "la_diag",
    "mc_dropout", "ckpt_ens",
)  # fmt: skip
CKPT_ENSEMBLE = 3  # members of the checkpoint ensemble
MC_DROPOUT_SAMPLES = 10
METRICS = ("acc", "ece", "nll", "brier", "conf")
SHIFT = {"fine_foods_mc": "tweet_polarity_mc"}


# ------------------------------------------------------------------------ GLM cache
def mc_probs(cache: LogitJacobianCache, la: Any, args, seed: int, keep=None) -> torch.Tensor:
    """Joint-MC probabilities ``(N, C)`` of ``la`` on a cached split (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    return cache.probs(la, "mc", args.n_samples, gen, keep).float()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """AUROC of ``score`` ranking shifted (positive) above in-domain inputs."""
    from torchmetrics.functional.classification import binary_auroc

    scores = torch.cat([scores_in, scores_out])
    target = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))]).long()
    return float(binary_auroc(scores, target))


# ------------------------------------------------------------------------ methods
def prior_rules(la: Any, val_loader: Any, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Prior precision chosen by each rule (the fitted ``la`` is reused)."""
    rules = {}
    la.optimize_prior_precision()  # the default: "auto"
    rules["la"] = la.prior_precision.clone()
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=200)
    rules["la_marglik"] = la.prior_precision.clone()
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val_loader,
        link_approx="mc",
        n_samples=args.n_samples,
        grid_size=args.grid_size,
        progress_bar=True,
    )
    rules["la_val"] = la.prior_precision.clone()
    return rules


@torch.no_grad()
def validation_logits(la: Any, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP logits ``(N, C)`` and labels of the validation split (a forward only)."""
    logits, labels = [], []
    with guards.eval_mode(la.model):
        for batch in loader:
            logits.append(la.model(batch).float())
            labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def fit_diag(model: Any, train_loader: Any) -> Any:
    """A diagonal LoRA posterior with the default prior (``la_diag``)."""
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="diag")
    la.fit(train_loader, progress_bar=True)
    la.optimize_prior_precision()
    return la


def baseline_probs(
    model: Any, loaders: dict[str, Any], states: list | None, seed: int, owner: Any = None
) -> dict[str, dict[str, torch.Tensor]]:
    """split -> {"mc_dropout": (N, C), "ckpt_ens": (N, C) if ``states``} probabilities;
    ``owner``: the PEFT model the checkpoint states belong to (inside ``model``)."""
    out = {}
    for split, loader in loaders.items():
        out[split] = {
            "mc_dropout": mc_dropout.predict_probs(model, loader, MC_DROPOUT_SAMPLES, seed)
        }
        if states:
            out[split]["ckpt_ens"] = ensembles.predict_probs(model, loader, states, owner)
    return out


def score(
    la: Any,
    caches: dict[str, LogitJacobianCache],
    rules: dict,
    last: set[int],
    args,
    seed: int,
    T: float,
    la_diag: Any = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, dict[str, dict]]:
    """split -> method -> metrics (+ entropies for the shift AUROC, probabilities on test).

    ``extra``: split -> method -> probabilities ``(N, C)`` computed elsewhere (baselines).
    """
    out: dict[str, dict[str, dict]] = {}
    for split, cache in caches.items():
        probs = {"map": cache.logits.softmax(-1).float(), "temp": (cache.logits / T).softmax(-1)}
        la.prior_precision = rules["la"]
        probs["la"] = mc_probs(cache, la, args, seed)
        probs["la_probit"] = cache.probs(la, "probit").float()
        probs["la_last"] = mc_probs(cache, la, args, seed, last)
        for name in ("la_marglik", "la_val"):
            la.prior_precision = rules[name]
            probs[name] = mc_probs(cache, la, args, seed)
        la.prior_precision = rules["la"]
        if la_diag is not None:
            probs["la_diag"] = mc_probs(cache, la_diag, args, seed)
        probs.update((extra or {}).get(split, {}))
        out[split] = {m: classification_metrics(p.float(), cache.labels) for m, p in probs.items()}
        out[split]["_entropy"] = {m: entropy(p).tolist() for m, p in probs.items()}
        if split == "test":
            out[split]["_probs"] = {m: probs[m].tolist() for m in ("map", "la")}
            out[split]["_labels"] = cache.labels.tolist()
    out["_temperature"] = T
    out["_prior"] = {k: v.tolist() for k, v in rules.items()}
    return out


def evaluate_checkpoint(
    model, data, shifted, collate, args, seed: int, states=None, owner=None
) -> dict:
    """Every method at one checkpoint; ``states``: checkpoint-ensemble members (or None)
    of ``owner``, the PEFT model inside ``model``."""
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    val_loader = make_loader(data.validation, collate, args.la_batch_size)
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    t0 = time.perf_counter()
    la.fit(train_loader, progress_bar=True)
    fit_s = time.perf_counter() - t0
    T = temperature(*validation_logits(la, val_loader))
    splits = {"test": data.test}
    if shifted is not None:
        splits["shift"] = shifted.test
    loaders = {s: make_loader(ex, collate, args.la_batch_size) for s, ex in splits.items()}
    t0 = time.perf_counter()
    caches = {s: LogitJacobianCache(la, loader, progress=True) for s, loader in loaders.items()}
    glm_s = time.perf_counter() - t0
    rules = prior_rules(la, val_loader, args)
    regex = last_block_regex(model)
    last = {i for i, n in enumerate(la.lora_param_names) if re.search(regex, n)}
    t0 = time.perf_counter()
    la_diag = fit_diag(model, train_loader) if args.diag else None
    diag_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    extra = baseline_probs(model, loaders, states, seed, owner) if args.baselines else None
    baselines_s = time.perf_counter() - t0
    result = score(la, caches, rules, last, args, seed, T, la_diag, extra)
    result["_fit_s"], result["_diag_fit_s"] = fit_s, diag_s
    n_scored = sum(len(c.labels) for c in caches.values())
    result["_seconds_per_example"] = {  # wall seconds, shared machine
        "glm_pass": glm_s / n_scored,  # logits + Jacobian blocks, before any link
        "mc_dropout_and_ckpt_ens": baselines_s / n_scored,
    }
    result["_train_nll"] = float(la.loss) / la.n_data
    if shifted is not None:
        ent_in, ent_out = result["test"]["_entropy"], result["shift"]["_entropy"]
        result["shift_auroc"] = {
            m: auroc(torch.tensor(ent_in[m]), torch.tensor(ent_out[m])) for m in ent_in
        }
    return result


# ------------------------------------------------------------------------ driver
def finetune_config(task: str, seed: int, args: argparse.Namespace) -> FinetuneConfig:
    """The fine-tuning run of ``task`` and ``seed`` (cached under ``benchmarks/cache``)."""
    return FinetuneConfig(
        model="smollm2",
        task=task,
        seed=seed,
        data_seed=seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        steps=args.steps,
        lr=args.lr,
        save_every=args.early or args.steps,
        run_name=args.run_name.format(task=task, seed=seed) if args.run_name else None,
    )


def load_splits(task: str, seed: int, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(data, shifted)``: the task's seeded splits and, with ``--shift``, the shifted test."""
    data = load_task(task, args.n_train, args.n_val, args.n_test, seed=seed)
    shifted = None
    if args.shift and task in SHIFT:
        shifted = load_task(SHIFT[task], 0, 0, args.n_test, seed=seed)
    return data, shifted


class CachedCheckpoint(NamedTuple):
    """One checkpoint of a result file, its fine-tuned weights loaded (eval mode)."""

    task: str
    seed: int
    step: str
    ckpt: dict  # the file's entry for this checkpoint
    wrapper: Any
    data: Any
    shifted: Any
    collate: Any


def cached_checkpoints(
    runs: dict, args: argparse.Namespace, skip: Callable[[dict], bool] = lambda ckpt: False
) -> Iterator[CachedCheckpoint]:
    """Every run and checkpoint of a result file's ``runs`` (``task -> seed -> run``) whose
    entry ``skip`` does not reject, rebuilt from the cache (no fine-tuning if cached; if not,
    trained only as far as the run's last checkpoint kept in ``runs``)."""
    for task, per_seed in runs.items():
        for seed, run in per_seed.items():
            cfg = finetune_config(task, int(seed), args)
            data, shifted = load_splits(task, int(seed), args)
            last = max(int(step) for step in run["checkpoints"])
            _, (peft_model, tokenizer, wrapper) = train(cfg, data, progress=False, until=last)
            collate = make_collate(tokenizer, data.kind, cfg.seq_len)
            for step, ckpt in run["checkpoints"].items():
                if skip(ckpt):
                    continue
                path = cfg.run_dir / f"step{step}.pt"
                state = torch.load(path, map_location="cpu", weights_only=False)
                load_trainable_state_dict(peft_model, state["trainable"])
                wrapper.eval()
                yield CachedCheckpoint(task, int(seed), step, ckpt, wrapper, data, shifted, collate)


def cached_checkpoint(
    path: str | Path, seed: int, step: str
) -> tuple[CachedCheckpoint, argparse.Namespace]:
    """``(checkpoint, args)``: ``step`` of the run with ``seed`` in the result file ``path``,
    rebuilt from the cache (:func:`cached_checkpoints`), with torch's threads set to the
    file's ``--threads``."""
    payload = json.loads(Path(path).read_text())
    args = argparse.Namespace(**payload["args"])
    torch.set_num_threads(args.threads or 1)
    runs = {t: {str(seed): {"checkpoints": {step: r[str(seed)]["checkpoints"][step]}}}
            for t, r in payload["runs"].items()}  # fmt: skip
    (c,) = list(cached_checkpoints(runs, args))
    return c, args


def trained_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(data, wrapper, collate)``: the fine-tuned model (last step) of ``args``' first
    task and seed, trained first unless cached (eval mode)."""
    task, seed = args.tasks[0], args.seeds[0]
    data, _ = load_splits(task, seed, args)
    cfg = finetune_config(task, seed, args)
    _, (_, tokenizer, wrapper) = train(cfg, data, progress=True)
    return data, wrapper.eval(), make_collate(tokenizer, data.kind, cfg.seq_len)


def run_task(task: str, seed: int, args: argparse.Namespace) -> dict:
    cfg = finetune_config(task, seed, args)
    data, shifted = load_splits(task, seed, args)
    t0 = time.perf_counter()
    result, (peft_model, tokenizer, wrapper) = train(cfg, data, progress=True)
    finetune_s = time.perf_counter() - t0
    collate = make_collate(tokenizer, data.kind, cfg.seq_len)
    out = {"finetune_s": finetune_s, "checkpoints": {}}
    for step in [s for s in (args.early, args.steps) if s]:
        ckpt = torch.load(cfg.run_dir / f"step{step}.pt", map_location="cpu", weights_only=False)
        load_trainable_state_dict(peft_model, ckpt["trainable"])
        wrapper.eval()
        states = None
        if step == args.steps and args.baselines:
            states = ensembles.checkpoint_states(cfg.run_dir, last=CKPT_ENSEMBLE)
        res = evaluate_checkpoint(wrapper, data, shifted, collate, args, seed, states, peft_model)
        out["checkpoints"][step] = res
        tqdm.write(f"{task} seed {seed} step {step}: " + summary_line(res["test"]))
    return out


def summary_line(split: dict) -> str:
    return ", ".join(
        f"{m} ECE {100 * v['ece']:.1f} NLL {v['nll']:.3f}"
        for m, v in split.items()
        if not m.startswith("_")
    )


# ------------------------------------------------------------------------ report
def summarize(runs: dict) -> dict:
    """task -> step -> split -> method -> metric -> (mean, std, n) over seeds."""
    out: dict = {}
    for task, per_seed in runs.items():
        out[task] = {}
        seeds = list(per_seed)
        for step in per_seed[seeds[0]]["checkpoints"]:
            out[task][step] = {}
            first = per_seed[seeds[0]]["checkpoints"][step]
            for split in ("test", "shift"):
                if split not in first:
                    continue
                out[task][step][split] = {}
                for m in (m for m in first[split] if not m.startswith("_")):
                    runs_m = [per_seed[s]["checkpoints"][step][split] for s in seeds]
                    runs_m = [r[m] for r in runs_m if m in r]  # a baseline may lack seeds
                    out[task][step][split][m] = {k: _mean_std(runs_m, k) for k in METRICS}
            if "shift_auroc" in first:
                aurocs = [per_seed[s]["checkpoints"][step]["shift_auroc"] for s in seeds]
                out[task][step]["auroc"] = {
                    m: float(torch.tensor([a[m] for a in aurocs if m in a]).mean())
                    for m in first["shift_auroc"]
                }
    return out


def _mean_std(runs: list[dict], key: str) -> tuple[float, float, int]:
    """``(mean, std, n)`` of ``key`` over the seeds' metric dicts (std 0 for one seed)."""
    vals = torch.tensor([r[key] for r in runs])
    std = float(vals.std()) if len(vals) > 1 else 0.0
    return float(vals.mean()), std, len(vals)


def render(summary: dict, args: dict) -> str:
    lines = [
        "# Laplace-LoRA calibration on SmolLM2-135M (causal, '... Answer:' format)",
        "",
        f"n_train {args['n_train']}, n_test {args['n_test']}, {args['steps']} steps "
        f"(early checkpoint {args['early']}), lr {args['lr']:g}, seeds {args['seeds']}. "
        "Mean ± std over seeds; ECE ×100 (15 bins); conf = mean top-class probability.",
    ]
    for task, steps in summary.items():
        for step, splits in steps.items():
            for split in ("test", "shift"):
                if split not in splits:
                    continue
                lines += ["", f"## {task}, step {step}, {split}", ""]
                lines += ["| method | ACC (%) | ECE | NLL | Brier | conf (%) |"]
                lines += ["| --- | --- | --- | --- | --- | --- |"]
                n_seeds = max(v["acc"][2] for v in splits[split].values())
                for m, v in splits[split].items():
                    acc, ece, nll, brier, conf = (v[k] for k in METRICS)
                    label = m if acc[2] == n_seeds else f"{m} ({acc[2]} seed(s))"
                    lines.append(
                        f"| {label} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} | "
                        f"{100 * ece[0]:.1f} ± {100 * ece[1]:.1f} | {nll[0]:.3f} ± {nll[1]:.3f} | "
                        f"{brier[0]:.3f} ± {brier[1]:.3f} | {100 * conf[0]:.1f} |"
                    )
            if "auroc" in splits:
                lines += ["", "AUROC (shifted vs in-domain by predictive entropy): "]
                lines += [", ".join(f"{m} {a:.3f}" for m, a in splits["auroc"].items())]
    return "\n".join(lines) + "\n"


def parse(
    argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Command-line options; ``parser`` may bring a caller's own options first."""
    p = parser or argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="fine_foods_mc", help="comma-separated causal tasks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--steps", type=int, default=80, help="fine-tuning steps (batch 8)")
    p.add_argument("--early", type=int, default=16, help="early checkpoint (0: none)")
    p.add_argument(
        "--run-name",
        default=None,
        help="fine-tuning cache name, e.g. 'x-{task}-seed{seed}' (default: finetune's)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--la-batch-size", type=int, default=8)
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--grid-size", type=int, default=21)
    p.add_argument("--shift", action="store_true", help="also score fine_foods_mc models on tweets")
    p.add_argument("--no-diag", dest="diag", action="store_false", help="skip la_diag")
    p.add_argument(
        "--no-baselines", dest="baselines", action="store_false", help="skip MC dropout, ckpt_ens"
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "llm_calibration"))
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    return args


def reliability_plot(runs: dict, path: Path) -> Path:
    """MAP vs the default Laplace-LoRA at the last checkpoint of the first task and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from laplace_lora_ext.evaluation import reliability_diagram

    task, per_seed = next(iter(runs.items()))
    seed, run = next(iter(per_seed.items()))
    step = max(run["checkpoints"])
    test = run["checkpoints"][step]["test"]
    labels = torch.tensor(test["_labels"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), sharey=True)
    for ax, (m, title) in zip(axes, (("map", "MAP"), ("la", "Laplace-LoRA")), strict=True):
        reliability_diagram(torch.tensor(test["_probs"][m]), labels, ax=ax, title=title)
    fig.suptitle(f"{task}, seed {seed}, step {step} (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.offline import CAUSAL_ASSETS, ensure_packages

    ensure_packages(CAUSAL_ASSETS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = {task: {seed: run_task(task, seed, args) for seed in args.seeds} for task in args.tasks}
    summary = summarize(runs)
    payload = {"args": vars(args), "runs": runs, "summary": summary}
    payload["wall_s"] = time.perf_counter() - t0
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    out.with_suffix(".md").write_text(render(summary, vars(args)))
    png = reliability_plot(runs, out.with_name(out.name + "_reliability.png"))
    print(render(summary, vars(args)))
    print(f"wall time {payload['wall_s'] / 60:.1f} min; wrote {out}.json, {out}.md, {png}")


if __name__ == "__main__":
    main()
