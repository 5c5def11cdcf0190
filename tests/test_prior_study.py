"""The prior studies' cached scoring equals the posterior's own predictive variance."""

from __future__ import annotations

import torch

from benchmarks.prior_study import blocks_of, metrics
from tests.models import loader, lora_laplace, random_batch, tiny_llama


def test_cached_blocks_give_the_posteriors_covariance_and_metrics():
    batch = random_batch(n=6, n_classes=3)
    la = lora_laplace(tiny_llama())
    la.fit(loader(batch, 3))
    cache = blocks_of(la, loader(batch, 3))
    prior = torch.linspace(0.5, 2.0, len(la.params), dtype=la._dtype)
    la.prior_precision = prior
    for (f_mu, blocks, y), start in zip(cache, (0, 3), strict=True):
        x = {k: v[start : start + 3] for k, v in batch.items() if k != "labels"}
        mean, cov = la.predictive_moments(x)
        f_var = la._functional_variance_blocks([b.to(la._dtype) for b in blocks])
        torch.testing.assert_close(f_mu.to(mean.dtype), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f_var.to(cov.dtype), cov, rtol=1e-4, atol=1e-7)
        assert torch.equal(y, batch["labels"][start : start + 3])
    la.prior_precision = 1.0
    m = metrics(la, cache, prior)
    assert torch.equal(la.prior_precision, prior)  # the prior it scored is left set
    assert set(m) >= {"acc", "ece", "nll", "conf"} and 0 < m["nll"] < 10
    assert metrics(la, cache) == m  # same draws: the fixed seed makes it repeatable
