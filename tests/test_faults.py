"""Faults that must never corrupt anything silently (issue 14, section 2).

NaN/inf, loaders that yield fewer examples than ``len(dataset)``, fits that fail half-way,
bad scalar values, padding side, train mode and ``.grad``, and mismatched saved posteriors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from laplace_lora_ext import LastTokenChoiceLM
from laplace_lora_ext.guards import NonFiniteError, check_all_finite
from laplace_lora_ext.jacobian_cache import LogitJacobianCache
from tests.models import (
    TARGET_IDS,
    VOCAB,
    DictDataset,
    loader,
    lora_laplace,
    perturb_lora_B,
    random_batch,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_config,
)

STRUCTURES = [
    ("kron", {}),
    ("kron", {"factor_rank": 3, "rank_threshold": 4}),  # low-rank factors
    ("diag", {}),
    ("full", {}),
]
IDS = ["kron", "kron_lowrank", "diag", "full"]


def _dataset(n: int = 7, seed: int = 1) -> DictDataset:
    b = random_batch(n, 5, 3, "left", seed=seed)
    return DictDataset(b["input_ids"], b["attention_mask"], b["labels"])


def _H(la) -> torch.Tensor:
    return la.H_facs.to_matrix() if la._structure == "kron" else la.H


# ---------------------------------------------------------------------- 1. NaN / inf
def _nan_token(model: nn.Module, token: int = 1) -> None:
    """Make token ``token``'s embedding row NaN (ids in the tests' data are >= 2)."""
    with torch.no_grad():
        model.model.get_input_embeddings().weight[token] = float("nan")


@pytest.mark.parametrize("structure, kw", STRUCTURES, ids=IDS)
def test_nan_in_the_forward_is_an_error_naming_the_batch(structure, kw):
    model = tiny_llama()
    _nan_token(model)
    b = random_batch(8, 5, 3, "left")
    b["input_ids"][5, -1] = 1  # example 5: batch 1 of a batch-size-4 loader
    la = lora_laplace(model, structure, **kw)
    with pytest.raises(NonFiniteError, match=r"Batch 1 .*examples 4\.\.7.*NaN/inf"):
        la.fit(loader(b, 4))


class _NanGradientRow(nn.Module):
    """Finite logits, but NaN output gradients for example ``row`` of every batch:
    ``0 * sqrt(f - f.detach())`` is 0 in the forward and 0 * inf in the backward."""

    accepts_batch_dict = True

    def __init__(self, inner: nn.Module, row: int) -> None:
        super().__init__()
        self.inner, self.row = inner, row

    def forward(self, batch=None, **kwargs):
        batch = dict(batch if batch is not None else kwargs)
        batch.pop("labels", None)
        f = self.inner(batch)
        bump = torch.zeros_like(f)
        bump[self.row] = 0.0 * torch.sqrt(f[self.row] - f[self.row].detach())
        return f + bump


@pytest.mark.parametrize("structure, kw", STRUCTURES, ids=IDS)
def test_nan_reaching_only_the_output_gradients_is_not_dropped(structure, kw):
    la = lora_laplace(_NanGradientRow(tiny_llama(), row=1), structure, **kw)
    with pytest.raises(NonFiniteError, match="Batch 0 .*output gradients"):
        la.fit(loader(random_batch(4, 5, 3), 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_check_all_finite_finds_every_kind_of_non_finite(bad, dtype):
    t = torch.randn(4, 5).to(dtype)
    t[2, 3] = bad
    named = [("ok", torch.randn(3)), ("bad", t), ("empty", torch.empty(0, 3))]
    with pytest.raises(
        NonFiniteError, match=r"bad contain 1 NaN/inf value\(s\) in example\(s\) \[2\]"
    ):
        check_all_finite(named)
    check_all_finite([named[0], named[2]])  # finite and empty: fine


def test_nan_in_a_saved_posterior_is_refused_before_decomposition():
    la = lora_laplace(tiny_llama(), "kron")
    la.fit(loader(random_batch(4, 5, 3), 4))
    state = la.state_dict()
    state["H"][0][1] = state["H"][0][1].clone().fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="saved posterior"):
        lora_laplace(tiny_llama(), "kron").load_state_dict(state)


# ---------------------------------------------------------------------- 2. N = examples seen
def _fitted(loader_, structure="kron", **kw):
    la = lora_laplace(tiny_llama(), structure, prior_precision=0.7, **kw)
    la.fit(loader_)
    return la


def _assert_same_fit(la, ref) -> None:
    assert la.n_data == ref.n_data
    torch.testing.assert_close(_H(la), _H(ref), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("structure, kw", STRUCTURES, ids=IDS)
def test_drop_last_uses_the_examples_seen(structure, kw):
    ds = _dataset(7)
    la = _fitted(DataLoader(ds, batch_size=3, drop_last=True), structure, **kw)
    ref = _fitted(DataLoader(Subset(ds, range(6)), batch_size=3), structure, **kw)
    assert la.n_data == 6
    _assert_same_fit(la, ref)


def test_subset_sampler_uses_the_examples_seen():
    ds = _dataset(7)
    la = _fitted(DataLoader(ds, batch_size=2, sampler=[0, 2, 4]))
    ref = _fitted(DataLoader(Subset(ds, [0, 2, 4]), batch_size=2))
    assert la.n_data == 3
    _assert_same_fit(la, ref)


class _Stream(IterableDataset):
    """An iterable dataset without ``__len__``."""

    def __init__(self, ds: DictDataset) -> None:
        self.ds = ds

    def __iter__(self):
        return (self.ds[i] for i in range(len(self.ds)))


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_iterable_dataset_without_len_is_counted(structure):
    ds = _dataset(7)
    la = _fitted(DataLoader(_Stream(ds), batch_size=3), structure)
    ref = _fitted(DataLoader(ds, batch_size=3), structure)
    _assert_same_fit(la, ref)


def test_online_fit_after_a_drop_last_fit_counts_what_was_seen():
    ds, ds2 = _dataset(7), _dataset(5, seed=2)
    la = _fitted(DataLoader(ds, batch_size=3, drop_last=True))
    la.fit(DataLoader(ds2, batch_size=2), override=False)
    both = torch.utils.data.ConcatDataset([Subset(ds, range(6)), ds2])
    ref = _fitted(DataLoader(both, batch_size=11))
    _assert_same_fit(la, ref)


# ---------------------------------------------------------------------- 3. atomic fit
class _BrokenLoader:
    """Yields the first ``fail_at`` batches of a loader, then raises."""

    def __init__(self, loader_: DataLoader, fail_at: int = 2) -> None:
        self.loader, self.dataset, self.fail_at = loader_, loader_.dataset, fail_at

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.fail_at:
                raise RuntimeError("loader broke")
            yield batch


def _snapshot(la) -> dict:
    probe = random_batch(3, 5, 3, seed=9)
    return {
        "H": _H(la).clone(),
        "loss": torch.as_tensor(la.loss).clone(),
        "n_data": la.n_data,
        "mean": la.mean.clone(),
        "prior_precision": la.prior_precision.clone(),
        "prior_mean": la.prior_mean.clone(),
        "logml": la.log_marginal_likelihood().detach().clone(),
        "probs": la(probe).clone(),
    }


@pytest.mark.parametrize("override", [True, False])
@pytest.mark.parametrize("structure, kw", STRUCTURES, ids=IDS)
def test_failed_refit_leaves_the_previous_posterior_intact(structure, kw, override):
    la = lora_laplace(tiny_llama(), structure, prior_precision=0.7, **kw)
    la.fit(loader(random_batch(6, 5, 3, seed=1), 3))
    before = _snapshot(la)
    with pytest.raises(RuntimeError, match="loader broke"):
        la.fit(_BrokenLoader(loader(random_batch(9, 5, 3, seed=2), 3)), override=override)
    after = _snapshot(la)
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


def test_failed_first_fit_leaves_the_posterior_unfitted():
    la = lora_laplace(tiny_llama(), "kron")
    with pytest.raises(RuntimeError, match="loader broke"):
        la.fit(_BrokenLoader(loader(random_batch(9, 5, 3), 3)))
    with pytest.raises(AttributeError, match="fit"):
        la(random_batch(2, 5, 3))


def test_rejected_prior_precision_is_not_stored():
    la = lora_laplace(tiny_llama(), "kron", prior_precision=0.5)
    with pytest.raises(ValueError):
        la.prior_precision = torch.ones(la.n_params)  # per weight: not for kron
    assert torch.equal(la.prior_precision, torch.tensor([0.5]))


@pytest.mark.parametrize(
    "method, kwargs",
    [("leave_one_out", {}), ("gridsearch", {"grid_size": 5}), ("lora_marglik", {})],
)
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_prior_search_leaves_the_prior_as_it_was(monkeypatch, method, kwargs, error):
    batch = random_batch(n=6, n_classes=3, seed=4)
    la = lora_laplace(tiny_llama(seed=3))
    la.fit(loader(batch, 2))
    la.prior_precision = 2.5
    before = la.prior_precision.clone()
    # the step every search repeats per candidate prior: a predictive, or the evidence
    owner, attr = (
        (type(la), "log_marginal_likelihood")
        if method == "lora_marglik"
        else (LogitJacobianCache, "probs")
    )
    original, calls = getattr(owner, attr), []

    def fails_on_the_third_call(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return original(*args, **kw)

    monkeypatch.setattr(owner, attr, fails_on_the_third_call)
    if method == "gridsearch":
        kwargs = kwargs | {"val_loader": loader(batch, 3)}
    with pytest.raises(type(error)):
        la.optimize_prior_precision(method=method, **kwargs)
    assert len(calls) == 3  # it failed mid-search, after trying other values
    assert torch.equal(la.prior_precision, before)


# ---------------------------------------------------------------------- 4. bad values
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_prior_precision_must_be_positive_and_finite(structure, value):
    with pytest.raises(ValueError, match="prior_precision must be finite and > 0"):
        lora_laplace(tiny_llama(), structure, prior_precision=value)
    la = lora_laplace(tiny_llama(), structure)
    with pytest.raises(ValueError, match="prior_precision"):
        la.prior_precision = torch.tensor([1.0, value, 1.0, 1.0])
    assert torch.equal(la.prior_precision, torch.tensor([1.0]))


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan")])
def test_temperature_must_be_positive(value):
    with pytest.raises(ValueError, match="temperature"):
        lora_laplace(tiny_llama(), "kron", temperature=value)


def test_n_samples_must_be_positive():
    la = lora_laplace(tiny_llama(), "diag")
    b = random_batch(4, 5, 3)
    la.fit(loader(b, 4))
    for kwargs in (
        dict(link_approx="mc"),
        dict(link_approx="mc_indep"),
        dict(pred_type="nn", link_approx="mc"),
    ):
        with pytest.raises(ValueError, match="n_samples"):
            la(b, n_samples=0, **kwargs)
    with pytest.raises(ValueError, match="n_samples"):
        la.sample(0)


@pytest.mark.parametrize(
    "structure, kwargs, match",
    [
        ("kron", {"factor_rank": True}, "factor_rank"),
        ("kron", {"rank_threshold": -1}, "rank_threshold"),
        ("diag", {"rank_threshold": 16}, "only apply to hessian_structure='kron'"),
        ("full", {"rank_threshold": 16}, "only apply to hessian_structure='kron'"),
    ],
)
def test_rank_options_are_checked(structure, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_laplace(tiny_llama(), structure, **kwargs)


@pytest.mark.parametrize(
    "ids, exc, match",
    [
        ([5, -1], ValueError, "negative"),
        ([5.0, 9.0], TypeError, "integer token ids"),
        (["A", "B"], TypeError, "integer token ids"),
        ([True, 5], TypeError, "integer token ids"),
        ([5, VOCAB], ValueError, rf"0\.\.{VOCAB - 1}"),
        ("AB", TypeError, "sequence"),
        ({5, 9}, TypeError, "ordered sequence"),
        (frozenset({5, 9}), TypeError, "ordered sequence"),
        ({5: "A", 9: "B"}.keys(), TypeError, "ordered sequence"),
    ],
)
def test_target_ids_are_checked_at_construction(ids, exc, match):
    peft_model = tiny_llama().model
    with pytest.raises(exc, match=match):
        LastTokenChoiceLM(peft_model, ids)


def test_unmasked_padding_is_refused_and_a_ones_mask_is_the_escape():
    """Without an attention_mask, ids that begin or end with the config's pad token would be
    read at a padding position; a real ones mask (or ids without pads at the edges) runs."""
    model = tiny_llama()
    model.model.config.pad_token_id = 0
    right = random_batch(4, 6, 3, "right", pad_id=0)
    left = random_batch(4, 6, 3, "left", pad_id=0)
    for b in (right, left):
        assert bool((b["input_ids"][:, [0, -1]] == 0).any())
        pairs = DataLoader(TensorDataset(b["input_ids"], b["labels"]), batch_size=2)
        with pytest.raises(ValueError, match="no attention_mask.*pad token"):
            lora_laplace(model, "kron").fit(pairs)
        with pytest.raises(ValueError, match="no attention_mask"):
            model(b["input_ids"])
    ids = right["input_ids"].clone()
    ids[ids == 0] = 3
    ones = torch.ones_like(ids)
    torch.testing.assert_close(model(ids), model({"input_ids": ids, "attention_mask": ones}))
    model(right["input_ids"], attention_mask=torch.ones_like(right["input_ids"]))


@pytest.mark.parametrize("state", ["merged", "disabled"])
def test_merged_or_disabled_adapter_is_named(state):
    """A merged or disabled adapter is not called in the forward pass: the error names the
    state and its fix, and the failed fit leaves the posterior as it was."""
    model = tiny_llama()
    b = random_batch(4, 5, 3)
    la = lora_laplace(model, "kron")
    la.fit(loader(b, 2))
    before = la.H_facs.to_matrix().clone()
    match = "unmerge_adapter" if state == "merged" else "disable_adapter"
    if state == "merged":
        model.model.merge_adapter()
        context = warnings.catch_warnings()
    else:
        context = model.model.disable_adapter()
    with context, pytest.raises(RuntimeError, match=match):
        la.fit(loader(b, 2))
    torch.testing.assert_close(la.H_facs.to_matrix(), before)


def test_bool_labels_are_refused():
    b = random_batch(4, 5, 3)
    b["labels"] = b["labels"] > 0
    with pytest.raises(TypeError, match="integer class indices"):
        lora_laplace(tiny_llama(), "kron").fit(loader(b, 4))


def test_list_labels_are_refused():
    b = random_batch(4, 5, 3)
    x = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    pairs = [(x, b["labels"].tolist())]  # (X, y) with y a list
    with pytest.raises(TypeError, match="tensor of integer class indices"):
        lora_laplace(tiny_llama(), "kron").fit(pairs)


# ---------------------------------------------------------------------- 5. padding side
def tiny_gpt2_lm(seed: int = 0) -> LastTokenChoiceLM:
    """GPT-2 causal LM (absolute positions) with LoRA on c_attn, read at the last token."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=8,
        n_layer=2,
        n_head=2,
        n_positions=32,
        attn_implementation="eager",
        initializer_range=0.5,
    )
    base = GPT2LMHeadModel(config).double()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model = get_peft_model(base, lora)
    perturb_lora_B(peft_model, seed)
    return LastTokenChoiceLM(peft_model, TARGET_IDS).eval()


def _right_padded(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same sequences as the left-padded ``b``, padded on the right."""
    ids, mask = torch.zeros_like(b["input_ids"]), torch.zeros_like(b["attention_mask"])
    for i in range(len(ids)):
        real = b["input_ids"][i][b["attention_mask"][i].bool()]
        ids[i, : len(real)], mask[i, : len(real)] = real, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": b["labels"]}


@pytest.mark.parametrize("make", [tiny_gpt2_lm, tiny_llama], ids=["gpt2", "llama"])
def test_left_and_right_padding_agree(make):
    model = make()
    left = random_batch(5, 6, 3, "left")
    right = _right_padded(left)
    with torch.no_grad():
        torch.testing.assert_close(model(left), model(right), rtol=1e-10, atol=1e-10)
    la = lora_laplace(model, "kron")
    la.fit(loader(left, 5))
    torch.testing.assert_close(la(left), la(right), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------- 6. modes and .grad
def test_train_mode_predicts_without_dropout_and_is_restored():
    model = tiny_gpt2()  # GPT-2 has dropout 0.1 in train mode
    b = random_batch(5, 6, 3, "right")
    la = lora_laplace(model, "kron", include_extra_params=True)
    la.fit(loader(b, 5))
    expected = la(b)
    H_eval = _H(la).clone()
    model.train()
    la.fit(loader(b, 5))
    torch.testing.assert_close(_H(la), H_eval, rtol=1e-12, atol=1e-12)
    assert model.training and all(m.training for m in model.modules())
    for _ in range(2):
        torch.testing.assert_close(la(b), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            la(b, pred_type="nn", link_approx="mc", n_samples=3, generator=torch.Generator()),
            la(b, pred_type="nn", link_approx="mc", n_samples=3, generator=torch.Generator()),
        )
    assert model.training and all(m.training for m in model.modules())


def test_mixed_modes_are_restored():
    model = tiny_llama()
    model.train()
    frozen_eval = [m for n, m in model.named_modules() if n.endswith("mlp")]
    for m in frozen_eval:
        m.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    la = lora_laplace(model, "diag")
    la.fit(loader(random_batch(4, 5, 3), 4))
    la(random_batch(2, 5, 3))
    assert modes == {n: m.training for n, m in model.named_modules()}


def test_fit_and_predict_leave_grad_alone():
    model = tiny_llama()
    la = lora_laplace(model, "kron")
    grads = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if n in grads:
            p.grad = grads[n].clone()
    b = random_batch(4, 5, 3)
    la.fit(loader(b, 4))
    la(b)
    la(b, pred_type="nn", link_approx="mc", n_samples=2)
    for n, p in model.named_parameters():
        if n in grads:
            assert p.grad is not None and torch.equal(p.grad, grads[n]), n


# ---------------------------------------------------------------------- 7. load_state_dict
def _saved(structure="kron", **kw) -> dict:
    la = lora_laplace(tiny_llama(), structure, **kw)
    la.fit(loader(random_batch(4, 5, 3), 4))
    return la.state_dict()


@pytest.mark.parametrize(
    "saved_kw, load_kw, match",
    [
        ({"kfac_approx": "expand"}, {"kfac_approx": "reduce"}, "kfac_approx"),
        ({"fisher_type": "exact"}, {"fisher_type": "mc"}, "fisher_type"),
    ],
)
def test_load_state_dict_refuses_other_options(saved_kw, load_kw, match):
    state = _saved(**saved_kw)
    la = lora_laplace(tiny_llama(), "kron", **load_kw)
    with pytest.raises(ValueError, match=match):
        la.load_state_dict(state)


def test_load_state_dict_warns_when_the_weights_differ():
    state = _saved("diag")
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_laplace(model, "diag").load_state_dict(state)  # same weights: silent
    perturb_lora_B(model.model, seed=5)
    with pytest.warns(UserWarning, match="differs from the model's current LoRA weights"):
        lora_laplace(model, "diag").load_state_dict(state)


def test_tensor_pairs_loader_counts_examples():
    """``(X, y)`` tensor batches (laplace-torch's usual loader) are counted too."""
    b = random_batch(6, 5, 3)
    ids = b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)  # unpadded rows
    ds = TensorDataset(ids, b["labels"])
    model = tiny_llama()
    model.model.config.pad_token_id = 0  # so that unmasked rows can be read
    la = lora_laplace(model, "kron")
    la.fit(DataLoader(ds, batch_size=4, drop_last=True))
    assert la.n_data == 4


# --------------------------------------------------------------------------- review, 2026-12-04
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_temperature_and_sigma_noise_are_scalars_the_posterior_can_take(structure):
    """A temperature vector would scale the curvature's columns (full: an asymmetric
    precision, a vector evidence); sigma_noise != 1 would divide a classification
    posterior's curvature by σ². Both refused, the old value kept."""
    la = lora_laplace(tiny_llama(), structure)
    la.fit(loader(random_batch(4, 5, 3), 2))
    with pytest.raises(ValueError, match="temperature must be one number"):
        la.temperature = torch.full((la.n_params,), 2.0)
    with pytest.raises(ValueError, match="sigma_noise"):
        la.sigma_noise = 2.0
    assert la.temperature == 1 and float(la.sigma_noise) == 1.0
    la.temperature = torch.tensor(2.0)
    la.sigma_noise = 1.0
    assert la.log_marginal_likelihood().ndim == 0


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
@pytest.mark.parametrize("method", ["predictive_samples", "functional_samples"])
def test_glm_sample_counts_are_checked(method, n):
    la = lora_laplace(tiny_llama(), "kron")
    b = random_batch(4, 5, 3)
    la.fit(loader(b, 2))
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        getattr(la, method)(b, n_samples=n)
    assert getattr(la, method)(b, n_samples=3).shape == (3, 4, 3)


def test_predictions_are_detached_after_a_users_marglik_loop():
    """laplace-torch's README loop leaves a prior with a graph; predictions stay detached."""
    la = lora_laplace(tiny_llama(), "diag")
    b = random_batch(4, 5, 3)
    la.fit(loader(b, 2))
    log_prior = torch.zeros(1, requires_grad=True)
    la.log_marginal_likelihood(log_prior.exp())
    for link in ("probit", "mc"):
        assert not la(b, link_approx=link).requires_grad
    f_mu, f_var = la.predictive_moments(b)
    assert not f_mu.requires_grad and not f_var.requires_grad


def test_incremental_low_rank_fit_warns():
    model = tiny_llama()
    b = random_batch(8, 5, 3)
    la = lora_laplace(model, "kron", factor_rank=1, rank_threshold=2)
    la.fit(loader(b, 4))
    with pytest.warns(RuntimeWarning, match=r"override=False\) with low-rank"):
        la.fit(loader(b, 4), override=False)
    dense = lora_laplace(model, "kron")
    dense.fit(loader(b, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense.fit(loader(b, 4), override=False)


def test_last_token_wrapper_around_a_classifier_is_named():
    peft_model = tiny_gpt2().model
    wrapper = LastTokenChoiceLM(peft_model, [0, 1])
    with pytest.raises(ValueError, match="Wrap it in SequenceClassifier"):
        wrapper(random_batch(4, 5, 3))


def test_an_inactive_adapter_is_named():
    """A posterior for adapter 'b' while 'a' is active (or fitted on 'a' and predicted after
    set_adapter('b')) names the adapter and set_adapter."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).double()
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    peft_model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    model = LastTokenChoiceLM(peft_model, TARGET_IDS).eval()
    b = random_batch(4, 5, 3)
    with pytest.raises(RuntimeError, match=r"adapter\(s\) \['b'\] are not active.*set_adapter"):
        lora_laplace(model, "kron", adapter_name="b").fit(loader(b, 2))
    la = lora_laplace(model, "kron")
    la.fit(loader(b, 2))
    peft_model.set_adapter("b")
    with pytest.raises(RuntimeError, match=r"\['a'\] are not active"):
        la(b)


def test_glm_samples_are_independent_per_example_and_take_singular_covariances():
    """Each example gets its own draws (laplace-torch shared one z over the batch), with the
    right moments, and a row whose logits do not depend on the adapters (covariance 0)
    samples its mean instead of failing in a Cholesky factorisation."""
    la = lora_laplace(tiny_llama(), "full")
    b = random_batch(4, 5, 3)
    la.fit(loader(b, 2))
    gen = torch.Generator().manual_seed(0)
    f_mu, f_var = la.predictive_moments(b)
    f_var[1] = 0.0  # a row that does not depend on the adapters
    draws = la._glm_functional_samples(f_mu, f_var, 20000, generator=gen)
    z0 = (draws[:, 0, 0] - f_mu[0, 0]) / f_var[0, 0, 0].sqrt()
    z2 = (draws[:, 2, 0] - f_mu[2, 0]) / f_var[2, 0, 0].sqrt()
    assert abs(float((z0 * z2).mean())) < 0.05  # independent across examples
    centred = draws - f_mu
    cov = torch.einsum("sbi,sbj->bij", centred, centred) / draws.shape[0]
    torch.testing.assert_close(cov, f_var, atol=0.05 * float(f_var.abs().max()), rtol=0.1)
    torch.testing.assert_close(draws[:, 1], f_mu[1].expand(20000, 3))
    assert la.predictive_samples(b, n_samples=4).shape == (4, 4, 3)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_prior_mean_must_be_finite(value):
    with pytest.raises(ValueError, match="prior_mean must be finite"):
        lora_laplace(tiny_llama(), "kron", prior_mean=value)
    la = lora_laplace(tiny_llama(), "diag")
    with pytest.raises(ValueError, match="prior_mean must be finite"):
        la.prior_mean = torch.full((la.n_params,), value)
    assert float(la.prior_mean.abs().max()) == 0.0
