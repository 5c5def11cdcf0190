"""The default prior on tasks it was never chosen on: ``tweet_device_mc`` and
``pet_species_mc`` at issue 13's sizes (protocols fixed before the first runs; nothing here
is tuned).

The default (``optimize_prior_precision()``: the evidence, or the leave-one-out rule once
the MAP's training NLL is below ``SATURATED_TRAIN_NLL``) was chosen on validation splits of
``fine_foods_mc``, ``tweet_sentiment_mc`` and ``bbc_headlines_mc`` with 64 training
examples. This check changes the task (from which phone a campaign tweet was posted, a
noisy binary label) and the sizes to those of the issue's report: 256 train, 100
validation, 240 test, trained 30 epochs (960 steps of batch 8) until the MAP memorises,
with an early checkpoint after one epoch (32 steps). Three seeds, each one process::

    python -m benchmarks.llm_calibration --tasks tweet_device_mc --seeds S \\
        --n-train 256 --n-val 100 --n-test 240 --steps 960 --early 32 \\
        --no-baselines --no-diag --threads 1 \\
        --run-name 'heldout960-{task}-seed{seed}' \\
        --out benchmarks/results/llm_heldout_tweet_device_mc_seedS

A second held-out task, ``pet_species_mc`` (is a Seattle pet with this licence name a cat or
a dog), was added on 2026-12-01 with this protocol committed before its first run: the
same sizes, steps, LoRA, seeds 0, 1, 2 and command with ``--tasks pet_species_mc`` and
``--run-name 'heldout960-{task}-seed{seed}'``, written to
``benchmarks/results/llm_heldout_pet_species_mc_seedS``. Its bars are read exactly as the
first task's; the default (its threshold, rules and grids) stays as it is whatever comes
out, and a miss is reported with its per-seed numbers.

A third held-out task, ``movie_genre_mc`` (the genre of a film from its title, four classes:
the first held-out task with more than two, where the leave-one-out rule is least tested),
was added on 2026-12-05 with this protocol committed before its first run. It uses the
benchmark's own sizes, not the issue's, so that three seeds fit one session on two cores:
64 train, 100 validation, 240 test, 240 steps (30 epochs, as ``benchmarks.llm_memorised``),
an early checkpoint after one epoch (8 steps), seeds 0, 1, 2::

    python -m benchmarks.llm_calibration --tasks movie_genre_mc --seeds S \\
        --n-train 64 --n-val 100 --n-test 240 --steps 240 --early 8 \\
        --no-baselines --no-diag --threads 1 \\
        --run-name 'heldout240-{task}-seed{seed}' \\
        --out benchmarks/results/llm_heldout_multiclass_movie_genre_mc_seedS
    python -m benchmarks.llm_heldout --prefix llm_heldout_multiclass --tasks movie_genre_mc

Its bars are read as the other held-out tasks' and reported apart from them
(``llm_heldout_multiclass_bars.{json,md}``); nothing is changed on its strength.

Then this script merges each task's seeds into ``llm_heldout_{task}_3seeds.{json,md}``
and checks issue 13's overfit and early bars (no shift task) into
``llm_heldout_bars.{json,md}``, with a per-seed table::

    python -m benchmarks.llm_heldout

``--prefix`` reads and writes another family of per-seed files the same way, e.g. the
held-out checkpoints re-scored with the 8-draw leave-one-out kernel
(``prior_loo_draws_heldout_{task}_seedS``, from ``benchmarks.llm_rescore_default``)::

    python -m benchmarks.llm_heldout --prefix prior_loo_draws_heldout \\
        --previous "trained lora_A kernel"

(``--previous`` names the files' ``la_previous`` column: there, the rule's kernel with the
trained ``lora_A``, re-scored in the same run.)

Whatever comes out is reported; the default is not changed on the strength of these tasks.
"""

from __future__ import annotations

import argparse

from benchmarks import llm_memorised

PREFIX = "llm_heldout"
TASKS = ("tweet_device_mc", "pet_species_mc")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Merge the held-out seeds and check the bars.")
    p.add_argument("--prefix", default=PREFIX, help="per-seed files {prefix}_{task}_seedS")
    p.add_argument(
        "--previous",
        default=llm_memorised.COLUMNS["la_previous"],
        help="name of the files' la_previous column",
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help="the tasks whose seeds to merge")
    args = p.parse_args(argv)
    title = "Issue 13's bars on held-out tasks"
    tasks = tuple(args.tasks)
    llm_memorised.main(prefix=args.prefix, tasks=tasks, title=title, previous=args.previous)


if __name__ == "__main__":
    main()
