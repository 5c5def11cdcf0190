"""What do the default 10,000 Monte Carlo draws cost? Ours against laplace-torch's "mc" link.

``la(x, link_approx="mc")`` without ``n_samples`` now draws
:func:`laplace_lora_ext.links.default_draws` per input (10,000 for up to 14 classes) where
laplace-torch draws 100. This times the link alone, on random logit moments ``(B, C)`` and
``(B, C, C)`` in float64, one thread: ours (:func:`laplace_lora_ext.links.mc_joint`) and
laplace-torch 0.3's own joint MC (``BaseLaplace._glm_forward_call`` on a tiny
``KronLaplace`` whose GLM moments are these), each with 100 and with 10,000 draws, in one
process. Median CPU seconds of 5 calls::

    python -m benchmarks.bench_mc_draws

Writes ``results/bench_mc_draws.{json,md}``. For scale: SmolLM2's GLM moments take about
10 s per batch of 8 (``llm_calibration``'s progress bar), those at 7B layer shapes 4.5 CPU s
per batch of 4 (``bench_scale``).
"""

from __future__ import annotations

import argparse

import torch
from laplace import KronLaplace

from benchmarks import _common as C
from laplace_lora_ext.links import mc_joint

SHAPES = ((4, 2), (8, 2), (4, 5), (8, 5), (4, 14), (8, 14))  # (batch, classes)
DRAWS = (100, 10_000)


def moments(B: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logit means ``(B, C)`` and positive-definite covariances ``(B, C, C)``."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(B, n_classes, n_classes, generator=gen, dtype=torch.float64)
    f_mu = torch.randn(B, n_classes, generator=gen, dtype=torch.float64)
    return f_mu, A @ A.mT + 0.1 * torch.eye(n_classes, dtype=torch.float64)


def stock_link(f_mu: torch.Tensor, f_var: torch.Tensor, n: int) -> torch.Tensor:
    """laplace-torch's joint MC on these moments (a ``KronLaplace`` that returns them)."""
    la = KronLaplace(torch.nn.Linear(2, f_mu.shape[1]).double(), "classification")
    la._glm_predictive_distribution = lambda x, joint=False, diagonal_output=False: (f_mu, f_var)
    return la._glm_forward_call(torch.zeros(1, 2), "classification", link_approx="mc", n_samples=n)


def timed(B: int, n_classes: int) -> dict:
    """CPU seconds of both links at each of :data:`DRAWS` on one shape's moments."""
    f_mu, f_var = moments(B, n_classes)
    gen = torch.Generator().manual_seed(0)
    row: dict = {"batch": B, "classes": n_classes}
    for n in DRAWS:
        row[f"ours_{n}"] = C.cpu_seconds(lambda n=n: mc_joint(f_mu, f_var, n, gen), repeats=5)
        row[f"stock_{n}"] = C.cpu_seconds(lambda n=n: stock_link(f_mu, f_var, n), repeats=5)
    return row


def render(rows: list[dict]) -> str:
    cols = [f"{who} {n:,}" for n in DRAWS for who in ("ours", "laplace-torch")]
    lines = [
        "# The Monte Carlo link's cost: ours against laplace-torch's, 100 and 10,000 draws",
        "",
        "Milliseconds per call (median CPU time of 5, one thread), float64 moments.",
        "",
        "| batch | classes | " + " | ".join(cols) + " | ours 10,000 / laplace-torch 100 |",
        "| --- | --- |" + " --- |" * (len(cols) + 1),
    ]
    for r in rows:
        cells = [f"{1e3 * r[f'{who}_{n}']:.2f}" for n in DRAWS for who in ("ours", "stock")]
        ratio = r[f"ours_{DRAWS[-1]}"] / r[f"stock_{DRAWS[0]}"]
        shape = f"| {r['batch']} | {r['classes']} | "
        lines.append(shape + " | ".join(cells) + f" | {ratio:.0f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(1)
    rows = [timed(B, n_classes) for B, n_classes in SHAPES]
    C.write_results("bench_mc_draws", {"environment": C.environment(), "rows": rows}, render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
