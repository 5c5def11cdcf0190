"""Drop-in use from laplace-torch code (issue 14, sections 1 and 3): the model call
convention, ``pred_type="nn"`` state, keywords honoured or refused, stock backends,
construction-time validation and the laplace-torch compatibility layer."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification

from laplace_lora_ext import compat
from laplace_lora_ext.inputs import forward_logits, is_hf_model
from laplace_lora_ext.testing import kfac_reference
from tests.cases import make_case
from tests.models import TARGET_IDS, loader, lora_laplace, random_batch, tiny_llama


@pytest.mark.parametrize(
    "structure, kwargs, match",
    [
        ("kron", {"kfac_approx": "mean"}, "kfac_approx must be one of"),
        ("kron", {"fisher_type": "hessian"}, "fisher_type must be one of"),
        ("diag", {"fisher_type": "gauss"}, "fisher_type must be one of"),
        ("full", {"fisher_type": None}, "fisher_type must be one of"),
        ("kron", {"mc_samples": 0}, "mc_samples"),
        ("kron", {"factor_rank": 2.5}, "factor_rank"),
        ("kron", {"rank_threshold": -1}, "rank_threshold"),
        ("kron", {"seed": "zero"}, "seed"),
    ],
)
def test_unknown_options_fail_at_construction(structure, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_laplace(tiny_llama(), structure, **kwargs)  # no fit needed


# --------------------------------------------------------------------------- model call


class DocWrapper(torch.nn.Module):
    """laplace-torch's documented HuggingFace pattern: ``forward(self, data)``."""

    def __init__(self, hf_model, target_ids=None):
        super().__init__()
        self.hf_model = hf_model
        self.target_ids = target_ids
        self.seen_keys: set[str] = set()

    def forward(self, data, temperature: float = 1.0):
        self.seen_keys.update(data)
        logits = self.hf_model(
            input_ids=data["input_ids"], attention_mask=data["attention_mask"]
        ).logits
        if self.target_ids is not None:  # causal LM, left padding: the last position
            logits = logits[:, -1, self.target_ids]
        return logits / temperature


class TakesIds(torch.nn.Module):
    """A custom wrapper whose ``forward`` takes the inputs as tensors (an ``AutoModel``'s)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids, attention_mask=None):
        return self.hf_model(input_ids=input_ids, attention_mask=attention_mask).logits


def doc_and_own(name: str):
    """The same tiny model as laplace-torch's documented wrapper and as our own wrapper."""
    case = make_case(name)
    if name == "llama":
        # no padding: the documented wrapper passes no position_ids, LastTokenChoiceLM
        # derives them from the mask (same logits only up to RoPE's float32 tables)
        case.batch["attention_mask"] = torch.ones_like(case.batch["attention_mask"])
    hf = case.model.model
    doc = DocWrapper(hf, TARGET_IDS if name == "llama" else None)
    return doc, case


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_documented_wrapper_equals_own_wrapper(name, structure):
    doc, case = doc_and_own(name)
    results = []
    for model in (doc, case.model):
        la = lora_laplace(model, structure, include_extra_params=case.include_extra_params)
        la.fit(loader(case.batch, 4))
        lml = la.log_marginal_likelihood(torch.tensor(0.7)).item()
        la.optimize_prior_precision(method="marglik", n_steps=5)
        probs = la(case.batch)
        gen = torch.Generator().manual_seed(0)
        probs_nn = la(case.batch, pred_type="nn", link_approx="mc", n_samples=3, generator=gen)
        results.append((la.n_params, lml, la.prior_precision.clone(), probs, probs_nn))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1:], results[1][1:], strict=True):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-8, atol=1e-10)
    assert "labels" in doc.seen_keys  # the whole batch, as laplace-torch passes it


def test_hf_models_are_detected_by_type():
    case = make_case("gpt2")
    peft_model = case.model.model
    assert is_hf_model(peft_model) and is_hf_model(peft_model.get_base_model())
    assert is_hf_model(torch.nn.DataParallel(peft_model))
    assert not is_hf_model(case.model) and not is_hf_model(DocWrapper(peft_model))
    around_custom = PeftModel(DocWrapper(tiny_gpt2_base()), _recipe_lora())
    assert not is_hf_model(around_custom) and not is_hf_model(nn.DataParallel(around_custom))


def tiny_gpt2_base() -> torch.nn.Module:
    """A bare tiny GPT-2 sequence classifier (no LoRA), float64."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=32, num_labels=3,
        pad_token_id=0, attn_implementation="eager", initializer_range=0.5,
    )  # fmt: skip
    return GPT2ForSequenceClassification(config).double()


def _recipe_lora() -> LoraConfig:
    """laplace-torch's LoRA recipe: no ``task_type``, so PEFT builds a plain ``PeftModel``."""
    return LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_laplace_torch_lora_recipe_peft_around_custom_module(structure):
    """laplace-torch's HF example applies ``get_peft_model`` to its ``forward(self, data)``
    wrapper; the resulting ``PeftModel`` passes the dict batch on to that wrapper, so it must
    be called as ``model(batch)`` (it crashed with ``unexpected keyword 'input_ids'``). The
    posterior must equal the one on the wrapper itself (the same modules, LoRA included)."""
    recipe = get_peft_model(DocWrapper(tiny_gpt2_base()), _recipe_lora())
    for name, p in recipe.named_parameters():
        if "lora_B" in name:
            p.data.normal_(generator=torch.Generator().manual_seed(1))
    batch = random_batch(7, 6, 3, "right", pad_id=0)
    results = []
    for model in (recipe, recipe.get_base_model()):
        la = lora_laplace(model, structure)
        la.fit(loader(batch, 4))
        results.append((la.log_marginal_likelihood(torch.tensor(0.7)), la(batch)))
    assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)
    assert "labels" in recipe.get_base_model().seen_keys  # the whole batch, as laplace-torch


def test_peft_around_custom_module_with_keyword_forward_gets_the_inputs_as_keywords():
    """``forward(self, input_ids, attention_mask=None)``, the usual wrapper of an
    ``AutoModel``: PEFT passes ``model(**inputs)`` on to it, as for an HF model."""
    model = get_peft_model(TakesIds(tiny_gpt2_base()), _recipe_lora())
    batch = random_batch(4, 6, 3, "right", pad_id=0)
    results = []
    for m in (model, DocWrapper(model.get_base_model().hf_model)):  # the same LoRA modules
        la = lora_laplace(m, "kron")
        la.fit(loader(batch, 2))
        results.append((la.log_marginal_likelihood(torch.tensor(0.7)), la(batch)))
    assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


def test_batches_move_to_the_models_device_in_both_forms():
    """A dict batch and an ``(X, y)`` pair with a dict ``X`` move alike ('meta' stands in for
    an accelerator); on the right device the batch is passed on as it is."""
    from laplace_lora_ext.inputs import split_batch, to_device

    ids, y = torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1])
    meta = torch.device("meta")
    batch = {"input_ids": ids, "attention_mask": ids, "labels": y}
    x1, y1 = split_batch(batch, "labels", meta)
    x2, y2 = split_batch(({"input_ids": ids, "attention_mask": ids}, y), "labels", meta)
    for x, label in ((x1, y1), (x2, y2)):
        assert {v.device for v in x.values()} == {meta} and label.device == meta
    assert to_device(batch, "cpu") is batch and to_device(batch, None) is batch
    assert to_device("text", meta) == "text"


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_prediction_moves_its_input_to_the_models_device(monkeypatch, pred_type):
    """``la(x)`` moves ``x`` as ``fit`` moves its batches (it reached the model on the
    caller's device, a deep HF device-mismatch error on an accelerator)."""
    from laplace_lora_ext.posterior import mixin, weight_sampling

    case = make_case("llama")
    la = lora_laplace(case.model)
    la.fit(loader(case.batch, 4))
    seen = []

    def spy(backend_or_model, x, *args, **kwargs):
        seen.append({v.device for v in x.values() if torch.is_tensor(v)})
        raise RuntimeError("stop")

    monkeypatch.setattr(mixin, "logit_jacobian_blocks", spy)
    monkeypatch.setattr(weight_sampling, "forward_logits", spy)
    monkeypatch.setattr(la, "sample", lambda n, generator=None: la.mean.expand(n, -1))
    monkeypatch.setattr(type(la), "_device", property(lambda self: torch.device("meta")))
    with pytest.raises(RuntimeError, match="stop"):
        la(case.batch, pred_type=pred_type, link_approx="mc", n_samples=2)
    assert seen == [{torch.device("meta")}]


def test_keyword_only_forward_gets_a_clear_error():
    class KwargsOnly(torch.nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, **inputs):
            return self.hf(**inputs).logits

    case = make_case("gpt2")
    la = lora_laplace(KwargsOnly(case.model.model))
    with pytest.raises(TypeError, match=r"model\(batch\)"):
        la.fit(loader(case.batch, 4))


def test_wrapper_passing_the_labels_to_a_causal_lm_gets_a_clear_error():
    """``forward(self, data): return self.m(**data).logits[:, -1, ids]`` hands the batch's
    labels to the HF model, which computes its own LM loss and failed 27 frames deep
    ("Expected input batch_size (48) to match target batch_size (8)")."""

    class PassesEverything(torch.nn.Module):
        def __init__(self, causal_lm):
            super().__init__()
            self.m = causal_lm

        def forward(self, data):
            return self.m(**data).logits[:, -1, TARGET_IDS]

    model = PassesEverything(tiny_llama(seed=1).model).eval()
    batch = random_batch(n=8, seed=1)
    la = lora_laplace(model)
    with pytest.raises(ValueError, match=r"passed the batch's 'labels' on to the HF model"):
        la.fit(loader(batch, 4))


def test_forward_taking_input_ids_first_gets_a_clear_error():
    """``forward(self, input_ids, attention_mask=None)`` binds the dict batch to
    ``input_ids``; before, the model failed 36 frames deep (``'dict' object has no
    attribute 'ne'`` on RoBERTa)."""
    case = make_case("gpt2")
    la = lora_laplace(TakesIds(case.model.model))
    with pytest.raises(TypeError, match=r"first argument 'input_ids' takes a tensor"):
        la.fit(loader(case.batch, 4))
    la.fit([(case.batch["input_ids"], case.batch["labels"])])  # tensor batches still work


# --------------------------------------------------------------------------- pred_type="nn"


def fitted(name: str = "llama", structure: str = "kron", **kwargs):
    case = make_case(name)
    la = lora_laplace(
        case.model, structure, include_extra_params=case.include_extra_params, **kwargs
    )
    la.fit(loader(case.batch, 4))
    return la, case


def weights(la) -> list[torch.Tensor]:
    return [p.detach().clone() for p in la.params]


def nn_reference(la, batch, samples: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """Logits ``(S, B, C)`` by writing each sample into a deep copy of the model."""
    import copy

    model = copy.deepcopy(la.model)
    params = [dict(model.named_parameters())[n] for n in _param_names(la)]
    out = []
    with torch.no_grad():
        for s in samples:
            torch.nn.utils.vector_to_parameters(s.clone(), params)
            out.append(forward_logits(model, batch, la.dict_key_y, model_kwargs))
    return torch.stack(out)


def _param_names(la) -> list[str]:
    ids = {id(p): n for n, p in la.model.named_parameters()}
    return [ids[id(p)] for p in la.params]


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_stock_nn_sampling_then_nn_predictive_keeps_mean_and_weights(structure):
    la, case = fitted("llama", structure)
    mean, w = la.mean.clone(), weights(la)
    gen = torch.Generator().manual_seed(3)
    samples = la.sample(4, generator=gen)
    fs = la.functional_samples(
        case.batch, pred_type="nn", n_samples=4, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(fs, nn_reference(la, case.batch, samples), rtol=1e-10, atol=1e-12)
    ps = la.predictive_samples(
        case.batch, pred_type="nn", n_samples=4, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(ps, fs.softmax(-1), rtol=1e-10, atol=1e-12)
    la(case.batch, pred_type="nn", link_approx="mc", n_samples=4)
    assert torch.equal(la.mean, mean)
    for p, q in zip(la.params, w, strict=True):
        assert torch.equal(p, q)


def test_nn_predictive_after_stock_vector_to_parameters_does_not_touch_mean():
    la, case = fitted("llama", "kron")
    torch.nn.utils.vector_to_parameters(la.mean, la.params)  # params now view la.mean
    mean = la.mean.clone()
    la(case.batch, pred_type="nn", link_approx="mc", n_samples=3)
    assert torch.equal(la.mean, mean)
    for p, q in zip(la.params, la.mean.split([p.numel() for p in la.params]), strict=True):
        assert torch.equal(p.flatten(), q)


def test_nn_predictive_restores_the_callers_weights_not_the_mean():
    la, case = fitted("llama", "kron")
    with torch.no_grad():  # e.g. more fine-tuning after the fit
        for p in la.params:
            p.add_(0.01)
    w = weights(la)
    la(case.batch, pred_type="nn", link_approx="mc", n_samples=3)
    la.functional_samples(case.batch, pred_type="nn", n_samples=2)
    for p, q in zip(la.params, w, strict=True):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- keywords


def test_asdl_fisher_kwargs_kfac_approx_is_honoured():
    la_idiom, _ = fitted("llama", "kron", asdl_fisher_kwargs={"kfac_approx": "reduce"})
    la_reduce, _ = fitted("llama", "kron", kfac_approx="reduce")
    la_expand, _ = fitted("llama", "kron")
    assert la_idiom.kfac_approx == "reduce"
    for F1, F2 in zip(la_idiom.H_facs.kfacs, la_reduce.H_facs.kfacs, strict=True):
        for a, b in zip(F1, F2, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    lml = [la.log_marginal_likelihood().item() for la in (la_idiom, la_reduce, la_expand)]
    assert lml[0] == pytest.approx(lml[1], rel=1e-12) and lml[0] != pytest.approx(lml[2])


@pytest.mark.parametrize(
    "structure, kwargs, match",
    [
        ("kron", {"asdl_fisher_kwargs": {"kfac_approx": "mean"}}, "must be one of"),
        ("kron", {"asdl_fisher_kwargs": {"fisher_type": "emp"}}, "not supported"),
        (
            "kron",
            {"kfac_approx": "reduce", "asdl_fisher_kwargs": {"kfac_approx": "expand"}},
            "conflicts",
        ),
        (
            "kron",  # an explicit "expand" (the value used without the dict) conflicts too
            {"kfac_approx": "expand", "asdl_fisher_kwargs": {"kfac_approx": "reduce"}},
            "conflicts",
        ),
        ("diag", {"asdl_fisher_kwargs": {"kfac_approx": "reduce"}}, "only applies"),
        ("kron", {"enable_backprop": True}, "enable_backprop"),
        ("diag", {"enable_backprop": True}, "enable_backprop"),
        ("kron", {"dict_key_x": "x"}, "dict_key_x"),
    ],
)
def test_laplace_torch_keywords_refused_at_construction(structure, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_laplace(tiny_llama(), structure, **kwargs)


def test_kron_default_kfac_approx_is_accepted_by_every_structure():
    for structure in ("kron", "diag", "full"):
        assert lora_laplace(tiny_llama(), structure, kfac_approx=None).kfac_approx == "expand"


def test_default_laplace_torch_keywords_accepted():
    lora_laplace(
        tiny_llama(), "kron", enable_backprop=False, dict_key_x="input_ids", asdl_fisher_kwargs={}
    )


def test_model_kwargs_reach_the_model_with_pred_type_nn():
    doc, case = doc_and_own("gpt2")
    la = lora_laplace(doc, "kron", include_extra_params=True)
    la.fit(loader(case.batch, 4))
    probs = la(
        case.batch,
        pred_type="nn",
        link_approx="mc",
        n_samples=3,
        generator=torch.Generator().manual_seed(1),
        temperature=2.0,
    )
    samples = la.sample(3, generator=torch.Generator().manual_seed(1))
    ref = nn_reference(la, case.batch, samples, temperature=2.0).softmax(-1).mean(0)
    torch.testing.assert_close(probs, ref, rtol=1e-10, atol=1e-12)
    without = la(
        case.batch,
        pred_type="nn",
        link_approx="mc",
        n_samples=3,
        generator=torch.Generator().manual_seed(1),
    )
    assert not torch.allclose(probs, without)
    with pytest.raises(TypeError, match="pred_type='nn' only"):
        la(case.batch, temperature=2.0)


# --------------------------------------------------------------------------- stock backends


@pytest.mark.parametrize("backend_name, fisher", [("AsdlGGN", "exact"), ("AsdlEF", "empirical")])
def test_asdl_backends_are_refused_with_the_equivalent_options(backend_name, fisher):
    import laplace.curvature

    backend = getattr(laplace.curvature, backend_name)
    with pytest.raises(ValueError, match=rf"backend=None.*fisher_type='{fisher}'"):
        lora_laplace(tiny_llama(), "kron", backend=backend)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    "backend_name, fisher", [("CurvlinopsGGN", "exact"), ("CurvlinopsEF", "empirical")]
)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_curvlinops_backends_run_on_the_lora_matrices(name, backend_name, fisher, approx):
    """laplace-torch's LLM-docs backends run on la.params and compute the textbook KFAC
    (every position in ``A``); ours equals it except on the layers with positions that do
    not reach the logits, where ``A`` keeps the reaching ones (see ``curvature.kfac``).
    GPT-2: with the SEQ_CLS head in PEFT's ModulesToSaveWrapper in the posterior."""
    import laplace.curvature

    case = make_case(name)
    case.batch["attention_mask"] = torch.ones_like(case.batch["attention_mask"])  # see below
    backend = getattr(laplace.curvature, backend_name)
    las = []
    for kwargs in ({"backend": backend}, {"fisher_type": fisher}):
        la = lora_laplace(
            case.model,
            "kron",
            include_extra_params=case.include_extra_params,
            asdl_fisher_kwargs={"kfac_approx": approx},
            **kwargs,
        )
        la.fit(loader(case.batch, 4))
        las.append(la)
    stock, ours = las
    assert stock.fisher_type == fisher
    targets = ours.lora_targets
    args = (case.model, case.batch, [t.module for t in targets], len(case.batch["labels"]), approx)
    textbook = kfac_reference(*args, reaching_only=False)
    reaching = kfac_reference(*args)
    close = {"rtol": 1e-8, "atol": 1e-12}
    differing, i = [], 0
    for t, (_, A_textbook), (_, A_reaching) in zip(targets, textbook, reaching, strict=True):
        for k in range(1 + t.with_bias):  # the bias block is G alone
            G_stock, G_ours = stock.H_facs.kfacs[i + k][0], ours.H_facs.kfacs[i + k][0]
            torch.testing.assert_close(G_stock, G_ours, **close)
        torch.testing.assert_close(stock.H_facs.kfacs[i][1], A_textbook, **close)
        torch.testing.assert_close(ours.H_facs.kfacs[i][1], A_reaching, **close)
        if not torch.allclose(A_textbook, A_reaching, **close):
            differing.append(t.name)
        i += 1 + t.with_bias
    assert i == len(ours.params)
    if name == "llama":  # the queries: a first token's attends to itself alone, the last
        assert differing and all("q_proj" in n for n in differing), differing  # block's: 1
    else:  # the score head is read at one position (GPT-2 reads the last id that is not
        # config.pad_token_id, so positions after a random pad id reach nothing)
        assert any("score" in n for n in differing), differing


@pytest.mark.parametrize(
    "structure, kwargs, match",
    [
        ("diag", {}, "hessian_structure='kron' only"),
        ("kron", {"fisher_type": "mc"}, "computes fisher_type='exact'"),
        ("kron", {"backend_kwargs": {"stochastic": True}}, "backend_kwargs"),
        ("kron", {"factor_rank": 2, "rank_threshold": 4}, "factor_rank=None"),
    ],
)
def test_curvlinops_backend_misuse_is_refused(structure, kwargs, match):
    from laplace.curvature import CurvlinopsGGN

    with pytest.raises(ValueError, match=match):
        lora_laplace(tiny_llama(), structure, backend=CurvlinopsGGN, **kwargs)


def test_curvlinops_backend_refuses_padded_batches():
    """curvlinops does not read the attention_mask: it would average padding tokens into A."""
    from laplace.curvature import CurvlinopsGGN

    case = make_case("llama")
    la = lora_laplace(case.model, "kron", backend=CurvlinopsGGN)
    with pytest.raises(ValueError, match="padding"):
        la.fit(loader(case.batch, 4))


# --------------------------------------------------------------------------- Jacobians


def brute_jacobians(model, batch, params) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, C)`` and ``(B, C, P)`` Jacobians, one autograd call per entry."""
    logits = forward_logits(model, batch)
    rows = []
    for n in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            grads = torch.autograd.grad(logits[n, c], params, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in grads]))
    return logits.detach(), torch.stack(rows).reshape(*logits.shape, -1)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_jacobians_and_functional_variance_cover_la_params_only(structure):
    case = make_case("gpt2")  # its classifier head is trainable (modules_to_save)
    la = lora_laplace(case.model, structure, include_extra_params=False)
    la.fit(loader(case.batch, 4))
    n_trainable = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    assert la.n_params < n_trainable
    Js, f = la.backend.jacobians(case.batch)
    f_ref, J_ref = brute_jacobians(case.model, case.batch, la.params)
    assert Js.shape == (len(f_ref), f_ref.shape[1], la.n_params)
    torch.testing.assert_close(Js, J_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f, f_ref)
    f_var = la.functional_variance(Js)
    if structure == "kron":  # dense inverse of the Kronecker posterior precision
        cov = torch.linalg.inv(la.posterior_precision.to_matrix())
    elif structure == "diag":
        cov = torch.diag(1.0 / la.posterior_precision)
    else:
        cov = torch.linalg.inv(la.posterior_precision)
    ref = torch.einsum("bcp,pq,bkq->bck", J_ref, cov, J_ref)
    torch.testing.assert_close(f_var, ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(la.predictive_moments(case.batch)[1], ref, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="la.params"):
        la.functional_variance(Js[..., :-1])


# --------------------------------------------------------------------------- laplace-torch pin


def test_compat_accepts_the_installed_laplace_torch():
    assert compat.missing_names() == []
    compat.check_laplace_torch()


@pytest.mark.parametrize(
    "cls_name, member", [("KronLaplace", "_rescale_factors"), ("BaseLaplace", "_H_factor")]
)
def test_compat_fails_loudly_on_a_missing_private_name(monkeypatch, cls_name, member):
    monkeypatch.delattr(getattr(compat, cls_name), member)
    with pytest.raises(compat.IncompatibleLaplaceTorch, match=rf"Laplace\.{member}.*pip"):
        compat.check_laplace_torch()


def test_compat_fails_loudly_on_a_changed_signature(monkeypatch):
    monkeypatch.setattr(compat.ParametricLaplace, "_curv_closure", lambda self, batch: None)
    with pytest.raises(compat.IncompatibleLaplaceTorch, match=r"_curv_closure\(X, y, N\)"):
        compat.check_laplace_torch()


def test_compat_fails_loudly_on_a_missing_module_name(monkeypatch):
    import importlib.util

    import laplace.utils.utils

    monkeypatch.delattr(laplace.utils.utils, "_is_valid_scalar")
    spec = importlib.util.spec_from_file_location("compat_copy", compat.__file__)
    module = importlib.util.module_from_spec(spec)  # a fresh copy, not in sys.modules
    with pytest.raises(ImportError, match="incompatible.*cannot import name '_is_valid_scalar'"):
        spec.loader.exec_module(module)


def test_compat_warns_outside_the_tested_versions():
    with pytest.warns(UserWarning, match="tested with laplace-torch>=0.3,<0.4"):
        compat.check_laplace_torch(version="0.4.1")


def test_pyproject_bounds_laplace_torch_like_compat():
    import importlib.metadata
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    assert f"laplace-torch{','.join(compat.SUPPORTED_VERSIONS)}" in deps
    assert compat._version_supported(importlib.metadata.version("laplace-torch"))


# ------------------------------------------------------------------ autograd contexts


@pytest.mark.parametrize("method", ["lora_marglik", "marglik"])
def test_evidence_searches_run_under_a_callers_no_grad(method):
    """The evidence steps need autograd; under ``torch.no_grad()`` they crashed inside
    ``backward`` ("element 0 of tensors does not require grad")."""
    case = make_case("llama")
    priors = []
    for context in (torch.enable_grad, torch.no_grad):
        la = lora_laplace(case.model)
        la.fit(loader(case.batch, 4))
        with context():
            la.optimize_prior_precision(method=method, n_steps=300)
        priors.append(la.prior_precision)
    torch.testing.assert_close(priors[0], priors[1], rtol=0, atol=0)


def test_inference_mode_gets_a_clear_error_naming_the_call():
    case = make_case("llama")
    la = lora_laplace(case.model)
    la.fit(loader(case.batch, 4))
    prior = la.prior_precision.clone()
    calls = {
        "fit": lambda: la.fit(loader(case.batch, 4)),
        r"predictive \(la\(x\), predictive_moments\)": lambda: la(case.batch, link_approx="mc"),
        "optimize_prior_precision": la.optimize_prior_precision,
    }
    for name, call in calls.items():
        with torch.inference_mode(), pytest.raises(RuntimeError, match=f"{name} takes gradients"):
            call()
    torch.testing.assert_close(la.prior_precision, prior)
    with torch.inference_mode():  # the nn predictive takes no gradients
        assert la(case.batch, pred_type="nn", link_approx="mc", n_samples=2).shape == (7, 3)


def test_a_diverging_evidence_search_names_lr_and_keeps_the_prior():
    case = make_case("llama")
    la = lora_laplace(case.model)
    la.fit(loader(case.batch, 4))
    prior = la.prior_precision.clone()
    with pytest.raises(FloatingPointError, match="lr=1000000.0 took a prior precision to 0"):
        la.optimize_prior_precision(method="lora_marglik", lr=1e6)
    torch.testing.assert_close(la.prior_precision, prior)
