"""KFAC's input factor over the positions that reach the logits, against the textbook rule.

Since 5e23c4a our KFAC input factor ``A`` averages ``a aᵀ`` only over the real positions
whose output gradient is non-zero (:mod:`laplace_lora_ext.curvature.kfac`). The textbook
rule (Eschenhagen et al. 2023), which curvlinops and ASDL compute and this package used
before, averages every real token. The two differ on layers that some positions do not
reach: every block's query at the first token (it attends to itself alone), the last
block's query behind :class:`~laplace_lora_ext.LastTokenChoiceLM` (read at the last
position only). Both are compared here with the **exact** block-diagonal GGN from explicit
per-example Jacobians, on the small float64 model of :mod:`benchmarks.bench_peers` (random
Llama, hidden 32, 2 layers, vocabulary 64, LoRA r = 2 on q, v and ``lm_head``, 4 classes),
per layer group and in total: trace ratio (KFAC / exact) and relative Frobenius error.
The textbook rule is stock laplace-torch's ``CurvlinopsGGN`` backend on the same ``lora``
posterior (it matched our previous factors to about 1e-7)::

    python -m benchmarks.kfac_reach_check   # about a minute; results/kfac_reach_check.{json,md}
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

import torch

from benchmarks import _common as C
from benchmarks.bench_peers import SMALL, _build, _compare_exact, _ours
from laplace_lora_ext import testing as R

NAME = "kfac_reach_check"
#: layer groups by parameter name (the model has 2 blocks)
GROUPS = {
    "q_proj, block 0": r"layers\.0\.self_attn\.q_proj",
    "q_proj, block 1 (last)": r"layers\.1\.self_attn\.q_proj",
    "v_proj": r"v_proj",
    "lm_head": r"lm_head",
}


def compare(n: int, T: int, approx: str, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {"reaching" | "textbook": errors}}`` for ``n`` random sequences of ``T``."""
    from laplace.curvature import CurvlinopsGGN

    args = {"seed": seed, "seq": 16, "lora_b_std": 0.3, "init_range": 0.3, "rank_threshold": 10**9}
    model = _build(SMALL, args, 2, torch.float64, 4)
    data = C.random_data(n, T, SMALL["vocab"], 4, seed=31)
    fits = {}
    for name, kw in {"reaching": {}, "textbook": {"backend": CurvlinopsGGN}}.items():
        la = _ours(model, None, args, asdl_fisher_kwargs={"kfac_approx": approx}, **kw)
        la.fit(C.make_loader(data, min(n, 8)))
        fits[name] = R.dense_kron_factors(la.H_facs)
    exact = R.exact_ggn_blocks(model, data, la.params)
    names = la.lora_param_names
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group, regex in {**GROUPS, "all": r"."}.items():
        idx = [i for i, p in enumerate(names) if re.search(regex, p)]
        out[group] = {
            rule: _compare_exact([F[i] for i in idx], [exact[i] for i in idx])
            for rule, F in fits.items()
        }
    return out


def render(res: dict[str, Any]) -> str:
    rows = []
    for case, per_approx in res["cases"].items():
        for approx, groups in per_approx.items():
            for group, d in groups.items():
                rows.append(
                    [
                        case,
                        approx,
                        group,
                        f"{d['textbook']['trace_ratio']:.3f} / {d['textbook']['rel_frob_err']:.3f}",
                        f"{d['reaching']['trace_ratio']:.3f} / {d['reaching']['rel_frob_err']:.3f}",
                    ]
                )
    head = [
        "data",
        "kfac_approx",
        "layers",
        "textbook A (every token): trace ratio / rel. Frobenius error",
        "A over reaching positions (ours): trace ratio / rel. Frobenius error",
    ]
    return "\n".join(
        [
            f"# {NAME}: KFAC's input factor over the positions that reach the logits",
            "",
            "Against the exact block-diagonal GGN (explicit per-example Jacobians), float64, "
            "random Llama hidden 32, 2 layers, LoRA r=2 on q, v, lm_head, 4 classes, "
            "exact Fisher, no padding. Textbook rule: stock laplace-torch's CurvlinopsGGN on "
            f"the same posterior. Seed {res['seed']}; wall time {res['wall_s']:.0f} s.",
            "",
            C.md_table(head, rows),
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cases = {}
    for n, T in [(1, 16), (args.n, 16)]:
        cases[f"N={n}, T={T}"] = {a: compare(n, T, a, args.seed) for a in ("expand", "reduce")}
    res = {"seed": args.seed, "cases": cases, "wall_s": time.perf_counter() - t0}
    C.publish(NAME, args, res, {}, render(res))


if __name__ == "__main__":
    main()
