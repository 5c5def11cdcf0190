"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from laplace.curvature import AsdlGGN
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from laplace_lora_ext import LastTokenChoiceLM
from tests.cases import make_case
from tests.models import (
    loader,
    random_batch,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_config,
    tiny_roberta,
)


def make(model, structure="kron", likelihood="classification", **kw):
    return Laplace(model, likelihood, subset_of_weights="lora", hessian_structure=structure, **kw)


def test_model_without_lora():
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=20,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        make(LastTokenChoiceLM(base, [1, 2]))


@pytest.mark.parametrize("likelihood", ["regression", "reward_modeling"])
def test_unsupported_likelihood(likelihood):
    with pytest.raises(ValueError, match="classification"):
        make(tiny_llama(), likelihood=likelihood)


def test_empty_loader():
    la = make(tiny_llama())
    with pytest.raises(ValueError, match="empty"):
        la.fit(DataLoader([], batch_size=2))


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_empty_batch_is_a_clear_error_everywhere(structure):
    b = random_batch(6, 5, 3, "left")
    la = make(tiny_llama(), structure)
    la.fit(loader(b, 3))
    empty = {k: v[:0] for k, v in b.items()}
    for call in (
        lambda: la(empty, link_approx="mc"),
        lambda: la(empty["input_ids"]),
        lambda: la(empty, pred_type="nn", link_approx="mc", n_samples=2),
        lambda: la.predictive_samples(empty, n_samples=2),
        lambda: la.optimize_prior_precision(
            method="gridsearch", val_loader=DataLoader([empty], batch_size=None), grid_size=2
        ),
    ):
        with pytest.raises(ValueError, match="no examples"):
            call()


def test_gridsearch_on_an_empty_val_loader_is_named_and_keeps_the_prior():
    la = make(tiny_llama())
    la.fit(loader(random_batch(4, 5, 3), 4))
    before = la.prior_precision.clone()
    with pytest.raises(ValueError, match="val_loader that yielded no batches"):
        la.optimize_prior_precision(method="gridsearch", val_loader=[], grid_size=2)
    assert torch.equal(la.prior_precision, before)


@pytest.mark.parametrize(
    "method, kwargs",
    [
        (None, {"grid_size": 5}),
        ("marglik", {"log_prior_prec_min": -2}),
        ("lora_marglik", {"log_prior_prec_base": 2.0}),
        ("gridsearch", {"lr": 0.5}),
        ("gridsearch", {"init_prior_prec": torch.full((2,), 3.0)}),
        ("linearised", {"lr": 0.5}),
        ("gridsearch", {"n_steps": 7}),
    ],
)
def test_search_options_the_method_does_not_use_are_named(method, kwargs):
    la = make(tiny_llama())
    la.fit(loader(random_batch(4, 5, 3), 4))
    before = la.prior_precision.clone()
    val = {"val_loader": loader(random_batch(4, 5, 3), 4)} if method == "gridsearch" else {}
    with pytest.raises(ValueError, match=f"does not use \\['{next(iter(kwargs))}'\\]"):
        la.optimize_prior_precision(method=method, **kwargs, **val)
    assert torch.equal(la.prior_precision, before)


def test_search_options_at_their_defaults_or_used_are_accepted():
    la = make(tiny_llama())
    la.fit(loader(random_batch(4, 5, 3), 4))
    val = loader(random_batch(4, 5, 3), 4)
    la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=3, lr=1e-1)
    la.optimize_prior_precision(method="lora_marglik", lr=0.2, grid_size=100)


def test_labels_out_of_range():
    b = random_batch(4, 5, 3, "left")
    b["labels"][1] = 3
    with pytest.raises(ValueError, match="out of range"):
        make(tiny_llama()).fit(loader(b, 4))


def test_float_labels():
    b = random_batch(4, 5, 3, "left")
    b["labels"] = b["labels"].double()
    with pytest.raises(TypeError, match="integer"):
        make(tiny_llama()).fit(loader(b, 4))


def test_missing_labels_key():
    b = random_batch(4, 5, 3, "left")
    with pytest.raises(ValueError, match="dict_key_y"):
        make(tiny_llama(), dict_key_y="label").fit(loader(b, 4))


def _bad_labels(kind: str) -> dict[str, torch.Tensor]:
    b = random_batch(4, 5, 3, "left")
    if kind == "per_token":  # labels as for language modelling, one per token
        b["labels"] = torch.randint(0, 3, (4, 5))
    elif kind == "ignore_index":
        b["labels"][2] = -100
    else:
        b["labels"] = b["labels"].float()
    return b


_LABEL_ERRORS = {
    "per_token": (ValueError, r"shape \(4, 5\) for a batch of 4 .*LastTokenChoiceLM"),
    "ignore_index": (ValueError, "out of range.*ignore index"),
    "float": (TypeError, "integer class indices"),
}


@pytest.mark.parametrize("kind", list(_LABEL_ERRORS))
def test_bad_labels_are_named_by_fit(kind):
    exc, match = _LABEL_ERRORS[kind]
    with pytest.raises(exc, match=match):
        make(tiny_llama()).fit(loader(_bad_labels(kind), 4))


@pytest.mark.parametrize("kind", list(_LABEL_ERRORS))
def test_bad_validation_labels_are_named_and_keep_the_prior(kind):
    """Before, gridsearch indexed probabilities with them (an IndexError from torch, or
    float labels silently truncated)."""
    la = make(tiny_llama())
    la.fit(loader(random_batch(4, 5, 3), 4))
    before = la.prior_precision.clone()
    exc, match = _LABEL_ERRORS[kind]
    with pytest.raises(exc, match=match):
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(_bad_labels(kind), 4), grid_size=2
        )
    assert torch.equal(la.prior_precision, before)


@pytest.mark.parametrize("kind", list(_LABEL_ERRORS))
def test_bad_labels_are_named_by_evaluate(kind):
    from laplace_lora_ext import evaluate

    la = make(tiny_llama())
    la.fit(loader(random_batch(4, 5, 3), 4))
    exc, match = _LABEL_ERRORS[kind]
    with pytest.raises(exc, match=match):
        evaluate(la, loader(_bad_labels(kind), 4), n_samples=2, progress_bar=False)


def test_labels_shaped_one_per_example_are_accepted():
    """``(B, 1)`` labels hold one class per example: the same posterior as ``(B,)``."""
    b = random_batch(4, 5, 3)
    flat = make(tiny_llama())
    flat.fit(loader(b, 4))
    column = make(tiny_llama())
    column.fit(loader({**b, "labels": b["labels"][:, None]}, 4))
    assert torch.equal(flat.loss, column.loss)
    assert torch.allclose(flat.log_marginal_likelihood(), column.log_marginal_likelihood())


@pytest.mark.parametrize(
    "structure, kwargs, exc, match",
    [
        ("diag", {"kfac_approx": "reduce"}, ValueError, "only apply to hessian_structure='kron'"),
        ("full", {"factor_rank": 8}, ValueError, "only apply"),
        ("kron", {"kfac_approx": "mean"}, ValueError, "kfac_approx"),
        ("kron", {"fisher_type": "hessian"}, ValueError, "fisher_type"),
        ("kron", {"factor_rank": 0}, ValueError, "factor_rank"),
        ("kron", {"backend": AsdlGGN}, ValueError, "backend"),
        ("kron", {"damping": True, "factor_rank": 4}, ValueError, "damping"),
        ("lowrank", {}, ValueError, "hessian_structure='kron' with factor_rank"),
        ("gp", {}, ValueError, "no hessian_structure='gp'"),
        ("diag", {"bogus": 1}, TypeError, "bogus"),
        ("kron", {"backend_kwargs": {"fisher_type": "mc"}}, ValueError, "as keywords"),
        ("kron", {"backend_kwargs": {"factor_rank": 4}}, ValueError, "as keywords"),
        ("diag", {"backend_kwargs": {"targets": ["q_proj"]}}, ValueError, "as keywords"),
        ("full", {"backend_kwargs": {"stochastic": True}}, ValueError, "fisher_type='mc'"),
    ],
)
def test_unsupported_options(structure, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        la = make(tiny_llama(), structure, **kwargs)
        la.fit(loader(random_batch(4, 5, 3), 4))


def test_empty_backend_kwargs_are_accepted():
    la = make(tiny_llama(), "kron", backend_kwargs={})
    la.fit(loader(random_batch(4, 5, 3), 4))
    assert la.fisher_type == "exact"


def test_causal_lm_without_choice_wrapper():
    model = tiny_llama().model  # the PeftModelForCausalLM: logits (B, T, V)
    with pytest.raises(ValueError, match="LastTokenChoiceLM"):
        make(model).fit(loader(random_batch(4, 5, 3), 4))


@pytest.mark.parametrize("batch", ["tuple", "list"])
def test_a_batch_that_is_neither_dict_nor_tensor_names_the_dict_form(batch):
    case = make_case("llama")
    la = make(case.model)
    la.fit(loader(case.batch, 4))
    ids, mask = case.batch["input_ids"], case.batch["attention_mask"]
    bad = (ids, mask) if batch == "tuple" else ids.tolist()
    with pytest.raises(TypeError, match=r"dict batch .*'input_ids': ids, 'attention_mask': mask"):
        la(bad, link_approx="mc")


def _bad_inputs(batch: dict, kind: str) -> dict:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return {
        "float": {"input_ids": ids.float(), "attention_mask": mask},
        "1-D": {"input_ids": ids[0]},
        "mask": {"input_ids": ids, "attention_mask": mask[:, :3]},
        "too large": {"input_ids": ids + 1000, "attention_mask": mask},
        "negative": {"input_ids": ids - 1000, "attention_mask": mask},
        "list ids": {"input_ids": ids.tolist(), "attention_mask": mask},
        "list mask": {"input_ids": ids, "attention_mask": mask.tolist()},
    }[kind]


@pytest.mark.parametrize(
    "kind, exc, match",
    [
        ("float", TypeError, r"integer token ids, got dtype torch.float32; use ids.long\(\)"),
        ("1-D", ValueError, r"\(batch, seq_len\), got shape \(\d+,\).*unsqueeze\(0\)"),
        ("mask", ValueError, r"attention_mask has shape \(\d+, 3\) but input_ids"),
        ("too large", ValueError, r"embedding has 40 tokens \(0..39\).*another model's tokenizer"),
        ("negative", ValueError, r"input_ids range over -\d+\.\."),
        ("list ids", TypeError, r"input_ids must be a torch.Tensor, got list.*return_tensors"),
        ("list mask", TypeError, r"attention_mask must be a torch.Tensor, got list"),
    ],
)
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_bad_input_ids_are_named_before_the_embedding_sees_them(kind, exc, match, model_name):
    case = make_case(model_name)
    la = make(case.model)
    la.fit(loader(case.batch, 4))
    with pytest.raises(exc, match=match):
        la(_bad_inputs(case.batch, kind), link_approx="mc")
    with pytest.raises(exc, match=match):  # the fit's batches go through the same check
        make(case.model).fit([{**_bad_inputs(case.batch, kind), "labels": case.batch["labels"]}])


def test_inputs_embeds_with_a_mismatched_mask_is_named():
    """Before, a wrong-length mask failed inside the model's attention (or, with zeros in
    it, was reported as an all-padding row)."""
    model = tiny_llama()
    batch = random_batch(4, 6, 3, padding="right")
    embeds = model.model.get_input_embeddings()(batch["input_ids"]).detach()
    for mask in (torch.ones(4, 5, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long)):
        with pytest.raises(
            ValueError, match=r"attention_mask has shape \(4, 5\) but inputs_embeds"
        ):
            model({"inputs_embeds": embeds, "attention_mask": mask})
    assert model({"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}).shape == (
        4,
        3,
    )


@pytest.mark.parametrize("name", ["logits_to_keep", "num_logits_to_keep"])
def test_last_token_choice_lm_refuses_logits_to_keep(name):
    model = tiny_llama()
    batch = random_batch(4, 6, 3)
    with pytest.raises(ValueError, match=f"drop {name}=1"):
        model({**batch, name: 1})


@pytest.mark.parametrize(
    "build, limit, pad_id",
    [(tiny_gpt2, 32, 0), (tiny_roberta, 38, 1)],  # RoBERTa's positions start after padding_idx 1
)
def test_sequences_longer_than_the_position_table_are_named(build, limit, pad_id):
    """Before: a bare IndexError (GPT-2) or RuntimeError (RoBERTa) from inside the model."""
    from laplace_lora_ext.inputs import max_positions

    model = build()
    assert max_positions(model) == limit
    make(model).fit(loader(random_batch(4, limit, 2, pad_id=pad_id), 2))
    too_long = random_batch(4, limit + 1, 2, pad_id=pad_id)
    with pytest.raises(
        ValueError, match=f"{limit + 1} tokens .* covers {limit}.*max_length={limit}"
    ):
        make(model).fit(loader(too_long, 2))


def test_rotary_models_have_no_position_limit():
    from laplace_lora_ext.inputs import max_positions

    assert max_positions(tiny_llama()) is None


def test_prediction_options():
    case = make_case("llama")
    la = make(case.model)
    with pytest.raises(AttributeError, match="fit"):
        la(case.batch)
    la.fit(loader(case.batch, 4))
    with pytest.raises(ValueError, match="link_approx"):
        la(case.batch, link_approx="sigmoid")
    with pytest.raises(ValueError, match="nn"):
        la(case.batch, pred_type="nn", link_approx="probit")
    with pytest.raises(ValueError, match="pred_type"):
        la(case.batch, pred_type="gp")


def test_layerwise_prior_of_wrong_length():
    la = make(tiny_llama())
    with pytest.raises(ValueError):
        la.prior_precision = torch.ones(3)


class _NoGradWrapper(torch.nn.Module):
    """A model whose forward cuts the graph: LoRA gradients never arrive."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.no_grad():
            return self.model(x)


def test_missing_lora_gradients_are_an_error_not_a_silent_posterior():
    model = _NoGradWrapper(tiny_llama())
    b = random_batch(4, 5, 3)
    la = make(model)
    with pytest.raises(RuntimeError, match="gradient"):
        la.fit(loader(b, 4))


def test_lora_layers_detached_from_output():
    model = tiny_llama()
    for name, module in model.named_modules():
        if name.endswith("lora_B.default"):
            module.register_forward_hook(lambda m, a, out: out.detach())
    with pytest.raises(RuntimeError, match="gradient"):
        make(model).fit(loader(random_batch(4, 5, 3), 4))


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize(
    "use",
    [
        lambda la: la(random_batch(2, 5, 3)),
        lambda la: la.sample(3),
        lambda la: la.optimize_prior_precision(),
        lambda la: la.log_marginal_likelihood(),
        lambda la: la.log_det_ratio,
        lambda la: la.scatter,
    ],
    ids=["predict", "sample", "prior", "marglik", "log_det_ratio", "scatter"],
)
def test_everything_before_fit_says_fit_first(structure, use):
    la = make(tiny_llama(), structure)
    with pytest.raises(AttributeError, match=r"Run fit\(\) first"):
        use(la)


@pytest.mark.parametrize(
    "structure, prior_structure, match",
    [
        ("kron", "diag", "not supported with hessian_structure='kron'.*'layerwise'"),
        ("diag", "bogus", r"prior_structure must be one of \('scalar', 'layerwise', 'diag'\)"),
    ],
)
def test_marglik_prior_structure_is_checked_before_the_prior_changes(
    structure, prior_structure, match
):
    la = make(tiny_llama(), structure)
    la.fit(loader(random_batch(4, 5, 3), 4))
    before = la.prior_precision.clone()
    with pytest.raises(ValueError, match=match):
        la.optimize_prior_precision(method="marglik", prior_structure=prior_structure)
    assert torch.equal(la.prior_precision, before)


class _NextTokenLogits(torch.nn.Module):
    """laplace-torch's LLM wrapper pattern returning the last token's whole-vocabulary logits."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    def forward(self, data):
        out = self.hf_model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
        return out.logits[:, -1, :]


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_whole_vocabulary_logits_are_refused_naming_last_token_choice_lm(structure):
    from peft import LoraConfig, get_peft_model

    from laplace_lora_ext.wrappers import MAX_VOCABULARY_OUTPUTS

    vocab = MAX_VOCABULARY_OUTPUTS + 1
    config = tiny_llama_config()
    config.vocab_size = vocab
    peft_model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"])
    )
    batch = random_batch(4, 5, 3)
    la = make(_NextTokenLogits(peft_model), structure)
    with pytest.raises(ValueError, match=f"returns {vocab} logits.*LastTokenChoiceLM"):
        la.fit(loader(batch, 4))
    la = make(LastTokenChoiceLM(peft_model, [5, 9, 13]), structure)  # the fix it names
    la.fit(loader(batch, 4))


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("gridsearch", {"grid_size": 0}, "grid_size must be an int >= 1"),
        ("gridsearch", {"grid_size": 2.5}, "grid_size must be an int >= 1"),
        ("marglik", {"n_steps": -5}, "n_steps must be an int >= 1"),
        ("lora_marglik", {"init_prior_prec": 0.0}, "finite number > 0"),
        (None, {"init_prior_prec": torch.ones(4)}, "one prior precision for every tensor"),
    ],
)
def test_bad_search_values_are_named_before_the_search(method, kwargs, match):
    """Before: argmin/logspace errors after a validation pass, a math domain error, a
    tensor-to-scalar error, or a 'did not converge in -5 steps' warning."""
    la = make(tiny_llama())
    la.fit(loader(random_batch(4, 5, 3), 4))
    before = la.prior_precision.clone()
    val = {"val_loader": loader(random_batch(4, 5, 3), 4)} if method == "gridsearch" else {}
    with pytest.raises(ValueError, match=match):
        la.optimize_prior_precision(method=method, **kwargs, **val)
    assert torch.equal(la.prior_precision, before)


def test_training_data_rules_refuse_extra_params_and_the_default_falls_back():
    """With a trainable head in the posterior, the function-space and leave-one-out sums
    were dominated by the head (lora_B's prior 170x too precise, silently)."""
    model = tiny_roberta()
    batch = random_batch(6, 6, 2, pad_id=1)
    la = make(model, include_extra_params=True)
    la.fit(loader(batch, 3))
    for method in ("function_space", "leave_one_out"):
        with pytest.raises(ValueError, match="LoRA matrices only.*include_extra_params"):
            la.optimize_prior_precision(method=method)
    la._training_data_memorised = lambda: True  # the default would take leave_one_out
    with pytest.warns(RuntimeWarning, match="LoRA matrices only.*Using method='lora_marglik'"):
        la.optimize_prior_precision()
    ref = make(model, include_extra_params=True)
    ref.fit(loader(batch, 3))
    ref.optimize_prior_precision(method="lora_marglik")
    assert torch.allclose(la.prior_precision, ref.prior_precision)


def test_the_default_falls_back_on_a_single_memorised_example():
    """Before, the default (which the user did not choose) raised leave_one_out's 'needs
    at least two training examples' where lora_marglik works."""
    la = make(tiny_llama())
    la.fit(loader(random_batch(1, 5, 3), 1))
    la._training_data_memorised = lambda: True
    with pytest.warns(RuntimeWarning, match="at least two training examples.*lora_marglik"):
        la.optimize_prior_precision()
    with pytest.raises(ValueError, match="at least two training examples"):
        la.optimize_prior_precision(method="leave_one_out")
