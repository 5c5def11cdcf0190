"""Dev check behind issue 13: the linearised evidence (``method="linearised"``) vs laplace-torch
marglik on one overfit SmolLM2 checkpoint (same arguments as ``prior_candidates.py``).
The linearised rule ends at the upper bound (1e8) for every tensor, i.e. the MAP.
"""

# ruff: noqa: E501  (a dev study: one printed line per rule)
import json
import sys
import time

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa
from benchmarks.finetune import FinetuneConfig, classification_metrics, load_run
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext import prior as P
from laplace_lora_ext.jacobian_cache import LogitJacobianCache
from laplace_lora_ext.links import apply_link

torch.set_num_threads(1)
task, steps, step, n_train, lr, seed = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    float(sys.argv[5]),
    int(sys.argv[6]),
)
structure = sys.argv[7] if len(sys.argv) > 7 else "kron"
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
va = make_loader(data.validation, collate, 16)
te = make_loader(data.test, collate, 16)


def blocks_of(la, loader):
    return list(LogitJacobianCache(la, loader))


def metrics(la, cached, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    probs, labels, mapp, pv = [], [], [], []
    for f_mu, blocks, y in cached:
        f_var = la._functional_variance_blocks(blocks)
        probs.append(apply_link("mc", f_mu, f_var, 1000, gen).float())
        mapp.append(f_mu.softmax(-1).float())
        labels.append(y)
        pv.append(f_var.diagonal(dim1=-2, dim2=-1).mean(-1))
    y = torch.cat(labels)
    return (
        classification_metrics(torch.cat(probs), y),
        classification_metrics(torch.cat(mapp), y),
        float(torch.cat(pv).mean()),
    )


t0 = time.time()
la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure=structure)
la.fit(tr)
print(f"fit {time.time() - t0:.0f}s loss {la.loss:.3f} N {la.n_data}", flush=True)
t0 = time.time()
cv = blocks_of(la, va)
ct = blocks_of(la, te)
print(f"blocks {time.time() - t0:.0f}s", flush=True)
spectra = P.curvature_spectra(la)
names = la.lora_param_names
res = {}


def report(name, deltas):
    la.prior_precision = deltas
    mv, mapv, pvv = metrics(la, cv)
    mt, mapt, pvt = metrics(la, ct)
    ev = float(P.linearised_log_evidence(spectra, la.prior_precision, la.loss))
    lml = float(la.log_marginal_likelihood())
    print(
        f"{name:28s} delta med {float(la.prior_precision.median()):9.3g} | val acc {mv['acc']:.3f} ece {mv['ece'] * 100:5.1f} nll {mv['nll']:.3f} conf {mv['conf']:.3f} var {pvv:.3g} | test acc {mt['acc']:.3f} ece {mt['ece'] * 100:5.1f} nll {mt['nll']:.3f} conf {mt['conf']:.3f} | linev {ev:.1f} lml {lml:.1f}",
        flush=True,
    )
    res[name] = dict(val=mv, test=mt, deltas=la.prior_precision.tolist(), linev=ev, lml=lml)
    return mapv, mapt


mapv, mapt = report("marglik_dummy_1", torch.tensor(1.0))
print(
    f"{'MAP':28s} | val acc {mapv['acc']:.3f} ece {mapv['ece'] * 100:5.1f} nll {mapv['nll']:.3f} conf {mapv['conf']:.3f} | test acc {mapt['acc']:.3f} ece {mapt['ece'] * 100:5.1f} nll {mapt['nll']:.3f} conf {mapt['conf']:.3f}"
)
la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=200, lr=0.1)
report("marglik_layerwise", la.prior_precision.clone())
la.optimize_prior_precision(method="marglik", prior_structure="scalar", n_steps=200, lr=0.1)
report("marglik_scalar", la.prior_precision.clone())
for ps in ("scalar", "layerwise"):
    fit = P.fit_prior_precision(spectra, ps)
    print(
        ps,
        "converged",
        fit.converged,
        fit.n_iter,
        "gamma",
        fit.effective_params,
        "deltas",
        fit.deltas[:6].tolist(),
    )
    report(f"lin_{ps}", fit.deltas)
    if ps == "scalar":
        d0 = fit.deltas
for mult in (0.01, 0.1, 10, 100):
    report(f"lin_scalar x{mult}", d0 * mult)
# per-tensor breakdown
fitl = P.fit_prior_precision(spectra, "layerwise")
for n, s, d in (
    list(zip(names, spectra, fitl.deltas, strict=False))[:6]
    + list(zip(names, spectra, fitl.deltas, strict=False))[-4:]
):
    print(
        n[-60:],
        "k",
        s.h.numel(),
        f"hmax {float(s.h.max()):.3g}",
        f"gamma {float(s.gamma(d)):.3g}",
        f"c {float(s.c.sum()):.3g}",
        f"delta {float(d):.3g}",
    )
print(json.dumps(res))
