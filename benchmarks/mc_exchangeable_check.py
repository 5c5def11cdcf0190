"""Does an exchangeable logit covariance keep MAP's argmax with more than two classes?
(validation decides; test reported)

With more than two classes a wide ``lora_B`` prior gives the classes' logits unequal
variances, and the joint Monte Carlo average favours the high-variance classes: the
posterior average moves BBC's 5-way argmax (the default's accuracy misses MAP's by 2
points at memorisation). A class-exchangeable covariance cannot move it. With ``P`` the
class-centring map and ``Σ`` ``(C, C)`` an input's logit covariance, the candidate replaces
``Σ`` by ``tr(P Σ P) / (C − 1) · P``: the same total centred variance, equal for every
class, with equal correlations. Softmax ignores a common shift, so with two classes this
is ``P Σ P``: the same Gaussian over the logit difference (other Monte Carlo draws). Only
``C > 2`` tasks are scored here.

Pre-registered (written before any number was seen), on the 3- and 5-class tasks
(``tweet_sentiment_mc``, ``bbc_headlines_mc``; 3 seeds each), at the memorised checkpoint
(the default is the 8-draw leave-one-out rule) and the 10-epoch checkpoints, early and
overfit (the default is ``lora_marglik``), each with the file's default prior:

- the candidate is offered as ``link_approx="mc_exchangeable"`` if, on the **validation**
  splits pooled over the 12 memorised and overfit checkpoints, its mean NLL is no higher
  than joint MC's and its accuracy is higher, and on the 6 early checkpoints its mean
  validation NLL is at most 1 % higher;
- ``link_approx="mc"`` stays laplace-torch's joint MC whatever comes out: it is what a
  laplace-torch user asks for, and changing it would be a silent change of method.

Both predictives use the same 1000 antithetic draws per input (generator seeded with the
run's seed). Per checkpoint it also records how unequal the classes' variances are (the
mean over inputs of the largest diagonal entry of ``P Σ P`` over the smallest).

``--collect`` rebuilds each checkpoint from the run cache, fits the Kronecker posterior,
sets the file's default prior and stores the predictive moments of the validation and test
splits (and of the shifted test split where the file has one) under
``benchmarks/cache/moments/``; ``--tasks`` collects other tasks' (fine foods' for
:mod:`benchmarks.mc_default_draws_bars`). Without ``--collect`` the report is written from
the 3- and 5-class tasks' moments::

    python -m benchmarks.mc_exchangeable_check --collect --source memorised
    python -m benchmarks.mc_exchangeable_check --collect --source ten_epoch
    python -m benchmarks.mc_exchangeable_check

Writes ``results/mc_exchangeable_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from benchmarks import llm_calibration as calib
from benchmarks.tasks import make_loader
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.jacobian_cache import LogitJacobianCache
from laplace_lora_ext.links import mc_joint

MOMENTS = Path(__file__).parent / "cache" / "moments"
NAME = "mc_exchangeable_check"
TASKS = ("tweet_sentiment_mc", "bbc_headlines_mc")
#: result file per source (``{task}`` filled in) and its checkpoints as (step, regime)
SOURCES = {
    "memorised": ("prior_loo_draws_{task}.json", (("240", "memorised"),)),
    "ten_epoch": ("llm_calibration_{task}_3seeds.json", (("16", "early"), ("80", "overfit"))),
}
SPLITS = ("validation", "test")


def _centring(f_var: torch.Tensor) -> torch.Tensor:
    """The class-centring map ``P = I − 1 1ᵀ / C`` ``(C, C)`` for ``f_var`` ``(N, C, C)``."""
    C = f_var.shape[-1]
    return torch.eye(C, dtype=f_var.dtype) - 1.0 / C


def exchangeable(f_var: torch.Tensor) -> torch.Tensor:
    """``tr(P Σ P) / (C − 1) · P`` for each ``Σ`` in ``f_var`` ``(N, C, C)``."""
    P = _centring(f_var)
    scale = (P @ f_var @ P).diagonal(dim1=-2, dim2=-1).sum(-1) / (f_var.shape[-1] - 1)
    return scale[:, None, None] * P


def variance_imbalance(f_var: torch.Tensor) -> float:
    """Mean over inputs of max / min of the centred variances ``diag(P Σ P)``."""
    P = _centring(f_var)
    var = (P @ f_var @ P).diagonal(dim1=-2, dim2=-1)
    return float((var.max(-1).values / var.min(-1).values.clamp_min(1e-300)).mean())


def moments(la, cache: LogitJacobianCache) -> dict:
    """``{"f_mu": (N, C), "f_var": (N, C, C), "labels": (N,)}`` of ``la`` on ``cache``."""
    mus, variances = [], []
    for f_mu, blocks, _ in cache:
        variances.append(la._functional_variance_blocks([b.to(la._dtype) for b in blocks]))
        mus.append(f_mu.to(la._dtype))
    return {"f_mu": torch.cat(mus), "f_var": torch.cat(variances), "labels": cache.labels}


def collect(source: str, tasks: tuple[str, ...] = TASKS) -> None:
    """Store the moments of every checkpoint of ``source`` (skips those already stored),
    and of the shifted test split where the file has one."""
    pattern, steps = SOURCES[source]
    MOMENTS.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        payload = json.loads((C.RESULTS_DIR / pattern.format(task=task)).read_text())
        args = argparse.Namespace(**payload["args"])
        torch.set_num_threads(args.threads or 1)
        for per_seed in payload["runs"].values():
            for run in per_seed.values():
                run["checkpoints"] = {s: c for s, c in run["checkpoints"].items()
                                      if s in dict(steps)}  # fmt: skip
        for c in calib.cached_checkpoints(payload["runs"], args):
            out = MOMENTS / f"{task}-seed{c.seed}-step{c.step}.pt"
            if out.exists():
                continue
            train_loader = make_loader(c.data.train, c.collate, args.la_batch_size)
            la = Laplace(c.wrapper, "classification", subset_of_weights="lora",
                         hessian_structure="kron")  # fmt: skip
            la.fit(train_loader)
            la.prior_precision = torch.tensor(c.ckpt["_prior"]["la"], dtype=la._dtype)
            stored = {"regime": dict(steps)[c.step], "temperature": c.ckpt["_temperature"]}
            splits = {split: getattr(c.data, split) for split in SPLITS}
            if c.shifted is not None and "shift" in c.ckpt:
                splits["shift"] = c.shifted.test
            for split, examples in splits.items():
                cache = LogitJacobianCache(la, make_loader(examples, c.collate, args.la_batch_size))
                stored[split] = moments(la, cache)
            torch.save(stored, out)
            print(f"{task} seed {c.seed} step {c.step}: stored", flush=True)


def score(stored: dict, seed: int, n_samples: int = 1000) -> dict:
    """Metrics of MAP, joint MC and the exchangeable MC per split of one checkpoint."""
    out = {"regime": stored["regime"]}
    for split in SPLITS:
        m = stored[split]
        f_mu, f_var, labels = m["f_mu"], m["f_var"], m["labels"]
        probs = {
            "map": f_mu.softmax(-1),
            "mc": mc_joint(f_mu, f_var, n_samples, torch.Generator().manual_seed(seed)),
            "mc_exchangeable": mc_joint(
                f_mu, exchangeable(f_var), n_samples, torch.Generator().manual_seed(seed)
            ),
        }
        rows = {}
        for name, p in probs.items():
            metrics = classification_metrics(p.float(), labels)
            rows[name] = {k: float(metrics[k]) for k in calib.METRICS}
            rows[name]["flips"] = int((p.argmax(-1) != f_mu.argmax(-1)).sum())
        rows["imbalance"] = variance_imbalance(f_var)
        out[split] = rows
    return out


def pooled(scores: dict, regimes: set[str], split: str) -> dict:
    """Mean metrics per method over the checkpoints of ``regimes``."""
    chosen = [s[split] for s in scores.values() if s["regime"] in regimes]
    methods = ("map", "mc", "mc_exchangeable")
    return {
        m: {k: sum(r[m][k] for r in chosen) / len(chosen) for k in (*calib.METRICS, "flips")}
        for m in methods
    } | {"n": len(chosen)}


def decision(scores: dict) -> dict:
    """The pre-registered rule, on validation splits only."""
    late = pooled(scores, {"memorised", "overfit"}, "validation")
    early = pooled(scores, {"early"}, "validation")
    checks = {
        "late NLL not higher": late["mc_exchangeable"]["nll"] <= late["mc"]["nll"],
        "late ACC higher": late["mc_exchangeable"]["acc"] > late["mc"]["acc"],
        "early NLL within 1 %": early["mc_exchangeable"]["nll"] <= 1.01 * early["mc"]["nll"],
    }
    return {"checks": checks, "offer": all(checks.values())}


def render(scores: dict, summary: dict) -> str:
    """Markdown report: per checkpoint and pooled, validation then test."""
    fmt = "{acc:.1f} / {ece:.1f} / {nll:.3f} / {conf:.1f} / {flips}"
    lines = [
        f"# {NAME}: joint MC against the exchangeable-covariance MC (C > 2 tasks)",
        "",
        "ACC / ECE / NLL / mean confidence / predictions moved off MAP's class. Each",
        "checkpoint with the file's default prior; 1000 antithetic draws, the same for both.",
        "",
        "| checkpoint | regime | split | variance imbalance | MAP | joint MC | exchangeable |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in scores.items():
        for split in SPLITS:
            r = s[split]
            cells = [fmt.format(**_points(r[m])) for m in ("map", "mc", "mc_exchangeable")]
            lines.append(f"| {name} | {s['regime']} | {split} | {r['imbalance']:.2f} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "## Pooled means", "", "| regimes | split | n | MAP | joint MC | exchangeable |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for key, p in summary["pooled"].items():
        regimes, split = key.split(":")
        cells = [fmt.format(**_points(p[m])) for m in ("map", "mc", "mc_exchangeable")]
        lines.append(f"| {regimes} | {split} | {p['n']} | " + " | ".join(cells) + " |")
    d = summary["decision"]
    lines += ["", "## Pre-registered decision (validation only)", ""]
    lines += [f"- {k}: {'yes' if v else 'no'}" for k, v in d["checks"].items()]
    lines += [f'- offer `link_approx="mc_exchangeable"`: {"yes" if d["offer"] else "no"}', ""]
    return "\n".join(lines)


def _points(row: dict) -> dict:
    """ACC, ECE and confidence ×100 for display."""
    return row | {k: 100 * row[k] for k in ("acc", "ece", "conf")}


def report() -> None:
    """Score every stored checkpoint and write the JSON and markdown."""
    scores = {}
    for path in sorted(p for t in TASKS for p in MOMENTS.glob(f"{t}-*.pt")):
        seed = int(path.stem.split("-seed")[1].split("-")[0])
        scores[path.stem] = score(torch.load(path, weights_only=False), seed)
    groups = {"memorised,overfit": {"memorised", "overfit"}, "memorised": {"memorised"},
              "overfit": {"overfit"}, "early": {"early"}}  # fmt: skip
    summary = {
        "pooled": {
            f"{g}:{split}": pooled(scores, regimes, split)
            for g, regimes in groups.items()
            for split in SPLITS
        },  # fmt: skip
        "decision": decision(scores),
    }
    payload = {"scores": scores, "summary": summary}
    C.write_results(NAME, payload, render(scores, summary))
    print(render(scores, summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", action="store_true", help="store the moments first")
    parser.add_argument("--source", choices=tuple(SOURCES), help="which checkpoints to collect")
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="tasks to collect")
    a = parser.parse_args()
    if a.collect:
        if not a.source:
            parser.error("--collect needs --source")
        collect(a.source, tuple(a.tasks))
    else:
        report()
