"""The default on SmolLM2 checkpoints before and after KFAC's input factor over the positions
that reach the logits (5e23c4a), same checkpoints, splits and Monte Carlo draws.

The change moves every Laplace row of the calibration benchmarks, and re-running them takes
hours on 2 cores. This measures its size where the fine-tuned checkpoints are cached:
``fine_foods_mc`` seed 0 at 10 epochs (steps 16 and 80) and memorised (step 240, with the
shifted tweets). Each result file is reduced to seed 0 and re-scored by
:mod:`benchmarks.llm_rescore_default` twice, with the code before the change (a worktree at
d0b57cd) and after it, in the same environment, so that the difference is the change alone
(the file's own stored rows may predate other changes)::

    git worktree add /tmp/old d0b57cd   # then, in /tmp/old and in this checkout:
    python -m benchmarks.llm_rescore_default SEED0.json --out OUT_{old,new}
    python -m benchmarks.kfac_reach_rescore OLD.json NEW.json [OLD.json NEW.json ...]

Writes ``results/kfac_reach_rescore.{json,md}``: per checkpoint and split, the default's
(``la``) and the last block's (``la_last``) ACC / ECE / NLL / confidence, the probit row,
the shift AUROC and the chosen prior precisions (their geometric mean over tensors).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks import _common as C

NAME = "kfac_reach_rescore"
ROWS = ("la", "la_probit", "la_last")


def _geomean(prior: list[float]) -> float:
    return math.exp(sum(math.log(p) for p in prior) / len(prior))


def compare(old: dict, new: dict) -> list[dict[str, Any]]:
    """One record per (task, seed, step, split, row) present in both files."""
    out = []
    for task, per_seed in new["runs"].items():
        for seed, run in per_seed.items():
            for step, ck_new in run["checkpoints"].items():
                ck_old = old["runs"][task][seed]["checkpoints"][step]
                for split in ("test", "shift"):
                    if split not in ck_new:
                        continue
                    for row in ROWS:
                        if row not in ck_new[split]:
                            continue
                        rec = {"task": task, "seed": int(seed), "step": int(step), "split": split}
                        rec |= {"row": row, "old": ck_old[split][row], "new": ck_new[split][row]}
                        rec["map"] = ck_new[split]["map"]
                        if split == "shift":
                            rec["auroc"] = {
                                "old": ck_old["shift_auroc"][row],
                                "new": ck_new["shift_auroc"][row],
                            }
                        rec["prior_geomean"] = {
                            "old": _geomean(ck_old["_prior"]["la"]),
                            "new": _geomean(ck_new["_prior"]["la"]),
                        }
                        rec["map_check"] = {
                            "old": ck_old.get("_rescore_map_max_abs_diff"),
                            "new": ck_new.get("_rescore_map_max_abs_diff"),
                        }
                        out.append(rec)
    return out


def render(records: list[dict[str, Any]]) -> str:
    rows = [
        [
            f"{r['task']} s{r['seed']} step {r['step']}",
            r["split"],
            r["row"],
            C.metric_cell(r["map"]),
            C.metric_cell(r["old"]),
            C.metric_cell(r["new"]),
            f"{r['new']['nll'] - r['old']['nll']:+.3f}",
            f"{r['prior_geomean']['old']:.3g} → {r['prior_geomean']['new']:.3g}",
        ]
        for r in records
    ]
    head = [
        "checkpoint",
        "split",
        "row",
        "MAP",
        "textbook A (before)",
        "reaching A (after)",
        "ΔNLL",
        "prior (geo. mean)",
    ]
    auroc = [
        f"{r['task']} s{r['seed']} step {r['step']} {r['row']}: "
        f"{r['auroc']['old']:.3f} → {r['auroc']['new']:.3f}"
        for r in records
        if "auroc" in r
    ]
    checks = {}
    for r in records:
        key = f"{r['task']} s{r['seed']} step {r['step']}"
        checks[key] = max(checks.get(key, 0.0), r["map_check"]["old"] or 0.0)
    check_text = ", ".join(f"{k}: {v:.1e}" for k, v in checks.items())
    return "\n".join(
        [
            f"# {NAME}: the default before and after KFAC's reaching-positions input factor",
            "",
            "Same cached checkpoints, splits and Monte Carlo draws; each side re-scored by "
            "`llm_rescore_default` with its own code. ACC / ECE / NLL / confidence (×100 "
            "except NLL).",
            "",
            C.md_table(head, rows),
            "",
            "Shift AUROC (entropy, in-domain test vs shifted): " + "; ".join(auroc),
            "",
            "Both sides score the same rebuilt model. Its MAP metrics differ from the "
            f"result file's by at most {check_text}: float noise where the file's cached "
            "checkpoint was used, more where the checkpoint was re-trained on this machine "
            "(fine-tuning is not bitwise reproducible across machines and thread counts).",
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pairs", nargs="+", help="OLD.json NEW.json [OLD.json NEW.json ...]")
    args = p.parse_args()
    if len(args.pairs) % 2:
        p.error("give result files in (old, new) pairs")
    records: list[dict[str, Any]] = []
    for old, new in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        records += compare(json.loads(Path(old).read_text()), json.loads(Path(new).read_text()))
    C.publish(NAME, args, records, {}, render(records))


if __name__ == "__main__":
    main()
