"""Dev study behind the default prior (issue 13): candidate prior rules on one overfit SmolLM2
checkpoint, judged on the VALIDATION split (test printed for the record only).

Usage (a checkpoint cached by ``python -m benchmarks.finetune --model smollm2 --task TASK
--n-train 128 --n-test 200 --steps 160 --lr 1e-3 --save-every 32 --seed 0 --data-seed 0``)::

    python benchmarks/prior_candidates.py TASK 160 160 128 1e-3 0 > results/prior_candidates_TASK.log

Rules: laplace-torch marglik (layerwise); lora_A prior = PEFT init variance 1/(3 d_in) with
lora_B by marglik (layerwise or scalar), which became ``method="lora_marglik"`` (there
lora_A uses its own spread n/||A||^2, within ~10% of 3 d_in); fixed scalar grids.
Output: one line per rule (see results/prior_candidates.md for the table).
"""

# ruff: noqa: E501  (a dev study: one printed line per rule)

import sys
import time

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa
from benchmarks.calibration import temperature
from benchmarks.finetune import FinetuneConfig, load_run
from benchmarks.prior_study import blocks_of, metrics
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.evaluation import classification_metrics

torch.set_num_threads(2)
task, steps, step, n_train, lr, seed = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    float(sys.argv[5]),
    int(sys.argv[6]),
)
cfg = FinetuneConfig(
    model="smollm2",
    task=task,
    seed=seed,
    data_seed=seed,
    n_train=n_train,
    n_test=200,
    steps=steps,
    lr=lr,
    save_every=32,
)
peft_model, tok, wrapper, data = load_run(cfg, step)
collate = make_collate(tok, data.kind, cfg.seq_len)
tr = make_loader(data.train, collate, 8)


def cache(la, ex):
    return blocks_of(la, make_loader(ex, collate, 8))


t0 = time.time()
la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
la.fit(tr)
print(f"fit {time.time() - t0:.0f}s train nll {la.loss / la.n_data:.4f}", flush=True)
cv = cache(la, data.validation)
ct = cache(la, data.test)
print(f"blocks {time.time() - t0:.0f}s", flush=True)
names = la.lora_param_names
isA = torch.tensor(["lora_A" in n for n in names])
d_in = torch.tensor([float(p.shape[1]) for p in la.params], dtype=la._dtype)
vl = torch.cat([f for f, _, _ in cv])
vy = torch.cat([y for _, _, y in cv])
tl = torch.cat([f for f, _, _ in ct])
ty = torch.cat([y for _, _, y in ct])
T = temperature(vl.float(), vy)


def show(name, prior):
    mv = metrics(la, cv, prior)
    mt = metrics(la, ct, prior)
    print(
        f"{name:26s} dA {float(prior[isA].median()) if prior.numel() > 1 else float(prior):9.3g} dB {float(prior[~isA].median()) if prior.numel() > 1 else float(prior):9.3g} | VAL acc {mv['acc']:.3f} ece {100 * mv['ece']:5.1f} nll {mv['nll']:.3f} conf {mv['conf']:.3f} | test acc {mt['acc']:.3f} ece {100 * mt['ece']:5.1f} nll {mt['nll']:.3f} conf {mt['conf']:.3f}",
        flush=True,
    )


for nm, lg in (("MAP", 1.0), ("temp", T)):
    mv = classification_metrics((vl / lg).softmax(-1).float(), vy)
    mt = classification_metrics((tl / lg).softmax(-1).float(), ty)
    print(
        f"{nm:26s} T {lg:.3f} | VAL acc {mv['acc']:.3f} ece {100 * mv['ece']:5.1f} nll {mv['nll']:.3f} conf {mv['conf']:.3f} | test acc {mt['acc']:.3f} ece {100 * mt['ece']:5.1f} nll {mt['nll']:.3f} conf {mt['conf']:.3f}",
        flush=True,
    )
la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=200)
show("marglik_layerwise", la.prior_precision.clone())
# A prior = PEFT's kaiming-uniform init distribution: var 1/(3 d_in); B by marglik
dA = 3.0 * d_in
logB = torch.zeros(int((~isA).sum()), dtype=la._dtype, requires_grad=True)
opt = torch.optim.Adam([logB], lr=0.1)
for _ in range(300):
    opt.zero_grad()
    prior = torch.where(isA, dA, torch.zeros_like(dA)).clone()
    prior[~isA] = logB.exp()
    (-la.log_marginal_likelihood(prior_precision=prior)).backward()
    opt.step()
prior = dA.clone()
prior[~isA] = logB.detach().exp()
show("Ainit+marglikB_layerwise", prior)
# same, scalar over B
logb = torch.zeros(1, dtype=la._dtype, requires_grad=True)
opt = torch.optim.Adam([logb], lr=0.1)
for _ in range(300):
    opt.zero_grad()
    prior = torch.where(isA, dA, logb.exp().expand_as(dA))
    (-la.log_marginal_likelihood(prior_precision=prior)).backward()
    opt.step()
prior = torch.where(isA, dA, logb.detach().exp().expand_as(dA))
show("Ainit+marglikB_scalar", prior)
for d in (1, 10, 100, 1e3, 1e4, 1e5):
    show(f"scalar {d:g}", torch.tensor([float(d)], dtype=la._dtype))
    show(f"Ainit + B {d:g}", torch.where(isA, dA, torch.full_like(dA, d)))
