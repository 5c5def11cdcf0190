"""Drop-in behaviour: registration, params, fit inputs, marglik, predictions, persistence."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace
from torch.utils.data import DataLoader, TensorDataset

from laplace_lora_ext import LoraDiagLaplace, LoraFullLaplace, LoraKronLaplace
from tests.cases import make_case
from tests.models import TARGET_IDS, loader, random_batch, tiny_llama
from tests.models import lora_laplace as make


def test_registration_returns_ours_and_keeps_laplace_torch():
    model = tiny_llama()
    assert type(make(model, "kron")) is LoraKronLaplace
    assert type(make(model, "diag")) is LoraDiagLaplace
    assert type(make(model, "full")) is LoraFullLaplace
    lin = torch.nn.Linear(3, 2)
    assert type(Laplace(lin, "classification", "all", "kron")) is KronLaplace
    assert type(Laplace(lin, "classification", "all", "diag")) is DiagLaplace
    assert type(Laplace(lin, "classification", "all", "full")) is FullLaplace
    keys = [c._key for c in (LoraKronLaplace, LoraDiagLaplace, LoraFullLaplace)]
    assert len(set(keys)) == 3


def test_params_are_lora_matrices_in_module_order():
    model = tiny_llama()
    la = make(model)
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    assert [id(p) for p in la.params] == [id(dict(model.named_parameters())[n]) for n in names]
    assert la.n_params == sum(p.numel() for p in la.params)
    assert la.n_layers == len(names) == 8


def test_extra_params_add_the_modules_to_save_head():
    case = make_case("gpt2")
    plain = make(case.model)
    extra = make(case.model, include_extra_params=True)
    assert len(extra.params) == len(plain.params) + 1  # GPT-2 score head: weight, no bias
    assert extra.lora_param_names[-1].endswith("modules_to_save.default.weight")
    case = make_case("roberta")
    extra = make(case.model, include_extra_params=True)
    # RoBERTa head: dense (weight, bias) and out_proj (weight, bias)
    assert len(extra.params) == len(make(case.model).params) + 4


def _gpt2_with_bias(bias: str):
    """tiny GPT-2 sequence classifier with PEFT's ``LoraConfig(bias=bias)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=32, num_labels=3,
        pad_token_id=0,
    )  # fmt: skip
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
        task_type="SEQ_CLS", bias=bias,
    )  # fmt: skip
    return get_peft_model(GPT2ForSequenceClassification(config).double(), lora)


def test_trainable_parameters_left_out_of_the_posterior_are_named():
    case = make_case("gpt2")  # its score head is trainable (modules_to_save)
    with pytest.warns(
        UserWarning, match=r"1 other trainable .*score\.mod.*include_extra_params"
    ) as rec:
        make(case.model)
    assert rec[0].filename.endswith("tests/models.py")  # the caller's line, not laplace's
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make(case.model, include_extra_params=True)  # the head is covered: silent
        make(tiny_llama())  # LoRA matrices only trainable: silent
        make(tiny_llama(), lora_modules=r"layers\.1\.")  # adapters left out on purpose
    # PEFT's bias="lora_only" trains the LoRA layers' base biases: named, with the option
    model = _gpt2_with_bias("lora_only")
    with pytest.warns(UserWarning, match=r"3 other .*c_attn\.base_layer\.bias.*bias='none'") as rec:
        make(model)
    assert "include_extra_params" not in str(rec[0].message)  # it would refuse these biases
    with pytest.raises(ValueError, match=r"Conv1D.*bias='all' or 'lora_only'"):
        make(model, include_extra_params=True)
    # bias="all": a LayerNorm's bias is named (this used to crash comparing tensors)
    with pytest.raises(ValueError, match=r"\['bias'\] of .*ln_1' \(LayerNorm\)"):
        make(_gpt2_with_bias("all"), include_extra_params=True)


def test_a_trainable_bias_with_a_frozen_linear_weight_names_peft_bias_option():
    model = tiny_llama()
    layer = model.model.base_model.model.lm_head
    layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"lm_head' has a trainable bias but a frozen weight"):
        make(model, include_extra_params=True)


def test_extra_params_leave_out_the_lora_matrices_lora_modules_leaves_out():
    model = make_case("gpt2").model
    la = make(model, include_extra_params=True, lora_modules=r"h\.1\.")
    assert [t.kind for t in la.lora_targets] == ["lora_A", "lora_B", "extra"]
    assert "h.1." in la.lora_targets[0].name


def test_works_on_peft_model_itself_and_on_wrapper():
    case = make_case("roberta")
    la = make(case.model)  # PeftModelForSequenceClassification itself
    la.fit(loader(case.batch, 4))
    probs = la(case.batch)
    assert probs.shape == (7, 2) and torch.allclose(probs.sum(-1), torch.ones(7))


def test_fit_with_tensor_pairs_and_progress_bar(capsys):
    """(X, y) tensor pairs of unpadded ids: the wrapper reads them once the model's config
    names its pad token (without it, unmasked rows might be padded and are refused)."""
    model = tiny_llama()
    b = random_batch(6, 5, 3, "left")
    ids = b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)  # no padding left
    ds = TensorDataset(ids, b["labels"])
    la = make(model)
    with pytest.raises(ValueError, match="names no pad_token_id"):
        la.fit(DataLoader(ds, batch_size=4))
    model.model.config.pad_token_id = 0
    la.fit(DataLoader(ds, batch_size=4), progress_bar=True)
    assert "[Computing Hessian]" in capsys.readouterr().err
    assert la.n_data == 6 and la.n_outputs == 3
    assert la(ids).shape == (6, 3)
    masked = make(model)
    masked.fit(loader({**b, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, 4))
    torch.testing.assert_close(masked.H_facs.to_matrix(), la.H_facs.to_matrix())


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_marglik_prior_optimisation_scalar_and_layerwise(structure):
    case = make_case("llama")
    la = make(case.model, structure)
    la.fit(loader(case.batch, 4))
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(method="marglik", n_steps=50)
    assert la.prior_precision.shape == (1,)
    assert la.log_marginal_likelihood().item() >= before
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=50)
    assert la.prior_precision.shape == (la.n_layers,)
    P = la.posterior_precision
    assert torch.isfinite(la.log_marginal_likelihood())
    assert P is not None


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("link", ["probit", "mc", "mc_indep", "bridge", "bridge_norm"])
def test_predictions_are_distributions(structure, link):
    case = make_case("llama")
    la = make(case.model, structure, prior_precision=2.0)
    la.fit(loader(case.batch, 4))
    gen = torch.Generator().manual_seed(0)
    p = la(case.batch, link_approx=link, n_samples=50, generator=gen)
    assert p.shape == (7, 3)
    assert torch.allclose(p.sum(-1), torch.ones(7)) and (p >= 0).all()


def test_mc_is_seeded_and_nn_sampling_restores_weights():
    case = make_case("llama")
    la = make(case.model, prior_precision=5.0)
    la.fit(loader(case.batch, 4))
    a = la(case.batch, link_approx="mc", generator=torch.Generator().manual_seed(3))
    b = la(case.batch, link_approx="mc", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    before = [p.detach().clone() for p in la.params]
    p_nn = la(case.batch, pred_type="nn", link_approx="mc", n_samples=20)
    assert p_nn.shape == (7, 3) and torch.allclose(p_nn.sum(-1), torch.ones(7))
    assert all(torch.equal(x, p) for x, p in zip(before, la.params, strict=True))


@pytest.mark.parametrize(
    "structure, kwargs",
    [("kron", {}), ("kron", {"factor_rank": 1, "rank_threshold": 2}), ("diag", {}), ("full", {})],
)
def test_state_dict_round_trip(structure, kwargs):
    """Also low-rank factors load with ``torch.load(weights_only=True)`` (saved as plain
    dicts); a file holding the factor objects themselves (older saves) still loads."""
    case = make_case("llama")
    la = make(case.model, structure, **kwargs)
    la.fit(loader(case.batch, 4))
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=20)
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    la2 = make(case.model, structure, **kwargs)
    la2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.allclose(la2.log_marginal_likelihood(), la.log_marginal_likelihood())
    assert torch.allclose(la2(case.batch), la(case.batch))
    if kwargs:
        old_format = {**la.state_dict(), "H": la.H_facs.kfacs}
        la3 = make(case.model, structure, **kwargs)
        la3.load_state_dict(old_format)
        assert torch.allclose(la3(case.batch), la(case.batch))


def test_state_dict_rejects_other_adapter_layout():
    case = make_case("llama")
    la = make(case.model)
    la.fit(loader(case.batch, 4))
    other = make(tiny_llama(lm_head=True))
    with pytest.raises(ValueError, match="different.*first difference.*same LoraConfig"):
        other.load_state_dict(la.state_dict())


def test_state_dict_under_another_wrapper_names_the_prefix():
    case = make_case("roberta")  # SequenceClassifier around the PeftModel
    la = make(case.model, include_extra_params=case.include_extra_params)
    la.fit(loader(case.batch, 4))
    bare = make(case.model.model, include_extra_params=case.include_extra_params)
    with pytest.raises(ValueError, match="Only the name prefix differs.*another wrapper"):
        bare.load_state_dict(la.state_dict())


def test_posterior_precision_to_matrix_is_symmetric_positive_definite():
    case = make_case("llama")
    la = make(case.model)
    la.fit(loader(case.batch, 4))
    P = la.posterior_precision.to_matrix()
    assert torch.allclose(P, P.T)
    assert torch.linalg.eigvalsh(P).min() > 0
    assert la.H.to_matrix().shape == (la.n_params, la.n_params)


def test_last_token_choice_lm_left_right_padding_agree():
    model = tiny_llama()
    left = random_batch(5, 6, 3, "left", seed=4)
    # build the same sequences right-padded
    right = {k: v.clone() for k, v in left.items()}
    for i in range(5):
        m = left["attention_mask"][i].bool()
        L = int(m.sum())
        right["input_ids"][i] = 0
        right["input_ids"][i, :L] = left["input_ids"][i, m]
        right["attention_mask"][i] = 0
        right["attention_mask"][i, :L] = 1
    a, b = model(left), model(right)
    assert torch.allclose(a, b, atol=1e-10)
    # equals slicing the full logits of each unpadded sequence
    for i in range(5):
        m = left["attention_mask"][i].bool()
        ids = left["input_ids"][i, m].unsqueeze(0)
        full = model.model(input_ids=ids).logits[0, -1, TARGET_IDS]
        assert torch.allclose(a[i], full, atol=1e-10)


def test_lora_modules_selects_layers_by_name():
    model = tiny_llama(lm_head=True)
    la = make(model, lora_modules=r"layers\.1\.")
    assert len(la.params) == 4 and all("layers.1." in n for n in la.lora_param_names)
    assert len(make(model, lora_modules="lm_head").params) == 2
    with pytest.raises(ValueError, match="matches"):
        make(model, lora_modules="nothing_like_this")


def test_frozen_adapter_still_gets_a_posterior():
    case = make_case("llama")
    for n, p in case.model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)
    la = make(case.model)
    la.fit(loader(case.batch, 4))
    assert la(case.batch).shape == (7, 3)
    assert not any(p.requires_grad for p in la.params)  # restored afterwards
    ref = make(make_case("llama").model)
    ref.fit(loader(case.batch, 4))
    assert torch.allclose(la.H_facs.to_matrix(), ref.H_facs.to_matrix())


def test_state_dict_rejects_other_factor_rank():
    case = make_case("llama")
    la = make(case.model, factor_rank=4, rank_threshold=4)
    la.fit(loader(case.batch, 4))
    with pytest.raises(ValueError, match="factor_rank"):
        make(case.model).load_state_dict(la.state_dict())


def test_state_dict_rejects_other_damping_and_keeps_the_posterior():
    """``damping`` changes the decomposition: before, a posterior saved without it loaded
    silently into a damped object and predicted differently."""
    case = make_case("llama")
    la = make(case.model)
    la.fit(loader(case.batch, 4))
    damped = make(case.model, damping=True)
    damped.fit(loader(case.batch, 4))
    before = damped(case.batch)
    with pytest.raises(
        ValueError, match="damping=False but this object was built with damping=True"
    ):
        damped.load_state_dict(la.state_dict())
    assert torch.equal(damped(case.batch), before)


@pytest.mark.parametrize("saved, loading", [("kron", "diag"), ("diag", "full"), ("full", "kron")])
def test_state_dict_names_another_hessian_structure(saved, loading):
    case = make_case("llama")
    la = make(case.model, saved)
    la.fit(loader(case.batch, 4))
    with pytest.raises(
        ValueError, match=f"hessian_structure='{saved}' but this object is '{loading}'"
    ):
        make(case.model, loading).load_state_dict(la.state_dict())


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_override_false_adds_data_exactly(structure):
    case = make_case("llama")
    b = case.batch
    first = {k: v[:4] for k, v in b.items()}
    second = {k: v[4:] for k, v in b.items()}
    online = make(case.model, structure)
    online.fit(loader(first, 2))
    online.fit(loader(second, 2), override=False)
    full = make(case.model, structure)
    full.fit(loader(b, 3))
    H = (lambda la: la.H_facs.to_matrix()) if structure == "kron" else (lambda la: la.H)
    assert (H(online) - H(full)).norm() < 1e-10 * H(full).norm()
    assert online.n_data == full.n_data == 7
    assert torch.allclose(online.log_marginal_likelihood(), full.log_marginal_likelihood())


def test_changing_the_temperature_refreshes_the_full_posterior():
    """``full`` caches its covariance factor; before, a new temperature was ignored by
    ``la(x)`` and ``posterior_covariance`` once they had run (relative error 0.24)."""
    case = make_case("llama")
    la = make(case.model, "full")
    la.fit(loader(case.batch, 4))
    la(case.batch)
    la.temperature = 4.0
    ref = make(case.model, "full", temperature=4.0)
    ref.fit(loader(case.batch, 4))
    torch.testing.assert_close(la.posterior_covariance, ref.posterior_covariance)
    torch.testing.assert_close(
        la.predictive_moments(case.batch), ref.predictive_moments(case.batch)
    )


def test_load_state_dict_forgets_the_training_data_of_an_earlier_fit():
    """The training-data rules read fit()'s loaders: after a load they belonged to another
    posterior (the function-space prior came from the wrong data, silently)."""
    case = make_case("llama")
    la = make(case.model)
    la.fit(loader(random_batch(6, 6, 3, seed=1), 3))
    saved = make(case.model)
    saved.fit(loader(case.batch, 4))
    la.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="call la.fit"):
        la.optimize_prior_precision(method="function_space")


def test_a_posterior_loaded_for_other_outputs_is_refused_at_prediction():
    """A 3-class posterior loaded into a 4-choice wrapper of the same adapter predicted
    over 4 outputs with the 3-output curvature, silently."""
    from laplace_lora_ext import LastTokenChoiceLM
    from tests.models import TARGET_IDS

    case = make_case("llama")
    la = make(case.model)
    la.fit(loader(case.batch, 4))
    wider = make(LastTokenChoiceLM(case.model.model, [*TARGET_IDS, 17]))
    wider.load_state_dict(la.state_dict())
    with pytest.raises(
        ValueError, match="fitted on a model with 3 outputs, but the model now returns 4"
    ):
        wider(case.batch, link_approx="mc")
