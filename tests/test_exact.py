"""Curvature, marginal likelihood and GLM predictive against brute-force references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from laplace import Laplace

from laplace_lora_ext.testing import (
    exact_ggn,
    explicit_jacobians,
    kfac_reference,
    layer_io_jacobians,
    reaching_positions,
    rel,
)
from tests.cases import CASES, make_case
from tests.models import loader

TOL = 1e-8


def fit(case, structure, batch_size=3, **kw):
    la = Laplace(
        case.model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        include_extra_params=case.include_extra_params,
        **kw,
    )
    la.fit(loader(case.batch, batch_size))
    return la


@pytest.mark.parametrize("name", CASES)
def test_full_and_diag_equal_exact_ggn(name):
    case = make_case(name)
    full = fit(case, "full")
    ggn = exact_ggn(case.model, case.batch, full.params)
    assert rel(full.H, ggn) < TOL
    diag = fit(case, "diag")
    assert rel(diag.H, ggn.diagonal()) < TOL


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", CASES)
def test_kron_equals_reference_formulas(name, approx):
    case = make_case(name)
    la = fit(case, "kron", kfac_approx=approx)
    modules = [t.module for t in la.lora_targets]
    ref = kfac_reference(case.model, case.batch, modules, len(case.batch["labels"]), approx)
    kfacs = la.H_facs.kfacs
    i = 0
    for t, (G, A) in zip(la.lora_targets, ref, strict=True):
        assert rel(kfacs[i][0], G) < TOL, t.name
        assert rel(kfacs[i][1], A) < TOL, t.name
        i += 1
        if t.with_bias:
            # the bias block is the output factor (its input is the constant 1)
            assert rel(kfacs[i][0], G) < TOL, t.name
            i += 1
    assert i == len(kfacs) == len(la.params)


@pytest.mark.parametrize("name", CASES)
def test_kron_single_token_equals_exact_ggn_blocks(name):
    case = make_case(name, n=1, T=1)
    case.batch["attention_mask"][:] = 1
    la = fit(case, "kron")
    ggn = exact_ggn(case.model, case.batch, la.params)
    kron = la.H_facs.to_matrix()
    offset = 0
    for p in la.params:
        k = p.numel()
        block = ggn[offset : offset + k, offset : offset + k]
        # (blocks may be exactly zero: with one token, attention ignores the query)
        diff = kron[offset : offset + k, offset : offset + k] - block
        assert diff.norm() <= TOL * ggn.norm()
        offset += k


@pytest.mark.parametrize("name", CASES)
def test_kron_is_exact_on_blocks_read_at_one_position(name):
    """One sequence of several tokens: a layer whose output reaches the logits at one
    position only (the last block's query behind a last-token head, a head applied to every
    position before one is read) has a Kronecker GGN block, and KFAC must equal it. (When
    ``A`` averaged every token, these blocks were 0.4 to 2.5 off, relative Frobenius.)"""
    case = make_case(name, n=1, T=6)
    case.batch["attention_mask"][:] = 1
    la = fit(case, "kron")
    modules = [t.module for t in la.lora_targets]
    logits, _, jacs = layer_io_jacobians(case.model, case.batch, modules)
    ggn, kron = exact_ggn(case.model, case.batch, la.params), la.H_facs.to_matrix()
    checked, offset = [], 0
    for t, J in zip(la.lora_targets, jacs, strict=True):
        one = len(reaching_positions(list(range(J.shape[2])), J[0], logits[0])) == 1
        for p in t.params:  # weight, then bias: separate blocks
            block = slice(offset, offset + p.numel())
            if one:
                assert rel(kron[block, block], ggn[block, block]) < TOL, t.name
                checked.append(t.name)
            offset += p.numel()
    assert offset == len(ggn)
    expected = {"roberta": "query", "gpt2": "score"}.get(name, "layers.1.self_attn.q_proj")
    assert any(expected in n for n in checked), checked


def dense_precision(la, structure):
    P = la.posterior_precision
    if structure == "kron":
        return P.to_matrix()
    if structure == "diag":
        return torch.diag(P)
    return P


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("name", CASES)
def test_glm_predictive_and_marglik_equal_dense(name, structure):
    case = make_case(name)
    la = fit(case, structure, prior_precision=0.7)
    P = dense_precision(la, structure)
    Sigma = torch.linalg.inv(P)
    logits, J = explicit_jacobians(case.model, case.batch, la.params)
    f_mu, f_var = la._glm_predictive_distribution(case.batch)
    assert rel(f_mu, logits) < 1e-12
    assert rel(f_var, torch.einsum("ncp,pq,nkq->nck", J, Sigma, J)) < TOL

    loss = torch.nn.functional.cross_entropy(logits, case.batch["labels"], reduction="sum")
    theta = torch.nn.utils.parameters_to_vector(la.params).detach()
    P0 = 0.7 * torch.ones(len(theta))
    dense = -loss - 0.5 * (torch.logdet(P) - P0.log().sum() + (theta * P0 * theta).sum())
    assert abs(float(la.log_marginal_likelihood()) - float(dense)) < TOL * abs(float(dense))


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_nothing_depends_on_batch_size(structure):
    results = []
    for bs in (1, 3, 7):
        case = make_case("llama")
        la = fit(case, structure, batch_size=bs)
        f_mu, f_var = la._glm_predictive_distribution(case.batch)
        H = la.H_facs.to_matrix() if structure == "kron" else la.H
        results.append((H, la.log_marginal_likelihood(), f_var))
    for H, ml, fv in results[1:]:
        assert rel(H, results[0][0]) < TOL
        assert abs(float(ml - results[0][1])) < TOL * abs(float(results[0][1]))
        assert rel(fv, results[0][2]) < TOL


def test_empirical_fisher_equals_reference():
    case = make_case("llama")
    la = fit(case, "full", fisher_type="empirical")
    logits, J = explicit_jacobians(case.model, case.batch, la.params)
    r = torch.softmax(logits, -1) - torch.eye(3)[case.batch["labels"]]
    g = torch.einsum("nc,ncp->np", r, J)
    assert rel(la.H, g.T @ g) < TOL


def test_mc_fisher_equals_reference_with_the_same_labels():
    case = make_case("llama")
    S = 5
    la = fit(case, "full", fisher_type="mc", mc_samples=S, seed=1, batch_size=7)
    a = la.H.clone()
    b = fit(case, "full", fisher_type="mc", mc_samples=S, seed=1, batch_size=7).H
    assert torch.equal(a, b)
    la.fit(loader(case.batch, 7))  # a fresh fit of the same posterior starts from the seed
    assert torch.equal(la.H, a)
    logits, J = explicit_jacobians(case.model, case.batch, fit(case, "full").params)
    p = torch.softmax(logits, -1)
    draws = torch.multinomial(p, S, replacement=True, generator=torch.Generator().manual_seed(1))
    r = (p.unsqueeze(1) - torch.eye(3)[draws]) / S**0.5  # (N, S, C)
    g = torch.einsum("nsc,ncp->nsp", r, J).reshape(-1, J.shape[-1])
    assert rel(a, g.T @ g) < TOL


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_mc_fisher_added_data_continues_the_label_stream(monkeypatch, structure):
    from laplace_lora_ext.curvature.backend import LoraCurvature

    resets = []
    original = LoraCurvature.reset_generator
    monkeypatch.setattr(
        LoraCurvature, "reset_generator", lambda self: resets.append(1) or original(self)
    )
    case = make_case("llama")
    la = fit(case, structure, fisher_type="mc", mc_samples=2, seed=1)
    la.fit(loader(case.batch, 3), override=False)
    assert len(resets) == 1  # the fresh fit only


def test_mc_grad_output_vectors_are_unbiased():
    from laplace_lora_ext.curvature.fisher import grad_output_vectors

    f = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(f, -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    V = grad_output_vectors(f, None, "mc", 40_000, torch.Generator().manual_seed(0))
    assert (torch.einsum("sbc,sbd->bcd", V, V) - Lam).abs().max() < 0.01
    E = grad_output_vectors(f, None, "exact")
    assert torch.allclose(torch.einsum("kbc,kbd->bcd", E, E), Lam, atol=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    n_classes=st.integers(2, 12),
    scale=st.floats(0.0, 30.0),
    seed=st.integers(0, 2**16),
    saturate=st.booleans(),
)
def test_exact_fisher_factor_is_exact_with_one_vector_fewer(n_classes, scale, seed, saturate):
    """Σ_k V_k V_kᵀ = diag(p) - p pᵀ with K = C - 1 vectors, also at saturated or uniform p."""
    from laplace_lora_ext.curvature.fisher import exact_fisher_factor

    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(5, n_classes, generator=gen, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    if saturate:
        p[0] = torch.nn.functional.one_hot(torch.tensor(n_classes - 1), n_classes)
    V = exact_fisher_factor(p)
    assert V.shape == (n_classes - 1, 5, n_classes)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert (torch.einsum("kbc,kbd->bcd", V, V) - lam).abs().max() < 1e-14
