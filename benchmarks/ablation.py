"""Which Laplace-LoRA choices matter? Curvature and prior variants on the same checkpoints.

Reuses :mod:`benchmarks.calibration`'s fine-tuned runs (same cache, same run names), and at
the last checkpoint of each seed fits one Laplace posterior per variant:

* ``kron``            KFAC, exact Fisher, ``kfac_approx="expand"``, layerwise marglik prior
  (the calibration benchmark's ``la_kron``);
* ``kron_reduce``     the same with ``kfac_approx="reduce"``;
* ``kron_mc``         Monte-Carlo Fisher (one sampled label per example);
* ``kron_empirical``  empirical Fisher (gradients at the true labels);
* ``kron_scalar``     one prior precision for all LoRA matrices;
* ``kron_init``       the prior centred at the adapter's initialisation (LoRA's random A
  and B = 0, plus a trained head's init) instead of at zero: the marglik prior then
  measures how far fine-tuning moved the weights, not the size of the random init;
* ``diag``            exact GGN diagonal, layerwise prior (``la_diag``);
* ``diag_scalar``     the same with a scalar prior.

Every variant is scored on the test split (joint-MC GLM predictive) and by its own log
marginal likelihood on the training data, the quantity one may use to choose between
variants without validation data. Writes ``results/ablation_<model>_<task>.{json,md}``.

Example (after, or instead of, ``python -m benchmarks.calibration``)::

    python -m benchmarks.ablation --model minilm --task fine_foods
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from benchmarks import calibration as cal
from benchmarks._common import publish  # writes results/<name>.{json,md}
from benchmarks.finetune import build_model, classification_metrics, trainable_state_dict
from benchmarks.tasks import make_collate, make_loader

#: name -> (hessian_structure, prior_structure, Laplace keyword arguments)
#: (``prior_mean="init"`` is resolved per run by :func:`init_prior_mean`).
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "kron": ("kron", "layerwise", {}),
    "kron_init": ("kron", "layerwise", {"prior_mean": "init"}),
    "kron_reduce": ("kron", "layerwise", {"kfac_approx": "reduce"}),
    "kron_mc": ("kron", "layerwise", {"fisher_type": "mc"}),
    "kron_empirical": ("kron", "layerwise", {"fisher_type": "empirical"}),
    "kron_scalar": ("kron", "scalar", {}),
    "diag": ("diag", "layerwise", {}),
    "diag_scalar": ("diag", "scalar", {}),
}


def init_state(cfg, data) -> dict[str, torch.Tensor]:
    """Trainable tensors of a freshly built model: the adapter's (seeded) initialisation."""
    peft_model, _, _ = build_model(cfg, data)
    state = trainable_state_dict(peft_model)
    del peft_model
    return state


def init_prior_mean(la, peft_model, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flat prior mean ``(P,)`` in ``la.params`` order: each tensor's value at init."""
    name_of = {id(p): n for n, p in peft_model.named_parameters()}
    return torch.cat([state[name_of[id(p)]].reshape(-1) for p in la.params]).to(la._dtype)


def fit_variant(model, peft_model, train_loader, name: str, extra: bool, seed: int, init):
    """Fit one variant with :func:`benchmarks.calibration.fit_laplace`."""
    structure, prior, kw = VARIANTS[name]
    kw = dict(kw)
    if kw.pop("prior_mean", None) == "init":
        kw["prior_mean"] = lambda la: init_prior_mean(la, peft_model, init)
    if name == "kron_mc":
        kw["seed"] = seed
    return cal.fit_laplace(model, train_loader, structure, prior, include_extra_params=extra, **kw)


def evaluate_variants(peft_model, wrapper, data, cfg, args, seed: int) -> dict[str, dict]:
    """Test metrics, log marginal likelihood and fit time of every requested variant."""
    collate = make_collate(peft_model._benchmark_tokenizer, data.kind, cfg.seq_len)
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    test_loader = make_loader(data.test, collate, args.la_batch_size)
    model = cal.laplace_model(peft_model, wrapper, data.kind, data)
    logits, labels = cal.logits_of(model, test_loader)
    out = {"map": classification_metrics(logits.softmax(-1), labels)}
    init = init_state(cfg, data) if any("init" in v for v in args.variants) else None
    for name in tqdm(args.variants, desc=f"seed {seed}: variants"):
        t0 = time.perf_counter()
        la = fit_variant(model, peft_model, train_loader, name, data.kind == "encoder", seed, init)
        fit_s = time.perf_counter() - t0
        probs = cal.predict(la, test_loader, ("mc",), args.n_samples, seed)["mc"]
        out[name] = classification_metrics(probs, labels)
        out[name]["log_marglik"] = float(la.log_marginal_likelihood())
        out[name]["fit_s"] = fit_s
    return out


def aggregate(runs: dict[int, dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, std) over seeds."""
    seeds = list(runs)
    agg: dict = {}
    for m in runs[seeds[0]]:
        keys = [k for k in runs[seeds[0]][m] if k != "ece_bins"]
        agg[m] = {}
        for k in keys:
            vals = torch.tensor([float(runs[s][m][k]) for s in seeds])
            agg[m][k] = (float(vals.mean()), float(vals.std()) if len(seeds) > 1 else 0.0)
    return agg


def markdown(agg: dict, args: argparse.Namespace, wall_s: float) -> str:
    lines = [
        f"# Laplace-LoRA ablation: {args.model} on {args.task}",
        "",
        f"Step {args.steps}, {len(args.seeds)} seeds ({args.n_train} train / {args.n_test} "
        f"test), joint-MC GLM predictive ({args.n_samples} samples), marglik prior; "
        f"wall time {wall_s / 60:.1f} min. `log p(D)`: the variant's own log marginal "
        "likelihood on the training data (higher is better; needs no held-out data).",
        "",
        "| variant | ACC (%) | ECE (×100) | NLL | Brier | log p(D) | fit (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, v in agg.items():
        extra = (
            f"{v['log_marglik'][0]:.1f} ± {v['log_marglik'][1]:.1f} | {v['fit_s'][0]:.1f}"
            if "log_marglik" in v
            else "– | –"
        )
        lines.append(
            f"| {m} | {100 * v['acc'][0]:.1f} ± {100 * v['acc'][1]:.1f} | "
            f"{100 * v['ece'][0]:.1f} ± {100 * v['ece'][1]:.1f} | "
            f"{v['nll'][0]:.3f} ± {v['nll'][1]:.3f} | {v['brier'][0]:.3f} ± {v['brier'][1]:.3f} | "
            f"{extra} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    known, rest = p.parse_known_args(argv)
    args = cal.parse(rest)
    args.variants = [v for v in known.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        cfg, data, (peft_model, wrapper), _ = cal.finetuned(args, seed, args.steps)
        peft_model, wrapper = cal.load_checkpoint(peft_model, wrapper, cfg, args.steps)
        runs[seed] = evaluate_variants(peft_model, wrapper, data, cfg, args, seed)
    wall_s = time.perf_counter() - t0
    agg = aggregate(runs)
    name = args.out or f"ablation_{args.model}_{args.task}"
    publish(name, args, {"aggregate": agg, "wall_s": wall_s}, runs, markdown(agg, args, wall_s))


if __name__ == "__main__":
    main()
