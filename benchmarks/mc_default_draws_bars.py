"""Issue 13's bars with the library's default number of Monte Carlo draws (test; nothing
is chosen here).

The benchmark files score the default with 1000 joint-MC draws per input. At 1000 the
estimate's top class still moves with the generator seed on wide posteriors over more
than two classes (:mod:`benchmarks.mc_draws_check`), and BBC's accuracy bar is decided by
a point or two. ``la(x, link_approx="mc")`` without ``n_samples`` now draws
:func:`laplace_lora_ext.links.default_draws` (10,000 here). This re-scores the default's
rows from the moments :mod:`benchmarks.mc_exchangeable_check` stored (the same fits and
priors as the files' ``la`` rows, on the cached models; fine foods' shifted split too):
with 1000 draws, with the default draws (generator seeded with the run's seed, as the
benchmark does) and with 200,000 draws (nearly the exact predictive). It checks the bars
(:mod:`benchmarks.llm_bars`) against the cached models' MAP and, under shift, against
temperature scaling with the file's temperature::

    python -m benchmarks.mc_default_draws_bars

Writes ``results/mc_default_draws_bars.{json,md}``.
"""

from __future__ import annotations

import torch

from benchmarks import _common as C
from benchmarks import llm_bars
from benchmarks._common import no_options
from benchmarks.llm_calibration import METRICS
from benchmarks.mc_draws_check import REFERENCE_DRAWS, _reference
from benchmarks.mc_exchangeable_check import MOMENTS, TASKS
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.links import mc_joint

NAME = "mc_default_draws_bars"
REGIMES = {"early": "16", "overfit": "80", "memorised": "240"}
ALL_TASKS = ("fine_foods_mc", *TASKS)
ESTIMATES = ("1000 draws", "default draws", f"{REFERENCE_DRAWS:,} draws")


def _probs(
    f_mu: torch.Tensor, f_var: torch.Tensor, seed: int, temperature: float
) -> dict[str, torch.Tensor]:
    """MAP, temperature scaling and the default's predictive ``(N, C)`` by each estimate."""
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    return {
        "map": f_mu.softmax(-1),
        "temp": (f_mu / temperature).softmax(-1),
        ESTIMATES[0]: mc_joint(f_mu, f_var, 1000, gen()),
        ESTIMATES[1]: mc_joint(f_mu, f_var, None, gen()),
        ESTIMATES[2]: _reference(f_mu, f_var),
    }


def summaries(task: str, step: str) -> dict[str, dict | None]:
    """Per split (``"test"``, ``"shift"``): ``{method: {metric: [mean over seeds]}}``, as
    ``llm_bars`` reads; ``None`` for a split the checkpoints do not have. Each checkpoint's
    moments are read once."""
    stored = [
        torch.load(MOMENTS / f"{task}-seed{seed}-step{step}.pt", weights_only=False)
        for seed in range(3)
    ]
    return {split: _summary(stored, split) for split in ("test", "shift")}


def _summary(stored: list[dict], split: str) -> dict | None:
    """Means over the seeds' ``stored`` moments on ``split`` (``None`` if missing)."""
    if any(split not in s for s in stored):
        return None
    per_seed = []
    for seed, s in enumerate(stored):
        m = s[split]
        f_mu, f_var = m["f_mu"].double(), m["f_var"].double()
        per_seed.append({
            name: classification_metrics(p.float(), m["labels"])
            for name, p in _probs(f_mu, f_var, seed, s["temperature"]).items()
        })  # fmt: skip
    return {
        name: {k: [sum(float(r[name][k]) for r in per_seed) / len(per_seed)] for k in METRICS}
        for name in per_seed[0]
    }


def main() -> None:
    torch.set_num_threads(1)
    out, lines = {}, [f"# {NAME}: the bars by number of Monte Carlo draws", ""]
    lines += ["Test split (shift: fine foods' shifted one), means over 3 seeds.", ""]
    lines += ["| task | regime | bar | " + " | ".join(ESTIMATES) + " |"]
    lines += ["| --- | --- | --- |" + " --- |" * len(ESTIMATES)]
    for task in ALL_TASKS:
        for regime, step in REGIMES.items():
            split = summaries(task, step)
            test, shift = split["test"], split["shift"]
            bars = {}
            for est in ESTIMATES:
                rows = llm_bars.early_bars if regime == "early" else llm_bars.overfit_bars
                bars[est] = rows({"map": test["map"], "la": test[est]})
                if shift is not None and regime != "early":  # the shift bar: overfit
                    bars[est] += llm_bars.shift_bars({"temp": shift["temp"], "la": shift[est]})
            out[f"{task}:{regime}"] = {"test": test, "shift": shift, "bars": bars}
            for i, bar in enumerate(bars[ESTIMATES[0]]):
                cells = [
                    f"{bars[e][i]['value']} (target {bars[e][i]['target']}): "
                    f"{'yes' if bars[e][i]['met'] else '**no**'}"
                    for e in ESTIMATES
                ]
                lines.append(f"| {task} | {regime} | {bar['bar']} | " + " | ".join(cells) + " |")
    met = {e: sum(b["met"] for r in out.values() for b in r["bars"][e]) for e in ESTIMATES}
    total = sum(len(r["bars"][ESTIMATES[0]]) for r in out.values())
    lines += ["", "Met: " + ", ".join(f"{e} {n} of {total}" for e, n in met.items()), ""]
    C.write_results(NAME, out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    no_options(__doc__)
    main()
