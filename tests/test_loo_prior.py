"""``optimize_prior_precision(method="leave_one_out")`` against brute force: explicit
leave-one-out kernel regressions (one solve per left-out example), and ``B = 0``
Jacobians and base logits from a copy of the model with ``lora_B`` zeroed (float64)."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laplace_lora_ext import loo_prior
from laplace_lora_ext.posterior.tuning import SATURATED_TRAIN_NLL
from laplace_lora_ext.prior import (
    TrainingDataSpentError,
    UnchangedLogitsError,
    lora_a_mask,
    spread_matched_precision,
)
from tests.models import loader, lora_laplace, random_batch, tiny_llama, zero_lora_B


def explicit_loo_residuals(y: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``y_n - K_n,-n K_-n,-n⁻¹ y_-n`` for every ``n``, one solve each."""
    M, k = y.shape
    out = []
    for n in range(M):
        rows = torch.arange(n * k, (n + 1) * k)
        rest = torch.tensor([i for i in range(M * k) if not n * k <= i < (n + 1) * k])
        mu = K[rows][:, rest] @ torch.linalg.solve(K[rest][:, rest], y.reshape(-1)[rest])
        out.append(y[n] - mu)
    return torch.stack(out)


@settings(max_examples=30, deadline=None)
@given(M=st.integers(2, 6), k=st.integers(1, 3), extra=st.integers(0, 4), seed=st.integers(0, 999))
def test_loo_residuals_match_explicit_refits(M, k, extra, seed):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(M * k, M * k + extra, generator=g, dtype=torch.float64)
    K = G @ G.T + 0.1 * torch.eye(M * k, dtype=torch.float64)
    y = torch.randn(M, k, generator=g, dtype=torch.float64)
    got = loo_prior.loo_residuals(y, K)
    jittered = K + 1e-10 * K.diagonal().mean() * torch.eye(M * k, dtype=K.dtype)  # as inside
    torch.testing.assert_close(got, explicit_loo_residuals(y, jittered), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("C", [2, 3, 5])
def test_centred_basis_is_orthonormal_and_centred(C):
    Q = loo_prior.centred_basis(C)
    torch.testing.assert_close(Q.T @ Q, torch.eye(C - 1, dtype=Q.dtype))
    torch.testing.assert_close(Q @ Q.T, torch.eye(C, dtype=Q.dtype) - 1.0 / C)


def test_lora_b_zeroed_restores_the_weights_even_on_error():
    model = tiny_llama(seed=3)
    la = lora_laplace(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), loo_prior.lora_b_zeroed(la):
        for n, p in model.named_parameters():
            assert torch.equal(p, torch.zeros_like(p) if "lora_B" in n else before[n]), n
        raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_lora_a_redrawn_restores_the_weights_even_on_error():
    model = tiny_llama(seed=3)
    la = lora_laplace(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), loo_prior.lora_a_redrawn(la):
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) != ("lora_A" in n), n
        raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_lora_a_is_redrawn_from_the_adapters_own_initialisation(init):
    """PEFT draws ``lora_A`` Kaiming-uniform (``±1/√fan_in``) by default and normal with std
    ``1/r`` after ``init_lora_weights="gaussian"``; the kernel's redraw follows it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from laplace_lora_ext import LastTokenChoiceLM
    from tests.models import TARGET_IDS, tiny_llama_config

    config = tiny_llama_config()
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 64, 2, 2
    torch.manual_seed(0)
    r = 16
    lora = LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj"], init_lora_weights=init)
    model = LastTokenChoiceLM(get_peft_model(LlamaForCausalLM(config), lora), TARGET_IDS)
    la = lora_laplace(model.eval())
    drawn = torch.cat([v.reshape(-1) for v in redrawn_lora_a(la).values()])
    if init == "gaussian":
        assert drawn.abs().max() > 1.0 / 64**0.5  # beyond the uniform's bound
        assert drawn.std().item() == pytest.approx(1.0 / r, rel=0.1)
    else:
        assert drawn.abs().max() <= 1.0 / 64**0.5
        assert drawn.std().item() == pytest.approx(1.0 / (3 * 64) ** 0.5, rel=0.1)


def explicit_centred_jacobian(
    model: torch.nn.Module, X: dict, lora_a: dict | None, covered: str = ""
):
    """``(J, base)``: the centred-basis Jacobian ``(N(C-1), P_B)`` of the logits with respect
    to every ``lora_B`` whose name contains ``covered``, at those ``B = 0`` (the others as
    trained), row by row with autograd (``lora_A`` replaced by ``lora_a``, name to value, if
    given), and the base logits ``(N, C)``."""
    zeroed = zero_lora_B(copy.deepcopy(model), covered)
    with torch.no_grad():
        for n, p in zeroed.named_parameters():
            if lora_a and n in lora_a:
                p.copy_(lora_a[n])
    params = [p for n, p in zeroed.named_parameters() if "lora_B" in n and covered in n]
    base = zeroed(X)
    Q = loo_prior.centred_basis(base.shape[-1])
    rows = []
    for i in range(base.shape[0]):
        for j in range(base.shape[-1] - 1):
            grads = torch.autograd.grad(base[i] @ Q[:, j], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows), base.detach()


def brute_force_loo_logits(
    model: torch.nn.Module,
    batch: dict,
    lora_a: dict | list[dict] | None = None,
    covered: str = "",
) -> torch.Tensor:
    """Leave-one-out logits ``(N, C)`` from explicit Jacobians at ``B = 0``, ``lora_A``
    replaced by ``lora_a`` in the kernel's copy of the model if given (a list: the kernel is
    the mean of one kernel per entry); ``covered`` as in :func:`explicit_centred_jacobian`."""
    X = {k: v for k, v in batch.items() if k != "labels"}
    draws = lora_a if isinstance(lora_a, list) else [lora_a]
    kernels = []
    for draw in draws:
        J, base = explicit_centred_jacobian(model, X, draw, covered)
        kernels.append(J @ J.T)
    Q = loo_prior.centred_basis(base.shape[-1])
    f_map = model(X).detach()
    y = (f_map - base) @ Q
    resid = explicit_loo_residuals(y, torch.stack(kernels).mean(0))
    return f_map - resid @ Q.T


def redrawn_lora_a(la, seed: int = loo_prior.REDRAW_SEED) -> dict[str, torch.Tensor]:
    """The model's ``lora_A`` values under :func:`loo_prior.lora_a_redrawn`, by name."""
    with loo_prior.lora_a_redrawn(la, seed):
        return {n: p.detach().clone() for n, p in la.model.named_parameters() if "lora_A" in n}


def default_draws(la) -> list[dict[str, torch.Tensor]]:
    """The default kernel's draws of ``lora_A`` (:data:`loo_prior.KERNEL_DRAWS` seeds)."""
    return [redrawn_lora_a(la, loo_prior.REDRAW_SEED + i) for i in range(loo_prior.KERNEL_DRAWS)]


@pytest.mark.parametrize(
    "structure, kwargs",
    [("kron", {}), ("kron", {"factor_rank": 2, "rank_threshold": 4}), ("diag", {}), ("full", {})],
)
def test_loo_logits_match_brute_force_and_the_prior_minimises_their_nll(structure, kwargs):
    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    la = lora_laplace(model, structure, **kwargs)
    la.fit(loader(batch, 2))
    cache = loo_prior.loo_cache(la, loader(batch, 2))  # lora_A redrawn, 8 draws
    torch.testing.assert_close(
        cache.logits,
        brute_force_loo_logits(model, batch, lora_a=default_draws(la)),
        rtol=1e-6,
        atol=1e-8,
    )
    torch.testing.assert_close(cache.labels, batch["labels"])

    la.optimize_prior_precision(method="leave_one_out")
    got = la.prior_precision.clone()
    is_a = lora_a_mask(la.lora_param_names)
    torch.testing.assert_close(got[is_a], spread_matched_precision(la)[is_a].to(got))
    delta_b = got[~is_a]
    assert torch.all(delta_b == delta_b[0])

    def nll_at(delta: float) -> float:  # the same joint MC predictive, brute-force LOO logits
        la.prior_precision = torch.where(is_a, got, torch.full_like(got, delta))
        probs = cache.probs(la, "mc", None, torch.Generator().manual_seed(0))  # default draws
        return float(-probs[torch.arange(6), batch["labels"]].log().sum())

    d = float(delta_b[0])
    assert nll_at(d) <= min(nll_at(d * 10**0.0625), nll_at(d * 10**-0.0625)) + 1e-12
    for n, p in model.named_parameters():  # lora_B restored after the B = 0 pass
        if "lora_B" in n:
            assert p.abs().sum() > 0


def test_loo_logits_with_lora_modules_keep_the_other_adapters_trained():
    """Only the posterior's ``lora_B`` are zeroed for the base logits (all adapters were
    switched off, so ``y`` held changes the kernel cannot explain)."""
    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    la = lora_laplace(model, lora_modules=r"layers\.1\.")
    la.fit(loader(batch, 2))
    cache = loo_prior.loo_cache(la, loader(batch, 2))
    want = brute_force_loo_logits(model, batch, default_draws(la), covered="layers.1.")
    torch.testing.assert_close(cache.logits, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["leave_one_out", "function_space"])
def test_training_data_rules_refuse_an_untrained_covered_adapter_beside_trained_ones(method):
    model = zero_lora_B(tiny_llama(seed=3), covered="layers.1.")  # layer 0 stays trained
    la = lora_laplace(model, lora_modules=r"layers\.1\.")
    la.fit(loader(random_batch(n=6, n_classes=3, seed=4), 2))
    before = la.prior_precision.clone()
    with pytest.raises(UnchangedLogitsError, match="does not change the logits"):
        la.optimize_prior_precision(method=method)
    torch.testing.assert_close(la.prior_precision, before)


def test_leave_one_out_refuses_untrained_adapters_and_missing_data():
    model = tiny_llama(seed=3)
    la = lora_laplace(model)
    with pytest.raises(ValueError, match="call la.fit"):
        la.optimize_prior_precision(method="leave_one_out")
    with pytest.raises(ValueError, match="prior_structure"):
        la.optimize_prior_precision(method="leave_one_out", prior_structure="diag")
    la.fit(loader(random_batch(n=1, n_classes=3, seed=4), 1))
    with pytest.raises(ValueError, match="at least two"):
        la.optimize_prior_precision(method="leave_one_out")
    zero_lora_B(model)
    la = lora_laplace(model)
    la.fit(loader(random_batch(n=4, n_classes=3), 2))
    with pytest.raises(ValueError, match="does not change the logits"):
        la.optimize_prior_precision(method="leave_one_out")
    la.loss = 0.5 * SATURATED_TRAIN_NLL * la.n_data
    with pytest.warns(RuntimeWarning, match="does not change the logits"):
        la.optimize_prior_precision()


class _SinglePass(torch.utils.data.IterableDataset):
    """Examples that can be iterated once: a ``DataLoader`` over it is empty after ``fit``."""

    def __init__(self, batch: dict):
        n = len(batch["labels"])
        self.examples = iter([{k: v[i] for k, v in batch.items()} for i in range(n)])

    def __iter__(self):
        return self.examples


def test_a_loader_that_fit_emptied_gets_a_clear_error_and_the_default_falls_back():
    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    las = []
    for data in (torch.utils.data.DataLoader(_SinglePass(batch), batch_size=3), loader(batch, 3)):
        la = lora_laplace(model)
        la.fit(data)
        la.loss = 0.5 * SATURATED_TRAIN_NLL * la.n_data  # memorised: the default is the rule
        las.append(la)
    spent, kept = las
    for method in ("leave_one_out", "function_space"):
        with pytest.raises(TrainingDataSpentError, match="yield no batches on a second pass"):
            spent.optimize_prior_precision(method=method)
    with pytest.warns(RuntimeWarning, match="yield no batches.*Using method='lora_marglik'"):
        spent.optimize_prior_precision()
    kept.optimize_prior_precision(method="lora_marglik")
    torch.testing.assert_close(spent.prior_precision, kept.prior_precision)


def test_only_the_examples_within_the_jacobian_budget_are_used(monkeypatch):
    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    la = lora_laplace(model)
    la.fit(loader(batch, 2))
    monkeypatch.setattr(loo_prior, "LOO_JACOBIAN_BYTES", 1)  # one batch only
    cache = loo_prior.loo_cache(la, loader(batch, 2))
    assert len(cache.labels) == 2
    first = {k: v[:2] for k, v in batch.items()}
    want = brute_force_loo_logits(model, first, lora_a=default_draws(la))
    torch.testing.assert_close(cache.logits, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_trained_lora_a_kernel_matches_brute_force(structure):
    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    la = lora_laplace(model, structure)
    la.fit(loader(batch, 2))
    cache = loo_prior.loo_cache(la, loader(batch, 2), kernel_lora_a="trained")
    want = brute_force_loo_logits(model, batch)
    torch.testing.assert_close(cache.logits, want, rtol=1e-6, atol=1e-8)
    redrawn = loo_prior.loo_cache(la, loader(batch, 2)).logits
    assert not torch.allclose(cache.logits, redrawn)  # the kernel did change
    with pytest.raises(ValueError, match="kernel_lora_a"):
        loo_prior.loo_cache(la, loader(batch, 2), kernel_lora_a="fresh")


@pytest.mark.parametrize("structure, kwargs", [("kron", {"factor_rank": 2}), ("full", {})])
def test_kernel_averaged_over_draws_matches_brute_force(structure, kwargs):
    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    la = lora_laplace(model, structure, **kwargs)
    la.fit(loader(batch, 2))
    cache = loo_prior.loo_cache(la, loader(batch, 2), kernel_draws=3)
    draws = [redrawn_lora_a(la, loo_prior.REDRAW_SEED + i) for i in range(3)]
    want = brute_force_loo_logits(model, batch, lora_a=draws)
    torch.testing.assert_close(cache.logits, want, rtol=1e-6, atol=1e-8)
    one = loo_prior.loo_cache(la, loader(batch, 2), kernel_draws=1).logits
    assert not torch.allclose(cache.logits, one)
    for bad in [0, -1, 2.5]:
        with pytest.raises(ValueError, match="kernel_draws"):
            loo_prior.loo_cache(la, loader(batch, 2), kernel_draws=bad)
    with pytest.raises(ValueError, match="kernel_draws"):
        loo_prior.loo_cache(la, loader(batch, 2), kernel_lora_a="trained", kernel_draws=2)


def test_margin_check_loo_logits_equal_the_library_and_fresh_lora_a_is_restored():
    from benchmarks import llm_loo_margin_check as check
    from laplace_lora_ext.loo_prior import _kernel_and_base

    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    la = lora_laplace(model, "kron")
    la.fit(loader(batch, 2))
    is_a = lora_a_mask(la.lora_param_names)
    K, f_base, _ = _kernel_and_base(la, loader(batch, 2), ~is_a)
    want = loo_prior.loo_cache(la, loader(batch, 2)).logits
    f_map = la.model(batch).detach()
    torch.testing.assert_close(check.loo_logits(f_map, f_base, K).to(want), want)

    before = [p.detach().clone() for p in la.params]
    with loo_prior.lora_a_redrawn(la, seed=0):
        for name, p, old in zip(la.lora_param_names, la.params, before, strict=True):
            if ".lora_A." in name:
                assert not torch.equal(p, old)
                assert p.abs().max() <= 1 / p.shape[1] ** 0.5  # PEFT's Kaiming-uniform bound
            else:
                assert torch.equal(p, old)
    for p, old in zip(la.params, before, strict=True):
        assert torch.equal(p, old)


def count_captures(monkeypatch, la) -> list[int]:
    """A one-element counter of ``la.backend.capture`` calls (forward passes)."""
    calls = [0]
    capture = la.backend.capture

    def counted(x):
        calls[0] += 1
        return capture(x)

    monkeypatch.setattr(la.backend, "capture", counted)
    return calls


@pytest.mark.parametrize("draws_held, passes", [(None, 1), (2, 2), (1, 3)])
def test_draws_share_passes_within_the_draw_budget(monkeypatch, draws_held, passes):
    """Every draw's kernel from as few passes over the examples as the draw budget allows
    (3 draws; one forward per batch and pass), each time equal to brute force."""
    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    la = lora_laplace(model, "kron")
    la.fit(loader(batch, 2))
    if draws_held is not None:  # the first draw's rows plus draws_held - 1 more fit
        is_a = lora_a_mask(la.lora_param_names)
        P_B = sum(p.numel() for p, a in zip(la.params, is_a.tolist(), strict=True) if not a)
        one_draw = 6 * 2 * P_B * 8  # M (C - 1) P_B float64
        monkeypatch.setattr(loo_prior, "LOO_DRAW_BYTES", (draws_held - 1) * one_draw)
    calls = count_captures(monkeypatch, la)
    cache = loo_prior.loo_cache(la, loader(batch, 2), kernel_draws=3)
    assert calls[0] == 3 * passes + 3  # + the MAP pass of the cache
    draws = [redrawn_lora_a(la, loo_prior.REDRAW_SEED + i) for i in range(3)]
    want = brute_force_loo_logits(model, batch, lora_a=draws)
    torch.testing.assert_close(cache.logits, want, rtol=1e-6, atol=1e-8)


def test_a_lora_b_whose_input_is_not_lora_a_of_x_takes_one_pass_per_draw(monkeypatch):
    """A LoRA variant (here a pre-hook doubling one ``lora_B``'s input) breaks the shared
    pass's premise; each draw is then set in the model, and the kernel is still exact."""
    model = tiny_llama(seed=3)
    batch = random_batch(n=4, n_classes=3, seed=4)
    la = lora_laplace(model, "kron")
    la.fit(loader(batch, 2))
    lora_b = next(m for n, m in model.named_modules() if n.endswith("lora_B.default"))
    lora_b.register_forward_pre_hook(lambda module, args: (2.0 * args[0],))
    calls = count_captures(monkeypatch, la)
    cache = loo_prior.loo_cache(la, loader(batch, 2), kernel_draws=3)
    assert calls[0] == 2 * (1 + 3) + 2  # per batch: the shared try, one pass per draw; + MAP
    draws = [redrawn_lora_a(la, loo_prior.REDRAW_SEED + i) for i in range(3)]
    want = brute_force_loo_logits(model, batch, lora_a=draws)
    torch.testing.assert_close(cache.logits, want, rtol=1e-6, atol=1e-8)


def spy_draws(monkeypatch) -> dict[str, list]:
    """The ``n_samples`` that reach the leave-one-out rule and the grid search."""
    from laplace_lora_ext.posterior import tuning

    seen: dict[str, list] = {"leave_one_out": [], "gridsearch": []}

    def loo(la, batches, n_samples, progress=False):
        seen["leave_one_out"].append(n_samples)
        return la.prior_precision

    def grid(self, val_loader, grid, link_approx, n_samples, *rest):
        seen["gridsearch"].append(n_samples)

    monkeypatch.setattr(tuning.loo_prior, "loo_precision", loo)
    monkeypatch.setattr(tuning.PriorTuningMixin, "_optimize_gridsearch", grid)
    return seen


def test_the_rule_takes_the_default_draws_and_gridsearch_laplace_torchs(monkeypatch):
    """Without ``n_samples`` the leave-one-out rule scores its grid with the predictive's
    default draws (``None``), the grid search with laplace-torch's 100; a given count
    reaches both, and a bad one is refused before any search."""
    seen = spy_draws(monkeypatch)
    model = tiny_llama(seed=3)
    batch = random_batch(n=4, n_classes=3, seed=4)
    la = lora_laplace(model)
    la.fit(loader(batch, 2))
    la.loss = 0.5 * SATURATED_TRAIN_NLL * la.n_data  # memorised: the default is the rule
    la.optimize_prior_precision()
    la.optimize_prior_precision(method="leave_one_out", n_samples=7)
    la.optimize_prior_precision(method="gridsearch", val_loader=loader(batch, 2))
    la.optimize_prior_precision(method="gridsearch", val_loader=loader(batch, 2), n_samples=9)
    assert seen == {"leave_one_out": [None, 7], "gridsearch": [100, 9]}
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
            la.optimize_prior_precision(n_samples=bad)


def memorised_posterior(n: int = 6):
    """A fitted ``kron`` posterior on a tiny trained adapter whose training NLL is set below
    :data:`SATURATED_TRAIN_NLL`, so that the default takes the leave-one-out rule."""
    model = tiny_llama(seed=3)
    batch = random_batch(n=n, n_classes=3, seed=4)
    la = lora_laplace(model)
    la.fit(loader(batch, 2))
    la.loss = 0.5 * SATURATED_TRAIN_NLL * la.n_data
    return la


def test_progress_bar_and_verbose_report_the_default_without_changing_it(capsys):
    """``progress_bar=True`` shows the rule's passes and grids on stderr, ``verbose=True``
    prints the rule, why the default took it and the prior; the prior is the same."""
    la = memorised_posterior()
    la.optimize_prior_precision()
    quiet = la.prior_precision.clone()
    assert capsys.readouterr() == ("", "")
    la.optimize_prior_precision(progress_bar=True, verbose=True)
    torch.testing.assert_close(la.prior_precision, quiet, rtol=0, atol=0)
    out, err = capsys.readouterr()
    for bar in ("[Leave-one-out kernel]", "GLM pass", "[Leave-one-out grid]"):
        assert bar in err, bar
    assert "method='leave_one_out' (the default: mean training NLL" in out
    assert "training data memorised)" in out
    is_a = lora_a_mask(la.lora_param_names)
    assert f"others {float(quiet[~is_a][0]):.4g}–{float(quiet[~is_a][0]):.4g}" in out


@pytest.mark.parametrize(
    "method, bar",
    [("lora_marglik", "[Evidence, round 1]"), ("function_space", "[Function-space pass]")],
)
def test_progress_bar_and_verbose_on_the_other_training_data_methods(capsys, method, bar):
    la = memorised_posterior()
    with pytest.warns(RuntimeWarning) if method == "lora_marglik" else nullcontext():
        la.optimize_prior_precision(method=method, progress_bar=True, verbose=True)
    out, err = capsys.readouterr()
    assert bar in err
    assert out.startswith(f"optimize_prior_precision: method={method!r}; prior precision lora_A")


def test_the_default_says_why_it_used_the_evidence(capsys):
    la = memorised_posterior()
    la.loss = 2 * SATURATED_TRAIN_NLL * la.n_data  # not memorised: the evidence
    la.optimize_prior_precision(verbose=True)
    assert "method='lora_marglik' (the default: mean training NLL 0.02 >= 0.01)" in (
        capsys.readouterr().out
    )


def test_gridsearch_progress_bar_covers_the_validation_pass(capsys):
    la = memorised_posterior()
    la.optimize_prior_precision(
        method="gridsearch", val_loader=loader(random_batch(n=4, seed=5), 2), progress_bar=True
    )
    err = capsys.readouterr().err
    assert "GLM pass" in err and "[Grid search]" in err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pred_type": "nn"}, "pred_type='nn' is not supported here"),
        ({"method": "gridsearch", "pred_type": "nn"}, "Leave pred_type='glm'"),
        ({"method": "marglik", "pred_type": "nn"}, "marglik ignores pred_type"),
        ({"method": "marglik", "pred_type": "bogus"}, "pred_type='bogus' is not supported"),
        ({"method": "gridsearch", "link_approx": "probt"}, "Unsupported link_approx 'probt'"),
        ({"link_approx": "probit"}, "link_approx='probit' is used only by method='gridsearch'"),
        ({"method": "leave_one_out", "link_approx": "bridge"}, "Leave link_approx='mc'"),
        ({"val_loader": True}, "val_loader is used only by method='gridsearch'"),
        ({"method": "marglik", "val_loader": True}, "Pass method='gridsearch' to tune on it"),
        ({"method": "lora_marglik", "link_approx": "probit"}, "link_approx would be ignored"),
        ({"method": "marglik", "link_approx": "bridge"}, "link_approx would be ignored"),
        ({"method": "linearised", "n_samples": 3}, "n_samples would be ignored"),
        ({"method": "function_space", "n_samples": 100}, "n_samples would be ignored"),
        ({"method": "leave_one_out", "lr": 0.5}, r"does not use \['lr'\]"),
        ({"method": "function_space", "n_steps": 3}, r"does not use \['n_steps'\]"),
        ({"method": "leave_one_out", "init_prior_prec": 7.0}, "does not use"),
        ({"method": "gridsearch", "link_approx": "probit", "n_samples": 5}, "draws no samples"),
        (
            {"method": "marglik", "prior_structure": "scalar", "init_prior_prec": [1.0, 2.0]},
            "init_prior_prec has 2 values but prior_structure='scalar' takes 1",
        ),
    ],
)
def test_options_the_method_would_ignore_are_refused_and_the_prior_kept(kwargs, match):
    la = memorised_posterior()
    before = la.prior_precision.clone()
    if kwargs.get("val_loader") or kwargs.get("method") == "gridsearch":
        kwargs["val_loader"] = loader(random_batch(n=4, seed=5), 2)
    with pytest.raises(ValueError, match=match):
        la.optimize_prior_precision(**kwargs)
    torch.testing.assert_close(la.prior_precision, before, rtol=0, atol=0)


def test_gridsearch_and_linearised_report_in_the_same_format(capsys):
    """Every method's ``verbose=True`` line has the same form; gridsearch adds its best
    validation NLL."""
    la = memorised_posterior()
    batch = random_batch(n=4, n_classes=3, seed=5)
    la.optimize_prior_precision(
        method="gridsearch", val_loader=loader(batch, 2), grid_size=3, verbose=True
    )
    out = capsys.readouterr().out
    delta = float(la.prior_precision.reshape(-1)[0])
    assert out.startswith(
        f"optimize_prior_precision: method='gridsearch'; prior precision {delta:.4g}; "
        "validation NLL "
    )
    la.optimize_prior_precision(method="linearised", verbose=True)
    out = capsys.readouterr().out
    assert out.startswith("optimize_prior_precision: method='linearised'; prior precision ")
