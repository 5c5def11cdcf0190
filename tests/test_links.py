"""Link approximations against closed forms and the exact integral."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from laplace import KronLaplace

from laplace_lora_ext import links
from laplace_lora_ext.links import laplace_bridge, mc_indep, mc_joint, probit
from tests.cases import make_case
from tests.models import loader, lora_laplace


def random_gaussian(B=5, C=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f_mu = torch.randn(B, C, generator=gen)
    L = torch.randn(B, C, C, generator=gen) * 0.7
    return f_mu, L @ L.transpose(1, 2) + 0.1 * torch.eye(C)


def laplace_torch_link(link, f_mu, f_var):
    """laplace-torch's own implementation (via a tiny fitted KronLaplace)."""
    la = KronLaplace(torch.nn.Linear(2, f_mu.shape[1]), "classification")
    la._glm_predictive_distribution = lambda x, joint=False, diagonal_output=False: (
        f_mu.clone(),
        f_var.clone(),
    )
    return la._glm_forward_call(torch.zeros(1, 2), "classification", link_approx=link)


@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm"])
def test_closed_forms_match_laplace_torch(link):
    f_mu, f_var = random_gaussian()
    ours = {
        "probit": probit(f_mu, f_var),
        "bridge": laplace_bridge(f_mu, f_var),
        "bridge_norm": laplace_bridge(f_mu, f_var, normalize=True),
    }[link]
    assert torch.allclose(ours, laplace_torch_link(link, f_mu, f_var), atol=1e-12)


def test_probit_closed_form():
    f_mu, f_var = random_gaussian()
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(f_var, dim1=1, dim2=2))
    assert torch.allclose(probit(f_mu, f_var), torch.softmax(kappa * f_mu, -1))


def exact_two_class(mu: torch.Tensor, var: torch.Tensor) -> float:
    """E[softmax(f)_1] for f ~ N(mu, var), C = 2: a 1-D integral over d = f_1 - f_0."""
    m = float(mu[1] - mu[0])
    s2 = float(var[0, 0] + var[1, 1] - 2 * var[0, 1])
    x, w = np.polynomial.hermite_e.hermegauss(200)
    return float(np.sum(w / (1 + np.exp(-(m + math.sqrt(s2) * x)))) / math.sqrt(2 * math.pi))


def test_mc_joint_converges_to_exact_integral():
    mu = torch.tensor([[0.3, 1.1]])
    var = torch.tensor([[[1.5, 0.9], [0.9, 2.0]]])
    exact = exact_two_class(mu[0], var[0])
    n = 200_000
    p = mc_joint(mu, var, n_samples=n, generator=torch.Generator().manual_seed(0))
    assert abs(float(p[0, 1]) - exact) < 4 * 0.5 / math.sqrt(n)
    # MC indep ignores the correlation: it targets a different (wrong) integral
    indep = exact_two_class(mu[0], torch.diag(var[0].diagonal()))
    q = mc_indep(mu, var, n_samples=n, generator=torch.Generator().manual_seed(0))
    assert abs(float(q[0, 1]) - indep) < 4 * 0.5 / math.sqrt(n)
    assert abs(indep - exact) > 0.01


def test_mc_handles_singular_covariance():
    mu = torch.zeros(2, 3)
    var = torch.zeros(2, 3, 3)
    p = mc_joint(mu, var, n_samples=10)
    assert torch.allclose(p, torch.full((2, 3), 1 / 3))


def test_antithetic_normal_pairs_and_odd_count():
    from laplace_lora_ext.links import antithetic_normal

    z = antithetic_normal(
        (7, 3, 2), torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64
    )
    assert z.shape == (7, 3, 2)
    assert torch.equal(z[0::2][:3], -z[1::2])
    assert not torch.equal(z[6], -z[5])  # the odd last draw starts a new pair


@settings(max_examples=60, deadline=None)
@given(
    margin=st.floats(0.01, 5.0),
    sign=st.sampled_from([-1.0, 1.0]),
    scale=st.floats(0.1, 30.0),
    corr=st.floats(-0.95, 0.95),
    half=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_mc_keeps_the_map_argmax_of_two_classes(margin, sign, scale, corr, half, seed):
    """Antithetic pairs: with C = 2 and an even sample count MAP's class is never the less
    probable one, as for the exact integral, however large the variance (plain draws flip
    near-ties). Float64 can only tie them: when both draws of a pair saturate the softmax
    (e.g. |f_1 - f_0| > 37), the pair averages to exactly (0.5, 0.5)."""
    mu = torch.tensor([[0.0, sign * margin]], dtype=torch.float64)
    var = scale**2 * torch.tensor([[[1.0, corr], [corr, 1.0]]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    top, other = int(mu.argmax(-1)), int(mu.argmin(-1))
    for link in (mc_joint, mc_indep):
        p = link(mu, var, n_samples=2 * half, generator=gen)
        assert float(p[0, top] - p[0, other]) >= -1e-12
        if scale < 3:  # no saturation: a strict answer
            assert int(p.argmax(-1)) == top


# ------------------------------------------------------------- draws without n_samples
def test_default_draws_cap_the_work_per_input():
    """10,000 draws for few classes, ``2·10⁶ / C²`` beyond 14, never below 100."""
    assert [links.default_draws(C) for C in (2, 5, 14)] == [10_000] * 3
    assert links.default_draws(15) == 2_000_000 // 225
    assert links.default_draws(100) == 200
    assert links.default_draws(1000) == links.MIN_DEFAULT_DRAWS == 100


@pytest.mark.parametrize("link", [mc_joint, mc_indep])
def test_mc_in_chunks_averages_the_same_draws(monkeypatch, link):
    """With chunks of 4 draws, 10 draws are the mean over the chunks' draws (4, 4, 2), each
    chunk in antithetic pairs, from one generator in turn."""
    f_mu, f_var = random_gaussian(B=3, C=4)
    f_mu, f_var = f_mu.double(), f_var.double()
    monkeypatch.setattr(links, "CHUNK_DRAWS", 4)
    got = link(f_mu, f_var, n_samples=10, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    z = torch.cat([links.antithetic_normal((k, 3, 4), gen, f_mu.device, f_mu.dtype)
                   for k in (4, 4, 2)])  # fmt: skip
    if link is mc_joint:
        noise = torch.einsum("bij,sbj->sbi", torch.linalg.cholesky(f_var), z)
    else:
        noise = f_var.diagonal(dim1=-2, dim2=-1).sqrt() * z
    assert torch.allclose(got, torch.softmax(f_mu + noise, -1).mean(0), atol=1e-14)


def test_mc_without_n_samples_draws_the_default_number():
    f_mu, f_var = random_gaussian(B=2, C=5)
    got = links.apply_link("mc", f_mu, f_var, None, torch.Generator().manual_seed(2))
    want = mc_joint(f_mu, f_var, links.default_draws(5), torch.Generator().manual_seed(2))
    assert torch.equal(got, want)


def test_call_without_n_samples_uses_default_draws_and_100_network_samples(monkeypatch):
    """``la(x)`` without ``n_samples``: the GLM links get ``default_draws(C)``, the network
    sampler laplace-torch's 100 forward passes."""
    case = make_case("llama")
    la = lora_laplace(case.model, "kron", prior_precision=2.0)
    la.fit(loader(case.batch, 4))
    seen = {}
    monkeypatch.setattr(links, "mc_joint", lambda mu, var, n, gen: seen.setdefault("glm", n))
    monkeypatch.setattr(
        type(la), "_nn_predictive_classification", lambda self, x, n, gen: seen.setdefault("nn", n)
    )
    la(case.batch, link_approx="mc")
    la(case.batch, pred_type="nn", link_approx="mc")
    assert seen == {"glm": None, "nn": 100}
    assert links.default_draws(la.n_outputs) == 10_000


@settings(max_examples=60, deadline=None)
@given(
    C=st.integers(2, 5),
    rank=st.integers(0, 5),
    shift=st.sampled_from([0.0, 1e6]),
    log_scale=st.floats(-14, 3),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bridge_gives_distributions_on_singular_covariances(
    C, rank, shift, log_scale, normalize, seed
):
    """PSD covariances of any rank (0: a logit vector that does not depend on the adapters),
    a large common shift on top, and tiny or large scales: rows are probability vectors.
    Before, a zero projected variance gave NaN that was patched entry by entry (rows summing
    to 1/3, or uniform)."""
    gen = torch.Generator().manual_seed(seed)
    f_mu = 3 * torch.randn(2, C, generator=gen, dtype=torch.float64)
    L = torch.randn(2, C, min(rank, C), generator=gen, dtype=torch.float64)
    f_var = 10**log_scale * L @ L.transpose(1, 2) + shift * torch.ones(2, C, C, dtype=torch.float64)
    p = laplace_bridge(f_mu, f_var, normalize=normalize)
    assert torch.isfinite(p).all() and (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, dtype=torch.float64))


def test_bridge_at_zero_variance_is_its_limit():
    f_mu = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)[None]
    zero = torch.zeros_like(eye)
    # isotropic: the variance cancels, so 0 gives what ε I gives
    torch.testing.assert_close(laplace_bridge(f_mu, zero), laplace_bridge(f_mu, 1e-9 * eye))
    # one deterministic class among random ones: the limit puts the mass on it
    partial = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))[None]
    nearly = torch.diag(torch.tensor([1.0, 1.0, 1e-12], dtype=torch.float64))[None]
    torch.testing.assert_close(laplace_bridge(f_mu, partial), laplace_bridge(f_mu, nearly))
    # normalised, vanishing variance sharpens to the largest logit
    expected = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(laplace_bridge(f_mu, zero, normalize=True), expected)
    torch.testing.assert_close(laplace_bridge(f_mu, 1e-9 * eye, normalize=True), expected)
