"""BLoB baseline (benchmarks/baselines/blob.py) against brute-force references:
the closed-form KL vs dense Gaussians over vec(ΔW), Flipout vs plain reparameterisation
(exact per-example weights and Monte Carlo moments), the KL weighting schedule, a training
run that lowers the ELBO, and peft save/load of the variational parameters."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from benchmarks.baselines import blob
from benchmarks.baselines.common import seeded
from tests.models import loader, random_batch, tiny_llama


# ----------------------------------------------------------------------- dense references
def dense_kl(mu_q, cov_q, mu_p, cov_p) -> torch.Tensor:
    """KL(N(mu_q, cov_q) || N(mu_p, cov_p)) for dense full-rank covariances."""
    d = mu_q - mu_p
    k = mu_q.numel()
    tr = torch.linalg.solve(cov_p, cov_q).diagonal().sum()
    maha = d @ torch.linalg.solve(cov_p, d)
    return 0.5 * (tr + maha - k + torch.logdet(cov_p) - torch.logdet(cov_q))


def full_weight_gaussians(M, sigma, B, prior_std):
    """Means and covariances over vec(ΔW) (column-major) of q and of the low-rank prior."""
    d_in = M.shape[1]
    J = torch.kron(torch.eye(d_in), B)  # vec(B A) = (I ⊗ B) vec(A)
    vec = lambda X: X.T.reshape(-1)  # noqa: E731  (column-major vec)
    torch.testing.assert_close(J @ vec(M), vec(B @ M))
    cov_q = J @ torch.diag(vec(sigma) ** 2) @ J.T
    cov_p = prior_std**2 * J @ J.T
    return J @ vec(M), cov_q, torch.zeros(J.shape[0]), cov_p


def support_kl(mu_q, cov_q, mu_p, cov_p) -> torch.Tensor:
    """KL between two degenerate Gaussians on the prior's support (its range)."""
    evals, evecs = torch.linalg.eigh(cov_p)
    U = evecs[:, evals > 1e-10 * evals.max()]
    residual = cov_q - U @ (U.T @ cov_q @ U) @ U.T
    assert residual.abs().max() < 1e-10, "q must live on the prior's support"
    return dense_kl(U.T @ mu_q, U.T @ cov_q @ U, U.T @ mu_p, U.T @ cov_p @ U)


def lora_factors(d_out=5, d_in=4, r=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(r, d_in, generator=gen)
    sigma = 0.1 + 0.4 * torch.rand(r, d_in, generator=gen)
    B = torch.randn(d_out, r, generator=gen)
    return M, sigma, B


# ------------------------------------------------------------------------------- the KL
@pytest.mark.parametrize("prior_std", [0.2, 1.3])
def test_closed_form_kl_equals_full_weight_kl(prior_std):
    M, sigma, B = lora_factors()
    closed = blob.gaussian_kl(M, sigma, prior_std)
    gaussians = full_weight_gaussians(M, sigma, B, prior_std)
    torch.testing.assert_close(closed, support_kl(*gaussians))
    # the same through full-rank dense Gaussians over vec(ΔW): equal jitter on both
    mu_q, cov_q, mu_p, cov_p = gaussians
    jitter = 1e-9 * torch.eye(len(mu_q))
    jittered = dense_kl(mu_q, cov_q + jitter, mu_p, cov_p + jitter)
    torch.testing.assert_close(closed, jittered, rtol=1e-5, atol=1e-6)


def test_closed_form_kl_bounds_the_full_weight_kl_for_rank_deficient_B():
    M, sigma, B = lora_factors()
    B[:, 1] = 2.0 * B[:, 0]  # rank 1: ΔW loses information about A
    closed = blob.gaussian_kl(M, sigma, 0.5)
    assert support_kl(*full_weight_gaussians(M, sigma, B, 0.5)) < closed - 1e-3


def test_blob_kl_sums_the_closed_form_over_all_lora_A():
    model = tiny_llama()
    mods = blob.apply_blob(model, seed=0)
    assert len(mods) == 4  # q and v of 2 layers
    expected = sum(blob.gaussian_kl(m.weight, m.blob_g**2, 0.3) for m in mods)
    torch.testing.assert_close(blob.blob_kl(model, prior_std=0.3), expected)
    M, sigma = mods[0].weight.detach(), mods[0].sigma.detach()
    by_hand = sum(
        math.log(0.3 / s) + (s**2 + m**2) / (2 * 0.3**2) - 0.5
        for m, s in zip(M.flatten().tolist(), sigma.flatten().tolist(), strict=True)
    )
    assert float(blob.gaussian_kl(M, sigma, 0.3)) == pytest.approx(by_hand, rel=1e-12)


def test_sigma_is_g_squared_with_the_papers_init():
    mods = blob.apply_blob(tiny_llama(), eps=0.05, seed=0)
    g = torch.cat([m.blob_g.flatten() for m in mods])
    assert g.min() >= 0.05 / math.sqrt(2) and g.max() <= 0.05
    torch.testing.assert_close(mods[0].sigma, mods[0].blob_g ** 2)


# ---------------------------------------------------------------------------- Flipout
def peft_linear(d_in=4, d_out=3, r=2, seed=0) -> nn.Module:
    """A peft LoRA layer around one nn.Linear with a nonzero B, BLoB applied."""
    torch.manual_seed(seed)
    net = get_peft_model(
        nn.Sequential(nn.Linear(d_in, d_out)), LoraConfig(r=r, lora_alpha=3, target_modules=["0"])
    )
    layer = net.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    blob.apply_blob(net, eps=0.6, seed=seed)
    return net.eval()


def test_flipout_equals_per_example_weights_with_flipped_noise():
    mod = peft_linear().base_model.model[0].lora_A["default"]
    x = torch.randn(5, 4)
    noise, r, s = mod.draw(x)
    out = torch.nn.functional.linear(x, mod.weight) + mod.flipout(x, noise, r, s)
    for b in range(5):
        A_b = mod.weight + noise * torch.outer(s[b], r[b])  # E ⊙ (s_b r_bᵀ)
        torch.testing.assert_close(out[b], A_b @ x[b])


def test_flipout_signs_are_per_example_over_a_sequence():
    mod = peft_linear().base_model.model[0].lora_A["default"]
    x = torch.randn(3, 1, 4).expand(3, 6, 4)  # each example: one token repeated 6 times
    out = mod(x)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))  # one weight sample per example
    assert not torch.allclose(out[0, 0], out[1, 0]) or not torch.allclose(x[0], x[1])


def test_flipout_moments_match_reparameterisation():
    net = peft_linear()
    layer = net.base_model.model[0]
    A = layer.lora_A["default"]
    W0, b0 = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    B, scale = layer.lora_B["default"].weight.detach(), layer.scaling["default"]
    M, sigma = A.weight.detach(), A.sigma.detach()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    # exact moments of y = W0 x + b + s·B (M + E) x, E_ij ~ N(0, sigma_ij²)
    mean = x @ W0.T + b0 + scale * x @ M.T @ B.T
    cov = [scale**2 * B @ torch.diag((sigma**2 * xb**2).sum(1)) @ B.T for xb in x]
    n = 4000
    torch.manual_seed(0)
    with torch.no_grad():
        flip = torch.stack([net(x) for _ in range(n)])  # (n, 3, d_out)
        eps = torch.randn(n, 3, *M.shape)  # plain reparameterisation: own A per example
        reparam = (
            mean
            - scale * x @ M.T @ B.T
            + scale * torch.einsum("or,nbri,bi->nbo", B, M + sigma * eps, x)
        )
    for samples in (flip, reparam):
        se = (torch.stack([c.diagonal() for c in cov]) / n).sqrt()
        assert ((samples.mean(0) - mean).abs() < 5 * se).all()
        for b in range(3):
            emp = torch.cov(samples[:, b].T)
            torch.testing.assert_close(emp, cov[b], rtol=0.1, atol=0.1 * cov[b].diagonal().max())


def test_sampling_off_is_the_mean_adapter():
    model = tiny_llama()
    batch = random_batch(n=4)
    ref = model(batch)
    blob.apply_blob(model, seed=0)
    with blob.blob_sampling(model, False):
        torch.testing.assert_close(model(batch), ref)
    assert not torch.allclose(model(batch), ref)  # sampling is on by default


# ------------------------------------------------------------------------ KL schedule
def test_kl_weight_schedule_is_geometric_within_cycles():
    M = 5
    w = [blob.kl_weight(s, M) for s in range(2 * M)]
    expected = [2**i / (2 ** (M + 1) - 1) for i in range(1, M + 1)]
    assert w[:M] == pytest.approx(expected, rel=1e-14) and w[M:] == pytest.approx(expected)
    assert sum(w[:M]) == pytest.approx(1 - 1 / (2 ** (M + 1) - 1))
    big = [blob.kl_weight(s, 400) for s in range(400)]  # no overflow for long cycles
    assert big[-1] == pytest.approx(0.5) and 0 < big[0] < 1e-100 and sum(big) == pytest.approx(1.0)
    assert blob.kl_weight(3, 7, reweight=False) == pytest.approx(1 / 7)


def test_default_kl_cycle_and_bad_arguments():
    assert blob.default_kl_cycle(640, 4) == int(100 * 640 ** (math.pi / 8) / 4)
    assert blob.default_kl_cycle(1, 10_000) == 1
    assert blob.default_kl_cycle(640, 4) == 316  # the paper's WG-S setting: 16 cycles in 5000
    assert blob.scaled_kl_cycle(640, 4, 5000) == 312 and blob.scaled_kl_cycle(300, 8, 200) == 12
    assert blob.scaled_kl_cycle(300, 8, 10) == 1 and blob.scaled_kl_cycle(8, 4, 10_000) == 56
    with pytest.raises(ValueError, match="cycle"):
        blob.kl_weight(0, 0)
    with pytest.raises(ValueError, match="positive"):
        blob.default_kl_cycle(0, 8)


# --------------------------------------------------------------------------- training
def neg_elbo(model, batch, n_samples=16, prior_std=0.2) -> float:
    """Monte Carlo -ELBO per example: E_q[Σ_n NLL_n] / N + KL / N (fixed noise seed)."""
    n = len(batch["labels"])
    with torch.no_grad(), seeded(123):
        nll = sum(
            torch.nn.functional.cross_entropy(model(batch), batch["labels"], reduction="sum")
            for _ in range(n_samples)
        )
        return float(nll / n_samples / n + blob.blob_kl(model, prior_std) / n)


def test_training_lowers_the_elbo_and_moves_mean_and_sigma():
    model = tiny_llama()
    blob.apply_blob(model, seed=0)
    batch = random_batch(n=8, seed=4)
    before = neg_elbo(model, batch)
    mod = blob.blob_modules(model)[0]
    g0, m0 = mod.blob_g.detach().clone(), mod.weight.detach().clone()
    # a short KL cycle, so that 24 steps reach the heavily weighted end of each cycle
    res = blob.train_blob(model, loader(batch, 4), steps=24, lr=5e-3, seed=0, kl_cycle=4)
    assert len(res.nll) == 24 and all(math.isfinite(v) for v in res.kl.values())
    assert neg_elbo(model, batch) < 0.5 * before  # measured: 39.3 -> 4.2
    assert not torch.equal(mod.blob_g, g0) and not torch.equal(mod.weight, m0)
    assert not model.training


def test_train_blob_needs_blob_layers_and_a_kl_cycle():
    model = tiny_llama()
    batches = [random_batch(n=4)]
    with pytest.raises(ValueError, match="apply_blob"):
        blob.train_blob(model, batches, steps=1)
    blob.apply_blob(model)
    with pytest.raises(ValueError, match="kl_cycle"):
        blob.train_blob(model, batches, steps=1)
    res = blob.train_blob(model, batches, steps=2, kl_cycle=2)
    assert blob._kl_cycle(loader(random_batch(n=8), 4), None, 8.0) == blob.default_kl_cycle(8, 4)
    assert list(res.kl_weight.values()) == pytest.approx([2 / 7, 4 / 7])


# -------------------------------------------------------------------------- prediction
def test_predict_probs_averages_sampled_softmax():
    model = tiny_llama()
    blob.apply_blob(model, eps=0.5, seed=0)
    batch = random_batch(n=6)
    probs = blob.predict_probs(model, loader(batch, 4), n_samples=5, seed=7)
    assert probs.shape == (6, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, dtype=probs.dtype))
    with seeded(7):  # the same draws, by hand, batch by batch
        manual = torch.cat(
            [
                torch.stack([model(b).softmax(-1) for _ in range(5)]).mean(0)
                for b in loader(batch, 4)
            ]
        )
    torch.testing.assert_close(probs, manual.float())
    torch.testing.assert_close(blob.predict_probs(model, loader(batch, 4), 5, seed=7), probs)
    with blob.blob_sampling(model, False):
        mean_probs = model(batch).softmax(-1).float()
    assert not torch.allclose(probs, mean_probs)


def test_apply_blob_rejects_models_without_lora():
    with pytest.raises(ValueError, match="get_peft_model"):
        blob.apply_blob(nn.Linear(3, 2))


# ------------------------------------------------------------------------------ peft I/O
def test_peft_saves_the_mean_and_sigma(tmp_path):
    model = tiny_llama()
    blob.apply_blob(model, seed=0)
    batch = random_batch(n=4)
    with blob.blob_sampling(model, False):
        mean_logits = model(batch)
    model.model.save_pretrained(tmp_path)
    plain = tiny_llama(seed=0)  # same base weights, another adapter slot
    plain.model.load_adapter(tmp_path, adapter_name="blob_mean")
    plain.model.set_adapter("blob_mean")
    torch.testing.assert_close(plain.eval()(batch), mean_logits)
    other = tiny_llama(seed=0)
    blob.apply_blob(other, seed=9)  # fresh G, then peft's own state-dict loader
    set_peft_model_state_dict(other.model, get_peft_model_state_dict(model.model))
    for a, b in zip(blob.blob_modules(model), blob.blob_modules(other), strict=True):
        torch.testing.assert_close(a.blob_g, b.blob_g)
    blob.remove_blob(model)
    assert not blob.blob_modules(model)
    torch.testing.assert_close(model(batch), mean_logits)
