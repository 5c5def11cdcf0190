"""``optimize_prior_precision(method="function_space")`` against brute force: explicit
per-example Jacobians (autograd, one row at a time) and base logits from a copy of the
model with ``lora_B`` zeroed (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from laplace_lora_ext.posterior.tuning import SATURATED_TRAIN_NLL
from laplace_lora_ext.prior import adapters_disabled, lora_a_mask, spread_matched_precision
from tests.models import loader, lora_laplace, random_batch, tiny_llama, tiny_roberta, zero_lora_B


def brute_force_delta_b(
    model: torch.nn.Module, batch: dict, hf: bool = False, covered: str = ""
) -> float:
    """``hf``: a bare PEFT/HF model, called as ``model(**inputs).logits``; ``covered``: only
    the ``lora_B`` tensors whose names contain it are in the posterior (zeroed for the base
    logits, in the Jacobian); the other adapters stay as trained."""
    params = [p for n, p in model.named_parameters() if "lora_B" in n and covered in n]
    X = {k: v for k, v in batch.items() if k != "labels"}

    def logits_of(m: torch.nn.Module) -> torch.Tensor:
        return m(**X).logits if hf else m(X)

    logits = logits_of(model)
    zeroed = zero_lora_B(copy.deepcopy(model), covered)
    with torch.no_grad():
        base = logits_of(zeroed)
    centred = logits - logits.mean(-1, keepdim=True)
    jac = 0.0
    for i in range(centred.shape[0]):
        for c in range(centred.shape[1]):
            grads = torch.autograd.grad(centred[i, c], params, retain_graph=True)
            jac += sum(float(g.square().sum()) for g in grads)
    change = (logits - base).detach()
    change = change - change.mean(-1, keepdim=True)
    return jac / float(change.square().sum())


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_function_space_prior_matches_brute_force(structure):
    model = tiny_llama(seed=3)
    batch = random_batch(n=5, n_classes=3, seed=4)
    la = lora_laplace(model, structure)
    la.fit(loader(batch, 2))
    la.optimize_prior_precision(method="function_space")
    is_a = lora_a_mask(la.lora_param_names)
    want_b = brute_force_delta_b(model, batch)
    got = la.prior_precision
    torch.testing.assert_close(got[~is_a], torch.full_like(got[~is_a], want_b), rtol=1e-8, atol=0)
    torch.testing.assert_close(got[is_a], spread_matched_precision(la)[is_a].to(got))


def test_function_space_prior_on_a_bare_peft_model():
    """A PeftModel given directly is called with ``**inputs`` for the base logits too (as
    for the fit), with its trained ``modules_to_save`` head left on."""
    model = tiny_roberta(seed=3)
    batch = random_batch(n=5, n_classes=2, seed=4)
    la = lora_laplace(model)
    la.fit(loader(batch, 2))
    la.optimize_prior_precision(method="function_space")
    is_a = lora_a_mask(la.lora_param_names)
    want_b = brute_force_delta_b(model, batch, hf=True)
    got = la.prior_precision[~is_a]
    torch.testing.assert_close(got, torch.full_like(got, want_b), rtol=1e-8, atol=0)


def test_function_space_counts_only_the_posteriors_adapters():
    """With ``lora_modules`` the other adapters stay trained in the base logits: ``Δf`` is
    what the covered ``lora_B`` did (it took every adapter's change, a prior 5x too wide)."""
    model = tiny_llama(seed=3)
    batch = random_batch(n=5, n_classes=3, seed=4)
    la = lora_laplace(model, lora_modules=r"layers\.1\.")
    la.fit(loader(batch, 2))
    la.optimize_prior_precision(method="function_space")
    is_a = lora_a_mask(la.lora_param_names)
    want_b = brute_force_delta_b(model, batch, covered="layers.1.")
    assert want_b != pytest.approx(brute_force_delta_b(model, batch), rel=0.1)
    got = la.prior_precision[~is_a]
    torch.testing.assert_close(got, torch.full_like(got, want_b), rtol=1e-8, atol=0)


def test_function_space_uses_every_fit_and_restores_the_adapters():
    model = tiny_llama(seed=3)
    batch = random_batch(n=6, n_classes=3, seed=4)
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 3), slice(3, 6))]
    la = lora_laplace(model)
    la.fit(loader(halves[0], 3))
    la.fit(loader(halves[1], 3), override=False)
    la.optimize_prior_precision(method="function_space")
    is_a = lora_a_mask(la.lora_param_names)
    assert float(la.prior_precision[~is_a][0]) == pytest.approx(
        brute_force_delta_b(model, batch), rel=1e-8
    )
    X = {k: v for k, v in batch.items() if k != "labels"}
    before = model(X)
    with adapters_disabled(model):
        assert not torch.allclose(model(X), before)
    torch.testing.assert_close(model(X), before)  # adapters back on


def test_function_space_needs_a_fit_and_a_trained_adapter():
    model = tiny_llama(seed=3)
    la = lora_laplace(model)
    with pytest.raises(ValueError, match="call la.fit"):
        la.optimize_prior_precision(method="function_space")
    zero_lora_B(model)
    batch = random_batch(n=4, n_classes=3)
    la = lora_laplace(model)
    la.fit(loader(batch, 2))
    with pytest.raises(ValueError, match="does not change the logits"):
        la.optimize_prior_precision(method="function_space")
    with pytest.raises(ValueError, match="prior_structure"):
        la.optimize_prior_precision(method="function_space", prior_structure="diag")


def test_the_default_uses_leave_one_out_only_on_memorised_training_data():
    model = tiny_llama(seed=3)
    batch = random_batch(n=5, n_classes=3, seed=4)
    la = lora_laplace(model)
    la.fit(loader(batch, 2))
    assert la.loss / la.n_data > SATURATED_TRAIN_NLL  # a random tiny model: not memorised
    la.optimize_prior_precision(method="lora_marglik")
    marglik = la.prior_precision.clone()
    la.optimize_prior_precision(method="leave_one_out")
    loo = la.prior_precision.clone()
    assert not torch.allclose(marglik, loo)
    la.optimize_prior_precision()
    torch.testing.assert_close(la.prior_precision, marglik)
    la.loss = 0.5 * SATURATED_TRAIN_NLL * la.n_data  # as if the MAP had memorised the data
    with pytest.warns(RuntimeWarning, match="memorised its training data"):
        la.optimize_prior_precision(method="lora_marglik")
    la.optimize_prior_precision()
    torch.testing.assert_close(la.prior_precision, loo)
    la.optimize_prior_precision(method="auto")
    torch.testing.assert_close(la.prior_precision, loo)
    del la._fit_loaders  # as for a posterior restored from a state dict
    with pytest.warns(RuntimeWarning, match="does not have"):
        la.optimize_prior_precision()
    assert torch.isfinite(la.prior_precision).all()


def test_the_default_falls_back_when_the_adapter_is_untrained():
    model = tiny_llama(seed=3)
    zero_lora_B(model)
    la = lora_laplace(model)
    la.fit(loader(random_batch(n=5, n_classes=3, seed=4), 2))
    la.loss = 0.5 * SATURATED_TRAIN_NLL * la.n_data
    with pytest.warns(RuntimeWarning, match="does not change the logits") as record:
        la.optimize_prior_precision()
    assert torch.isfinite(la.prior_precision).all()
    fallback = [r for r in record if "does not change the logits" in str(r.message)]
    assert fallback[0].filename == __file__  # points at the caller's line


def test_a_one_shot_iterator_is_not_read_twice():
    """fit() spends a generator; the default then falls back with a warning that names it,
    and the explicit method refuses with a clear error (never a prior from no data)."""
    model = tiny_llama(seed=3)
    batches = list(loader(random_batch(n=5, n_classes=3, seed=4), 2))
    la = lora_laplace(model)
    la.fit(iter(batches))
    la.loss = 0.5 * SATURATED_TRAIN_NLL * la.n_data
    with pytest.warns(RuntimeWarning, match="one-shot iterator"):
        la.optimize_prior_precision()
    with pytest.raises(ValueError, match="re-iterable"):
        la.optimize_prior_precision(method="function_space")
    la.fit(batches)  # a list is re-read: the default uses the function-space rule
    la.fit(iter(batches), override=False)  # ... until a one-shot iterator joins
    with pytest.raises(ValueError, match="re-iterable"):
        la.optimize_prior_precision(method="function_space")
