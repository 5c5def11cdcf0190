"""How far is the joint Monte Carlo estimate from the predictive it estimates? (label-free)

A wide posterior over more than two classes makes each draw's softmax nearly one-hot, so
the Monte Carlo average is noisy, and near-tied classes swap places from one generator
seed to the next. This measures the estimator's error, not the method: per stored
checkpoint of :mod:`benchmarks.mc_exchangeable_check` (tweets, 3 classes; BBC, 5 classes;
memorised and 10-epoch checkpoints, each with the file's default prior), the joint MC
estimate with ``S`` antithetic draws (5 generator seeds) against a reference of 200,000
draws: the largest absolute error of a class probability, how many inputs' top class
differs from the reference's, and the accuracy on the split (its spread over the seeds).
The draw count of the library's default (:func:`laplace_lora_ext.links.default_draws`) was
chosen from the validation rows' errors, which need no labels; the test rows show what the
seed spread does to a benchmark's accuracy::

    python -m benchmarks.mc_draws_check

Writes ``results/mc_draws_check.{json,md}``.
"""

from __future__ import annotations

import torch

from benchmarks import _common as C
from benchmarks._common import no_options
from benchmarks.mc_exchangeable_check import MOMENTS, TASKS
from laplace_lora_ext.links import mc_joint

NAME = "mc_draws_check"
DRAWS = (100, 1000, 10_000)
SEEDS = range(5)
REFERENCE_DRAWS = 200_000


def _reference(f_mu: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
    """The predictive ``(N, C)`` from ``REFERENCE_DRAWS`` draws, in chunks of 10,000."""
    gen = torch.Generator().manual_seed(10_000)
    chunks = REFERENCE_DRAWS // 10_000
    return sum(mc_joint(f_mu, f_var, 10_000, gen) for _ in range(chunks)) / chunks


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * float((probs.argmax(-1) == labels).double().mean())


def check(moments: dict, split: str) -> dict:
    """Errors of the estimate per draw count on one split's stored moments."""
    f_mu, f_var, labels = (moments[split][k] for k in ("f_mu", "f_var", "labels"))
    f_mu, f_var = f_mu.double(), f_var.double()
    ref = _reference(f_mu, f_var)
    out = {"reference_acc": _accuracy(ref, labels), "map_acc": _accuracy(f_mu, labels)}
    for S in DRAWS:
        errors, swaps, accs = [], [], []
        for seed in SEEDS:
            p = mc_joint(f_mu, f_var, S, torch.Generator().manual_seed(seed))
            errors.append(float((p - ref).abs().max()))
            swaps.append(int((p.argmax(-1) != ref.argmax(-1)).sum()))
            accs.append(_accuracy(p, labels))
        out[str(S)] = {
            "max_abs_error": sum(errors) / len(errors),
            "top_class_swaps": sum(swaps) / len(swaps),
            "acc_min": min(accs),
            "acc_max": max(accs),
        }
    out["n"] = len(labels)
    return out


def render(rows: dict) -> str:
    head = " | ".join(f"S = {S}: max error / swaps / ACC range" for S in DRAWS)
    lines = [
        f"# {NAME}: joint MC estimate against {REFERENCE_DRAWS:,} draws",
        "",
        f"Means over {len(SEEDS)} generator seeds of the largest class-probability error and",
        "of the inputs whose top class differs from the reference's; accuracy's range over",
        "the seeds. Antithetic draws.",
        "",
        f"| checkpoint | split | n | MAP ACC | reference ACC | {head} |",
        "| --- | --- | --- | --- | --- |" + " --- |" * len(DRAWS),
    ]
    for name, per_split in rows.items():
        for split, r in per_split.items():
            cells = [
                f"{r[str(S)]['max_abs_error']:.3f} / {r[str(S)]['top_class_swaps']:.1f} / "
                f"{r[str(S)]['acc_min']:.0f}–{r[str(S)]['acc_max']:.0f}"
                for S in DRAWS
            ]
            lines.append(
                f"| {name} | {split} | {r['n']} | {r['map_acc']:.0f} | {r['reference_acc']:.0f} | "
                + " | ".join(cells)
                + " |"
            )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    rows = {}
    for path in sorted(p for t in TASKS for p in MOMENTS.glob(f"{t}-*.pt")):
        moments = torch.load(path, weights_only=False)
        rows[path.stem] = {split: check(moments, split) for split in ("validation", "test")}
        print(path.stem, flush=True)
    C.write_results(NAME, rows, render(rows))
    print(render(rows))


if __name__ == "__main__":
    no_options(__doc__)
    main()
