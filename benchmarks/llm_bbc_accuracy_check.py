"""Why does the default lose accuracy on BBC's 10-epoch checkpoints: Monte Carlo noise, or the
predictive itself? A diagnostic on the larger test split of
:mod:`benchmarks.llm_larger_splits_check` (500 examples per seed, step 80).

On those 500 examples per seed the default's joint-MC predictions (1000 draws) are 2.0
points less accurate than MAP's on BBC's 5 classes. This script re-scores the same
posterior (same fit, default prior) with

* ``mc1000``: the benchmark's draws (generator seeded with the seed);
* ``mc1000_other``: 1000 other draws (seed + 1000): how many predictions MC noise flips;
* ``mc20000``: 20,000 draws, close to the exact predictive mean;
* ``probit``: laplace-torch's multiclass probit;

and reports each one's accuracy, the predictions that move away from MAP's class (right →
wrong and wrong → right), the predicted-class histograms, and the mean posterior variance
of each class's logit. Reading, fixed before the run: if ``mc20000`` is within 1 point of
MAP's accuracy, the loss was Monte Carlo noise (more draws fix it); otherwise it is the
predictive's own (the Gaussian average over the logits moves the argmax).

::

    python -m benchmarks.llm_bbc_accuracy_check \
        benchmarks/results/llm_calibration_bbc_headlines_mc_3seeds.json 0

Writes ``results/llm_bbc_accuracy_check_seed{seed}.json``; ``--report`` merges the seeds into
``results/llm_bbc_accuracy_check.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import llm_calibration as calib
from benchmarks.llm_larger_splits_check import (
    fitted_checkpoint,
    larger_test,
    parse_seed_or_report,
    seed_or_report_parser,
)
from benchmarks.tasks import make_loader
from laplace_lora_ext import eigenbasis
from laplace_lora_ext.jacobian_cache import LogitJacobianCache

RESULTS = calib.RESULTS
N_MORE = 400
DRAWS = {"mc1000": (1000, 0), "mc1000_other": (1000, 1000), "mc20000": (20000, 0)}


def logit_variances(cache: LogitJacobianCache, la) -> torch.Tensor:
    """``(N, C)``: the posterior variance of each class's logit at each input (``cache``
    holds its blocks in ``la``'s eigenbasis)."""
    out = [eigenbasis.variance(la, la.H, blocks).diagonal(0, 1, 2) for _, blocks, _ in cache]
    return torch.cat(out).float()


def predictions(cache: LogitJacobianCache, la, seed: int) -> dict[str, torch.Tensor]:
    """method -> probabilities ``(N, C)``."""
    probs = {"map": cache.logits.float().softmax(-1)}
    for name, (n, offset) in DRAWS.items():
        gen = torch.Generator().manual_seed(seed + offset)
        probs[name] = cache.probs(la, "mc", n, gen).float()
    probs["probit"] = cache.probs(la, "probit").float()
    return probs


def summary(probs: dict[str, torch.Tensor], labels: torch.Tensor, var: torch.Tensor) -> dict:
    """Accuracy, moves away from MAP's class, class histograms and logit variances."""
    pred = {m: p.argmax(-1) for m, p in probs.items()}
    right = {m: p == labels for m, p in pred.items()}
    n_classes = probs["map"].shape[-1]
    out = {
        "n": len(labels),
        "acc": {m: float(r.float().mean()) for m, r in right.items()},
        "moved": {m: int((p != pred["map"]).sum()) for m, p in pred.items() if m != "map"},
        "right_to_wrong": {m: int((right["map"] & ~r).sum()) for m, r in right.items()},
        "wrong_to_right": {m: int((~right["map"] & r).sum()) for m, r in right.items()},
        "mc_flips": int((pred["mc1000"] != pred["mc1000_other"]).sum()),
        "histogram": {m: torch.bincount(p, minlength=n_classes).tolist() for m, p in pred.items()},
        "labels": torch.bincount(labels, minlength=n_classes).tolist(),
        "logit_var_mean": var.mean(0).tolist(),
    }
    return out


def run(path: str, seed: int) -> Path:
    c, la, _, args = fitted_checkpoint(path, seed)
    loader = make_loader(larger_test(c, args, N_MORE), c.collate, args.la_batch_size)
    if not eigenbasis.supports(la):
        raise RuntimeError("this check scores KFAC posteriors in their eigenbasis")
    cache = LogitJacobianCache(la, loader, in_eigenbasis=True)  # as llm_larger_splits_check
    result = summary(predictions(cache, la, seed), cache.labels, logit_variances(cache, la))
    result |= {"task": c.task, "seed": seed}
    out = RESULTS / f"llm_bbc_accuracy_check_seed{seed}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return out


def report() -> None:
    runs = [
        json.loads(p.read_text()) for p in sorted(RESULTS.glob("llm_bbc_accuracy_check_seed*.json"))
    ]
    methods = list(runs[0]["acc"])
    lines = [
        "# BBC, step 80: where the default's accuracy goes (500 test examples per seed)",
        "",
        "`python -m benchmarks.llm_bbc_accuracy_check`. ACC in %; moved: predictions whose "
        "class differs from MAP's (right → wrong / wrong → right).",
        "",
        "| seed | " + " | ".join(methods) + " | MC flips (two 1000-draw runs) |",
        "| --- " * (len(methods) + 2) + "|",
    ]
    for r in runs:
        cells = [f"{100 * r['acc']['map']:.1f}"] + [
            f"{100 * r['acc'][m]:.1f} ({r['right_to_wrong'][m]} / {r['wrong_to_right'][m]})"
            for m in methods[1:]
        ]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['mc_flips']} |")
    mean = {m: sum(r["acc"][m] for r in runs) / len(runs) for m in methods}
    lines.append("| mean | " + " | ".join(f"{100 * v:.1f}" for v in mean.values()) + " | |")
    lines += [
        "",
        "Predicted classes (labels, MAP, mc20000) and the mean logit variance per class:",
        "",
    ]
    for r in runs:
        lines.append(
            f"- seed {r['seed']}: labels {r['labels']}, MAP {r['histogram']['map']}, "
            f"mc20000 {r['histogram']['mc20000']}; variance "
            + ", ".join(f"{v:.2f}" for v in r["logit_var_mean"])
        )
    (RESULTS / "llm_bbc_accuracy_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    a = parse_seed_or_report(seed_or_report_parser(__doc__))
    if a.report:
        report()
    else:
        run(a.path, a.seed)
