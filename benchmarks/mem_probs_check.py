"""Does repeated scoring from a ``LogitJacobianCache`` grow the process's memory?

Why. During an earlier three-process benchmark run, resident memory grew while the
plain-block path (``cache.probs`` without the eigenbasis) scored many prior values, and it
was never explained. This check scores one cached split 300 times at 21 cycling prior
precisions (joint MC, 1000 samples, a fresh seeded generator per call, as the prior searches
do) on a random Llama (hidden 256, 4 layers, LoRA r=8 on q, v, 2 choices, 64 test sequences
of 32 tokens), for the Kronecker posterior on both paths and the diagonal one, and records
the resident set size after every 50 calls (after ``gc.collect()``).

    python -m benchmarks.mem_probs_check

It writes ``results/mem_probs_check.{json,md}``. A growth of a few MiB is allocator noise. A
call that kept its Monte Carlo draws (64 x 1000 x 2 floats, 0.5 MiB) would add 150 MiB over
the 300 calls; one that kept a copy of the blocks (32,768 parameters x 2 choices x 64
sequences, 16 MiB), about 5 GiB.
"""

from __future__ import annotations

import argparse
import gc

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from laplace_lora_ext import LastTokenChoiceLM
from laplace_lora_ext.jacobian_cache import LogitJacobianCache

NAME = "mem_probs_check"
CALLS, EVERY, VOCAB = 300, 50, 500


def rss_trace(la, cache: LogitJacobianCache) -> list[float]:
    """Resident MiB after every ``EVERY`` of ``CALLS`` scorings at cycling priors."""
    trace = []
    for i in range(CALLS):
        la.prior_precision = float(10 ** (-2 + (i % 21) * 0.2))
        cache.probs(la, "mc", 1000, torch.Generator().manual_seed(0))
        if (i + 1) % EVERY == 0:
            gc.collect()
            trace.append(C.rss_bytes() / 2**20)
    return trace


def measure() -> dict[str, list[float]]:
    peft_model = C.build_llama_lora(
        hidden=256, intermediate=512, layers=4, vocab=VOCAB, heads=4, targets=("q_proj", "v_proj")
    )
    model = LastTokenChoiceLM(peft_model, C.choice_ids(2, VOCAB)).eval()
    train = C.make_loader(C.random_data(32, 32, VOCAB, 2, seed=41), 8)
    test = C.make_loader(C.random_data(64, 32, VOCAB, 2, seed=42), 8)
    out = {}
    for structure, paths in (("kron", (False, True)), ("diag", (False,))):
        la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure=structure)
        la.fit(train)
        for in_eigenbasis in paths:
            cache = LogitJacobianCache(la, test, in_eigenbasis=in_eigenbasis)
            name = f"{structure}, {'eigenbasis' if in_eigenbasis else 'plain blocks'}"
            out[name] = rss_trace(la, cache)
    return out


def render(r: dict[str, list[float]]) -> str:
    calls = [str(EVERY * (i + 1)) for i in range(CALLS // EVERY)]
    lines = [
        f"# {NAME}: resident memory while scoring one cached split {CALLS} times",
        "",
        "Random Llama (hidden 256, 4 layers), LoRA r=8 on q, v, 64 test sequences; joint MC "
        "with 1000 samples at 21 cycling prior precisions; RSS in MiB after gc.",
        "",
        "| posterior, path | " + " | ".join(f"after {c}" for c in calls) + " | growth |",
        "| --- | " + " | ".join("---" for _ in calls) + " | --- |",
    ]
    for name, trace in r.items():
        cells = " | ".join(f"{v:.0f}" for v in trace)
        lines.append(f"| {name} | {cells} | {trace[-1] - trace[0]:+.1f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.set_num_threads(1)
    result = measure()
    C.publish(NAME, args, result, {}, render(result))


if __name__ == "__main__":
    main()
