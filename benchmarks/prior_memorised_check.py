"""Dev study (issue 13): does the default prior hold as an adapter memorises its data?

The issue's user trained until the training NLL was 0.0008; the benchmark's checkpoints
stop at 0.04-0.7. This trains one 128-example SmolLM2 run for 60 epochs (960 steps) and
scores checkpoints along the way on the VALIDATION split (never test): MAP, temperature
scaling, the default prior (``optimize_prior_precision()``) and a few fixed ``lora_B``
precisions, the function-space rule of ``prior_lora_b_check`` and the larger of it and the
default per tensor, with the training NLL of the MAP at each checkpoint. Convergence warnings of
the evidence are printed.

    python -m benchmarks.prior_memorised_check TASK > benchmarks/results/prior_memorised_check_TASK.log
    python -m benchmarks.prior_memorised_check TASK 160   # only the listed steps
"""

# ruff: noqa: E501  (a dev study: one printed line per rule)

import sys
import time
import warnings

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks.finetune import FinetuneConfig, load_run, train
from benchmarks.prior_study import blocks_of, metrics, print_map_and_temperature
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.prior import function_space_precision, lora_a_mask

STEPS, EVERY = 960, 160


def line(name, m, extra=""):
    return f"{name:14s} | VAL acc {m['acc']:.3f} ece {100 * m['ece']:5.1f} nll {m['nll']:.3f} conf {m['conf']:.3f} {extra}"


def main(task: str, steps: list[int] | None = None, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    cfg = FinetuneConfig(
        model="smollm2", task=task, seed=0, data_seed=0, n_train=128, n_test=200,
        steps=STEPS, lr=1e-3, save_every=EVERY, run_name=f"memo-{task}-seed0",
    )  # fmt: skip
    t0 = time.time()
    train(cfg, progress=False)
    print(f"trained {time.time() - t0:.0f}s", flush=True)
    for step in steps or range(2 * EVERY, STEPS + 1, 2 * EVERY):
        peft_model, tok, wrapper, data = load_run(cfg, step)
        collate = make_collate(tok, data.kind, cfg.seq_len)
        train_loader = make_loader(data.train, collate, 8)
        la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
        la.fit(train_loader)
        val = blocks_of(la, make_loader(data.validation, collate, 8))
        print(
            f"\n## step {step}: MAP train NLL {la.loss / la.n_data:.5f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
        print_map_and_temperature(val, width=14)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            la.optimize_prior_precision(method="lora_marglik")
        for w in caught:
            print(f"  warning: {str(w.message)[:160]}")
        default = la.prior_precision.clone()
        is_a = lora_a_mask(la.lora_param_names)
        print(
            line(
                "default", metrics(la, val, default), f"dB med {float(default[~is_a].median()):.3g}"
            )
        )
        d_fs = float(function_space_precision(la, train_loader)[~is_a][0])
        prior = torch.where(is_a, default, torch.full_like(default, d_fs))
        print(line("fspace", metrics(la, val, prior), f"dB {d_fs:.3g}"))
        print(
            line(
                "max(ml,fs)", metrics(la, val, torch.where(is_a, default, default.clamp_min(d_fs)))
            )
        )
        for d in (3, 30, 300):
            prior = torch.where(is_a, default, torch.full_like(default, d))
            print(line(f"B {d}", metrics(la, val, prior)), flush=True)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2:]] or None)
