"""The linearised-evidence prior (laplace_lora_ext.prior) against dense brute force."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laplace_lora_ext import prior as P
from tests.models import loader, lora_laplace, random_batch, tiny_llama


def dense_linear_evidence(
    H: torch.Tensor, delta_theta: torch.Tensor, deltas: torch.Tensor, loss: float
) -> torch.Tensor:
    """``log ∫ exp(-L(θ)) N(θ; θ₀, diag(1/δ)) dθ`` for ``L = L* + ½ (θ-θ*)ᵀ H (θ-θ*)``.

    Dense: ``-L* - ½ Δᵀ (H⁻¹ + D⁻¹)⁻¹ Δ - ½ log det(I + D^{-1/2} H D^{-1/2})`` with
    ``(H⁻¹ + D⁻¹)⁻¹ = D (H + D)⁻¹ H`` (valid for singular ``H``).
    """
    D = torch.diag(deltas)
    M = D @ torch.linalg.solve(H + D, H)
    Dm = torch.diag(deltas.rsqrt())
    logdet = torch.linalg.slogdet(torch.eye(len(H), dtype=H.dtype) + Dm @ H @ Dm)[1]
    return -loss - 0.5 * delta_theta @ M @ delta_theta - 0.5 * logdet


def fitted(structure: str, **kw):
    model = tiny_llama()
    batch = random_batch(n=6, T=5)
    la = lora_laplace(model, structure, **kw)
    la.fit(loader(batch, 3))
    return la


def dense_H(la) -> torch.Tensor:
    if la._structure == "diag":
        return torch.diag(la.H)
    if la._structure == "full":
        return la.H
    return la.H.to_matrix()


def per_tensor_deltas(la, deltas: torch.Tensor) -> torch.Tensor:
    return torch.cat([d.expand(p.numel()) for d, p in zip(deltas, la.params, strict=True)])


@pytest.mark.parametrize(
    "structure,kw",
    [("kron", {}), ("diag", {}), ("kron", {"factor_rank": 3, "rank_threshold": 4})],
)
def test_linearised_evidence_matches_dense(structure, kw):
    la = fitted(structure, **kw)
    spectra = P.curvature_spectra(la)
    H = dense_H(la)
    # block-diagonal over parameter tensors (kron and diag are block-diagonal anyway)
    gen = torch.Generator().manual_seed(0)
    deltas = torch.rand(len(la.params), generator=gen, dtype=torch.float64) * 3 + 0.1
    want = dense_linear_evidence(H, la.mean - la.prior_mean, per_tensor_deltas(la, deltas), la.loss)
    got = P.linearised_log_evidence(spectra, deltas, la.loss)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-8)


def test_full_structure_uses_block_diagonal_of_dense_curvature():
    la = fitted("full")
    spectra = P.curvature_spectra(la)
    H = la.H.clone()
    offset, mask = 0, torch.zeros_like(H, dtype=torch.bool)
    for p in la.params:
        mask[offset : offset + p.numel(), offset : offset + p.numel()] = True
        offset += p.numel()
    H_block = torch.where(mask, H, torch.zeros_like(H))
    deltas = torch.linspace(0.5, 2.0, len(la.params), dtype=torch.float64)
    want = dense_linear_evidence(H_block, la.mean, per_tensor_deltas(la, deltas), la.loss)
    torch.testing.assert_close(P.linearised_log_evidence(spectra, deltas, la.loss), want)


def test_spectra_follow_prior_mean_and_temperature():
    la = fitted("kron", temperature=2.0)
    la.prior_mean = 0.1
    spectra = P.curvature_spectra(la)
    H = la.H.to_matrix() / 2.0
    want = dense_linear_evidence(
        H, la.mean - 0.1, torch.full((la.n_params,), 0.7, dtype=torch.float64), 0.0
    )
    torch.testing.assert_close(
        P.linearised_log_evidence(spectra, torch.tensor([0.7], dtype=torch.float64)), want
    )


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise"])
def test_fixed_point_maximises_the_evidence(prior_structure):
    la = fitted("kron")
    spectra = P.curvature_spectra(la)
    fit = P.fit_prior_precision(spectra, prior_structure)
    assert fit.converged
    log_d = fit.deltas.log().clone().requires_grad_(True)
    ev = P.linearised_log_evidence(spectra, log_d.exp())
    (grad,) = torch.autograd.grad(ev, log_d)
    interior = fit.deltas < 1e8
    assert torch.all(grad[interior].abs() < 1e-5)
    for scale in (0.5, 2.0):  # and it is a maximum, not a minimum
        assert P.linearised_log_evidence(spectra, fit.deltas * scale) < ev


def test_uninformed_directions_do_not_move_the_prior():
    """Directions with zero curvature leave the evidence and the fitted δ unchanged."""
    h = torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64)
    c = torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)
    base = P.fit_prior_precision([P.Spectrum(h, c)], "scalar").deltas
    padded = P.Spectrum(
        torch.cat([h, torch.zeros(1000, dtype=h.dtype)]),
        torch.cat([c, torch.full((1000,), 50.0, dtype=h.dtype)]),
    )
    torch.testing.assert_close(P.fit_prior_precision([padded], "scalar").deltas, base)


@settings(max_examples=40, deadline=None)
@given(h=st.floats(1e-3, 1e3), c=st.floats(1e-4, 1e3))
def test_single_direction_closed_form(h, c):
    """One direction: ``1/δ = c - 1/h`` if positive, else δ at its upper bound."""
    s = P.Spectrum(torch.tensor([h], dtype=torch.float64), torch.tensor([c], dtype=torch.float64))
    fit = P.fit_prior_precision([s], "scalar", max_delta=1e8, n_steps=5000, rtol=1e-10)
    if c * h > 1.01:
        assert math.isclose(float(fit.deltas), 1.0 / (c - 1.0 / h), rel_tol=1e-4)
    elif c * h < 0.99:
        assert float(fit.deltas) == pytest.approx(1e8)


def test_rejects_unknown_structure_and_damping():
    la = fitted("kron")
    with pytest.raises(ValueError, match="prior_structure"):
        P.fit_prior_precision(P.curvature_spectra(la), "diag")
    la_d = fitted("kron", damping=True)
    with pytest.raises(ValueError, match="damping"):
        P.curvature_spectra(la_d)


# ------------------------------------------------------------------ optimize_prior_precision
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_linearised_method_is_the_linearised_evidence(structure):
    la = fitted(structure)
    la.optimize_prior_precision(method="linearised")
    want = P.fit_prior_precision(P.curvature_spectra(la), "layerwise").deltas
    assert la.prior_precision.shape == (len(la.params),)
    torch.testing.assert_close(la.prior_precision, want)
    assert la.prior_fit.converged


def test_marglik_warns_when_not_converged():
    la = fitted("kron")
    with pytest.warns(RuntimeWarning, match="did not converge"):
        la.optimize_prior_precision(method="marglik", n_steps=1, init_prior_prec=1e-3)


def test_non_convergence_warning_names_the_method_and_the_callers_line():
    """The default (``"auto"``, here ``lora_marglik``) says it was the default and does not
    advise itself; an explicit method is named; both point at the caller's line."""
    la = fitted("kron")
    assert la._default_method() == "lora_marglik"  # random labels: nothing memorised
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        la.optimize_prior_precision(lr=1e-6, init_prior_prec=1e-3)
    (w,) = [w for w in caught if "did not converge" in str(w.message)]
    assert "the default, here method='lora_marglik'" in str(w.message)
    assert "method='auto'" not in str(w.message)
    assert w.filename == __file__
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        la.optimize_prior_precision(method="lora_marglik", lr=1e-6, init_prior_prec=1e-3)
    (w,) = [w for w in caught if "did not converge" in str(w.message)]
    assert "optimize_prior_precision(method='lora_marglik')" in str(w.message)
    assert "method='auto'" in str(w.message) and w.filename == __file__
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        la.optimize_prior_precision(method="marglik", n_steps=1, init_prior_prec=1e-3)
    (w,) = [w for w in caught if "did not converge" in str(w.message)]
    assert "method='marglik'" in str(w.message) and w.filename == __file__


def test_lora_marglik_runs_rounds_until_converged(monkeypatch):
    """One round when it converges; otherwise rounds up to LORA_MARGLIK_ROUNDS, and the
    warning counts every step taken."""
    from laplace_lora_ext.posterior import evidence_search

    la = fitted("kron")
    calls = []
    original = type(la).log_marginal_likelihood

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(la), "log_marginal_likelihood", counted)
    la.optimize_prior_precision(method="lora_marglik", n_steps=200)
    assert 200 < len(calls) <= 203  # one round, its convergence check (and none after)
    free = ~P.lora_a_mask(la.lora_param_names)
    assert la._marglik_gradient(free)[1] <= evidence_search.MARGLIK_GRAD_TOL
    monkeypatch.setattr(evidence_search, "LORA_MARGLIK_ROUNDS", 3)
    calls.clear()
    with pytest.warns(RuntimeWarning, match="did not converge in 600 steps"):
        la.optimize_prior_precision(method="lora_marglik", lr=1e-6, init_prior_prec=1e-3)
    assert 600 + 3 <= len(calls) <= 600 + 5  # three rounds, a check after each, the warning


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("method", ["auto", "lora_marglik", "marglik"])
def test_chosen_prior_is_a_plain_tensor(structure, method, monkeypatch):
    """As in laplace-torch, the chosen prior carries no autograd graph (``.numpy()`` and
    ``float()`` work), and the convergence check after the search leaves its value alone."""
    la = fitted(structure)
    seen = []
    original = type(la)._marglik_gradient

    def recorded(self, *args, **kwargs):
        seen.append(self.prior_precision.detach().clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(la), "_marglik_gradient", recorded)
    la.optimize_prior_precision(method=method)
    assert not la.prior_precision.requires_grad and la.prior_precision.grad_fn is None
    la.prior_precision.numpy()
    assert seen and torch.equal(la.prior_precision, seen[-1])


@pytest.mark.parametrize("method", ["linearised", "function_space", "leave_one_out"])
def test_other_methods_choose_a_plain_tensor(method):
    la = fitted("kron")
    la.optimize_prior_precision(method=method)
    assert not la.prior_precision.requires_grad and la.prior_precision.grad_fn is None


def test_marglik_converged_is_silent():
    """No non-convergence warning, and not laplace-torch's "By default `link_approx` is
    `probit`" either: the evidence uses no link, and this package's searches use "mc"."""
    import warnings

    la = fitted("kron")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        la.optimize_prior_precision(method="marglik", n_steps=1000, lr=0.1)
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)]
    assert not [w for w in seen if "link_approx" in str(w.message)]


def test_gridsearch_picks_the_brute_force_minimiser():
    """Cached Jacobian blocks give the same choice as calling ``la(x)`` per grid value."""
    la = fitted("kron")
    val = random_batch(n=5, T=5, seed=7)
    grid = torch.logspace(-2, 2, 9)
    nll = []
    for delta in grid.tolist():
        la.prior_precision = delta
        probs = la(val, link_approx="probit")
        nll.append(float(-probs.gather(1, val["labels"][:, None]).log().mean()))
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=loader(val, 2),
        link_approx="probit",
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
        grid_size=9,
    )
    assert float(la.prior_precision) == pytest.approx(float(grid[int(torch.tensor(nll).argmin())]))


def test_gridsearch_needs_validation_data_and_methods_are_checked():
    la = fitted("kron")
    with pytest.raises(ValueError, match="val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="method must be one of"):
        la.optimize_prior_precision(method="cv")


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_lora_marglik_fixes_lora_a_and_maximises_the_evidence_over_the_rest(structure):
    la = fitted(structure)
    la.optimize_prior_precision(method="lora_marglik", n_steps=400)
    is_a = P.lora_a_mask(la.lora_param_names)
    assert is_a.any() and not is_a.all()
    offset, want = 0, []
    for p in la.params:
        w = la.mean[offset : offset + p.numel()]
        want.append(p.numel() / w.square().sum())
        offset += p.numel()
    torch.testing.assert_close(la.prior_precision[is_a], torch.stack(want)[is_a])
    log_d = la.prior_precision.log().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(prior_precision=log_d.exp()), log_d)
    assert grad[~is_a].abs().max() < 1e-2


def test_options_a_method_would_ignore_are_refused():
    la = fitted("kron")
    with pytest.raises(ValueError, match="prior_structure"):
        la.optimize_prior_precision(prior_structure="diag")
    with pytest.raises(ValueError, match="prior_structure"):
        la.optimize_prior_precision(method="gridsearch", prior_structure="layerwise")
    with pytest.raises(ValueError, match="custom loss"):
        la.optimize_prior_precision(method="marglik", loss=lambda p: p)


def test_linearised_says_when_it_returns_the_map():
    """On the tiny random model the linearised evidence supports no prior variance in 6 of
    the 8 tensors: their precisions end at the upper bound, and the user is told (the
    posterior is the MAP there)."""
    from laplace_lora_ext.posterior.evidence_search import _warn_if_at_upper_bound

    la = fitted("kron")
    with pytest.warns(RuntimeWarning, match="put 6 tensors' prior precision \\(of 8\\) at its"):
        la.optimize_prior_precision(method="linearised")
    assert int((la.prior_precision == P.LINEARISED_MAX_PRECISION).sum()) == 6
    bound = P.LINEARISED_MAX_PRECISION
    with pytest.warns(RuntimeWarning, match="put 2 tensors' prior precision \\(of 4\\)"):
        _warn_if_at_upper_bound(torch.tensor([bound, 3.0, bound, 1.0]), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_at_upper_bound(torch.tensor([0.5 * bound, 3.0]), 2)
