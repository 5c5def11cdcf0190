"""Dev study (issue 13): do the joint MC predictive's plain draws cost the default accuracy?

At a memorised adapter the default's logit variance is large, so many validation examples
sit near a tie and plain Monte Carlo draws flip some of them. This scores the default
(``optimize_prior_precision()``, which picks the function-space rule there) on the
VALIDATION split of a memorised run of ``prior_memorised_check`` (default: ``fine_foods_mc``,
2 classes), with plain and antithetic draws, for 100 and 1000 samples and 5 MC seeds each
(and 20,000 antithetic samples: what remains is the posterior average, not noise), and
counts the answers that differ from MAP's.

    python -m benchmarks.mc_antithetic_check [TASK STEP] > benchmarks/results/LOG
"""

import sys

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks.finetune import FinetuneConfig, load_run
from benchmarks.prior_study import blocks_of
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.links import mc_joint


def plain_mc(f_mu: torch.Tensor, f_var: torch.Tensor, n: int, gen: torch.Generator):
    """The joint MC link before antithetic draws (independent normal draws)."""
    L, _ = torch.linalg.cholesky_ex(f_var)
    z = torch.randn((n, *f_mu.shape), generator=gen, dtype=f_mu.dtype)
    return torch.softmax(f_mu + torch.einsum("bij,sbj->sbi", L, z), -1).mean(0)


def main(task: str = "fine_foods_mc", step: int = 320) -> None:
    torch.set_num_threads(1)
    cfg = FinetuneConfig(
        model="smollm2", task=task, seed=0, data_seed=0, n_train=128, n_test=200,
        steps=960, lr=1e-3, save_every=160, run_name=f"memo-{task}-seed0",
    )  # fmt: skip
    _, tok, wrapper, data = load_run(cfg, step)
    collate = make_collate(tok, data.kind, cfg.seq_len)
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(make_loader(data.train, collate, 8))
    la.optimize_prior_precision()
    val = blocks_of(la, make_loader(data.validation, collate, 8))
    f_mu = torch.cat([f for f, _, _ in val]).to(la._dtype)
    f_var = torch.cat(
        [la._functional_variance_blocks([b.to(la._dtype) for b in bl]) for _, bl, _ in val]
    )
    y = torch.cat([t for _, _, t in val])
    print(f"{task} step {step}: train NLL {la.loss / la.n_data:.5f}, {len(y)} validation examples")
    m = classification_metrics(f_mu.softmax(-1).float(), y)
    print(
        f"MAP                     acc {m['acc']:.3f} ece {100 * m['ece']:5.1f} nll {m['nll']:.3f}"
    )
    for n in (100, 1000):
        for name, link in (("plain", plain_mc), ("antithetic", mc_joint)):
            rows = []
            for seed in range(5):
                p = link(f_mu, f_var, n, torch.Generator().manual_seed(seed))
                m = classification_metrics(p.float(), y)
                flips = int((p.argmax(-1) != f_mu.argmax(-1)).sum())
                rows.append((m["acc"], 100 * m["ece"], m["nll"], flips))
            t = torch.tensor(rows)
            mean, sd = t.mean(0), t.std(0)
            print(
                f"{name:10s} n={n:4d} (5 seeds) acc {mean[0]:.3f}±{sd[0]:.3f} "
                f"ece {mean[1]:5.1f}±{sd[1]:.1f} nll {mean[2]:.3f}±{sd[2]:.3f} "
                f"flips vs MAP {mean[3]:.1f} (max {int(t[:, 3].max())})",
                flush=True,
            )
    p = mc_joint(f_mu, f_var, 20_000, torch.Generator().manual_seed(0))
    m = classification_metrics(p.float(), y)
    flips = int((p.argmax(-1) != f_mu.argmax(-1)).sum())
    print(f"antithetic n=20000 (1 seed) acc {m['acc']:.3f} nll {m['nll']:.3f} flips vs MAP {flips}")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["fine_foods_mc"]), *[int(a) for a in sys.argv[2:3]])
