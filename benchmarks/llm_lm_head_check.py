"""The default call path with LoRA on ``lm_head`` too (the paper's targets: q, v, lm_head).

Every SmolLM2 benchmark puts LoRA on ``q_proj`` and ``v_proj`` only. The Laplace-LoRA paper
also adapts ``lm_head``, whose ``lora_B`` has a vocabulary-sized output side (49,152 rows on
SmolLM2, tied to the input embeddings): its Kronecker output factor is kept low rank by
``factor_rank="auto"``, and only the choice tokens' rows get any curvature. This check runs
issue 13's default call path on such an adapter: does it run, at what cost, and does it
still calibrate?

``fine_foods_mc``, 64 train / 50 validation / 100 test, 80 steps at lr 1e-3 (the 10-epoch
benchmark's overfit setting), seeds 0, 1, 2 (seed 0 ran first, as a smoke check; seeds 1
and 2 were added after it, with nothing changed). Nothing was tuned on it.

    python -m benchmarks.llm_lm_head_check --seed S     # S = 0, 1, 2
    python -m benchmarks.llm_lm_head_check --report

Writes ``results/llm_lm_head_check_seed{S}.{json,md}``; ``--report`` writes the means over
seeds and issue 13's four overfit bars on them to ``results/llm_lm_head_check.md``. The
fine-tuning runs are cached as ``lmhead-fine_foods_mc-seed{S}``. ``benchmarks.finetune``
takes its LoRA targets from ``MODELS``; this script adds ``lm_head`` there for its own runs
only, so the cache identity of every other run is unchanged.
"""

from __future__ import annotations

import json
import resource
import time
import warnings

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401  (registers subset_of_weights="lora")
from benchmarks import finetune as ft
from benchmarks.calibration import temperature
from benchmarks.llm_calibration import RESULTS
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.evaluation import classification_metrics

TARGETS = ("q_proj", "v_proj", "lm_head")
CONFIG = dict(model="smollm2", task="fine_foods_mc", n_train=64, n_val=50, n_test=100, steps=80,
              lr=1e-3, save_every=16)  # fmt: skip


def fine_tuned(seed: int) -> tuple[ft.FinetuneConfig, object, object]:
    """``(cfg, wrapper, collate)`` of the run with LoRA on :data:`TARGETS` (trained or cached)."""
    kind, _, task_type = ft.MODELS["smollm2"]
    saved = dict(ft.MODELS)
    ft.MODELS["smollm2"] = (kind, TARGETS, task_type)
    try:
        cfg = ft.FinetuneConfig(**CONFIG, seed=seed, data_seed=seed,
                                run_name=f"lmhead-fine_foods_mc-seed{seed}")  # fmt: skip
        _, (_, tokenizer, wrapper) = ft.train(cfg, progress=False)
    finally:
        ft.MODELS.clear()
        ft.MODELS.update(saved)
    return cfg, wrapper.eval(), make_collate(tokenizer, "causal", cfg.seq_len)


@torch.no_grad()
def logits_labels(wrapper, loader) -> tuple[torch.Tensor, torch.Tensor]:
    out = [(wrapper(b).float(), b["labels"]) for b in loader]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def run(seed: int) -> dict:
    torch.set_num_threads(2)
    cfg, wrapper, collate = fine_tuned(seed)
    data = ft._load_data(cfg)
    train, val, test = (
        make_loader(x, collate, 8) for x in (data.train, data.validation, data.test)
    )
    t = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.process_time()
        la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
        la.fit(train)
        t["fit_cpu_s"], t0 = time.process_time() - t0, time.process_time()
        la.optimize_prior_precision()  # the default call path
        t["prior_cpu_s"], t0 = time.process_time() - t0, time.process_time()
        gen = torch.Generator().manual_seed(seed)
        probs = torch.cat([la(b, link_approx="mc", n_samples=1000, generator=gen) for b in test])
        t["predict_cpu_s"] = time.process_time() - t0
    logits, labels = logits_labels(wrapper, test)
    T = temperature(*logits_labels(wrapper, val))
    methods = {"map": logits.softmax(-1), "temp": (logits / T).softmax(-1), "la": probs}
    lm_head = [(n, float(p)) for n, p in zip(la.lora_param_names, la.prior_precision, strict=True)
               if "lm_head" in n]  # fmt: skip
    return {
        "config": CONFIG, "seed": seed, "targets": TARGETS, "n_params": la.n_params,
        "train_nll": float(la.loss) / la.n_data, "temperature": T,
        "lm_head_prior": lm_head, "times": t,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught}),
        "test": {m: classification_metrics(p.float(), labels) for m, p in methods.items()},
    }  # fmt: skip


def table_row(name: str, x: dict) -> str:
    """``| name | ACC | ECE | NLL | conf |`` of one method's test metrics (fractions)."""
    return (f"| {name} | {100 * x['acc']:.1f} | {100 * x['ece']:.1f} | "
            f"{x['nll']:.3f} | {100 * x['conf']:.1f} |")  # fmt: skip


def markdown(r: dict) -> str:
    names = {"map": "MAP", "temp": "temperature (validation)", "la": "**Laplace-LoRA, default**"}
    lines = [
        f"# The default call path with LoRA on q, v and lm_head (seed {r['seed']}, test)", "",
        f"SmolLM2-135M-Instruct, `fine_foods_mc`, seed {r['seed']}, "
        "64 train / 50 validation / 100 test, "
        f"80 steps (lr 1e-3); LoRA r = 8 on {', '.join(r['targets'])}: {r['n_params']:,} "
        f"parameters. Training NLL {r['train_nll']:.3f}. CPU seconds (2 threads): fit "
        f"{r['times']['fit_cpu_s']:.0f}, `optimize_prior_precision()` "
        f"{r['times']['prior_cpu_s']:.0f}, joint MC predictive on 100 examples (1000 draws) "
        f"{r['times']['predict_cpu_s']:.0f}; peak resident memory {r['max_rss_gb']:.1f} GB.", "",
        "| method | ACC | ECE | NLL | conf |", "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    lines += [table_row(name, r["test"][m]) for m, name in names.items()]
    lines += [
        "",
        "Prior precisions of the `lm_head` LoRA matrices: "
        + ", ".join(
            f"{n.split('lm_head.')[1].split('.')[0]} {v:.4g}" for n, v in r["lm_head_prior"]
        )
        + ".",
    ]
    lines += ["", "Warnings during fit, prior and prediction: "
              + ("; ".join(r["warnings"]) if r["warnings"] else "none") + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def report() -> str:
    """Means over the per-seed files and issue 13's four overfit bars on them."""
    from benchmarks import llm_bars

    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("llm_lm_head_check_seed*.json"))]
    keys = ("acc", "ece", "nll", "conf")
    mean = {m: {k: (sum(r["test"][m][k] for r in runs) / len(runs),) for k in keys}
            for m in ("map", "temp", "la")}  # fmt: skip
    lines = [
        "# The default call path with LoRA on q, v and lm_head (test, means over seeds)", "",
        f"Seeds {[r['seed'] for r in runs]}; per seed: `llm_lm_head_check_seed*.md`.", "",
        "| method | ACC | ECE | NLL | conf |", "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for m, name in (("map", "MAP"), ("temp", "temperature (validation)"), ("la", "default")):
        lines.append(table_row(name, {k: v[0] for k, v in mean[m].items()}))
    lines += ["", "| bar | default | target | met |", "| --- | --- | --- | --- |"]
    for b in llm_bars.overfit_bars(mean):
        lines.append(
            f"| {b['bar']} | {b['value']} | {b['target']} | {'yes' if b['met'] else 'no'} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "llm_lm_head_check.md").write_text(text)
    return text


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="means over the per-seed files")
    a = parser.parse_args()
    if a.report:
        print(report())
        return
    r = run(a.seed)
    (RESULTS / f"llm_lm_head_check_seed{a.seed}.json").write_text(json.dumps(r, indent=1))
    (RESULTS / f"llm_lm_head_check_seed{a.seed}.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
