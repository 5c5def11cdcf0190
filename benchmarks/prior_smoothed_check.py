"""Dev check (issue 13): refit the KFAC curvature with the GGN under the GLM predictive,
E_q[Lambda] (a Gaussian-smoothed curvature, the fixed point a Gaussian variational posterior
would use) instead of Lambda at the saturated MAP, then re-choose the prior; judged on the
VALIDATION split. Same arguments as ``prior_candidates.py``.
"""

# ruff: noqa: E501  (a dev study: one printed line per rule)
import sys
import time

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa
from benchmarks.finetune import FinetuneConfig, load_run
from benchmarks.prior_study import blocks_of, metrics
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.curvature import backend as backend_mod

torch.set_num_threads(1)
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


def show(name, la, cv, ct):
    mv = metrics(la, cv)
    mt = metrics(la, ct)
    pp = la.prior_precision
    isA = torch.tensor([".lora_A." in n for n in la.lora_param_names])
    print(
        f"{name:26s} dA {float(pp[isA].median()):9.3g} dB {float(pp[~isA].median()):9.3g} | VAL acc {mv['acc']:.3f} ece {100 * mv['ece']:5.1f} nll {mv['nll']:.3f} conf {mv['conf']:.3f} | test acc {mt['acc']:.3f} ece {100 * mt['ece']:5.1f} nll {mt['nll']:.3f} conf {mt['conf']:.3f}",
        flush=True,
    )


orig = backend_mod.grad_output_vectors
QUEUE = []


def smoothed(logits, y, fisher_type="exact", mc_samples=1, generator=None):
    cov = QUEUE.pop(0).to(logits.dtype)  # (B, C, C)
    mu = logits.detach()
    B, C = mu.shape
    L = torch.linalg.cholesky(cov + 1e-9 * torch.eye(C, dtype=mu.dtype))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, B, C, dtype=mu.dtype, generator=g)
    f = mu + torch.einsum("bij,sbj->sbi", L, z)
    p = f.softmax(-1)
    lam = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)).mean(0)  # (B, C, C)
    ev, U = torch.linalg.eigh(lam)
    V = U * ev.clamp_min(0).sqrt().unsqueeze(-2)  # (B, C, K): columns sqrt(l_k) u_k
    return V.permute(2, 0, 1).contiguous()


t0 = time.time()
la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
la.fit(tr)
la.optimize_prior_precision()
print(f"fit {time.time() - t0:.0f}s", flush=True)
cv = cache(la, data.validation)
ct = cache(la, data.test)
ctr = cache(la, data.train)
print(f"blocks {time.time() - t0:.0f}s", flush=True)
show("lora_marglik", la, cv, ct)
cur = la
for it in (1, 2):
    QUEUE[:] = [cur._functional_variance_blocks(b) for _, b, _ in ctr]
    backend_mod.grad_output_vectors = smoothed
    la2 = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la2.fit(tr)
    backend_mod.grad_output_vectors = orig
    assert not QUEUE
    la2.optimize_prior_precision()
    show(f"smoothed x{it} lora_marglik", la2, cv, ct)
    la2.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=200)
    show(f"smoothed x{it} marglik", la2, cv, ct)
    la2.optimize_prior_precision()
    print(f"iter {it} {time.time() - t0:.0f}s", flush=True)
    cur = la2
