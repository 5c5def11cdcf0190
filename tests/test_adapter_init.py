"""The training-data priors refuse adapters that did not start at ``lora_B = 0`` on the
unchanged base weights (PiSSA, OLoRA, ...); the default falls back to ``lora_marglik``."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from laplace_lora_ext import LastTokenChoiceLM
from laplace_lora_ext.adapter_init import AdapterInitError, unsupported_init
from laplace_lora_ext.posterior.tuning import SATURATED_TRAIN_NLL
from laplace_lora_ext.testing import exact_float64_norms, perturb_lora_B

from .models import TARGET_IDS, loader, lora_laplace, random_batch, tiny_llama_config


def llama_with_init(init, seed: int = 3) -> LastTokenChoiceLM:
    """A tiny float64 Llama whose q, v LoRA (r = 2) started from ``init_lora_weights=init``."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config()).float()  # OLoRA refuses float64 base weights
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init
    )
    peft_model = get_peft_model(base, lora).double()
    exact_float64_norms(peft_model)
    perturb_lora_B(peft_model, seed)
    return LastTokenChoiceLM(peft_model, TARGET_IDS).eval()


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_zero_b_inits_are_supported(init):
    assert unsupported_init(llama_with_init(init)) is None


@pytest.mark.parametrize("init", [False, "olora", "orthogonal"])
def test_other_inits_are_named(init):
    assert unsupported_init(llama_with_init(init)) == (
        f"adapter 'default' (init_lora_weights={init!r})"
    )


def test_only_active_adapters_count_and_plain_modules_pass():
    model = llama_with_init(True)
    model.model.add_adapter(
        "other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    assert unsupported_init(model) is None  # "other" is not active
    model.model.set_adapter("other")
    assert "'other'" in unsupported_init(model)
    assert unsupported_init(torch.nn.Linear(2, 2)) is None  # no PEFT config: taken as B = 0


def test_training_data_rules_refuse_and_the_default_falls_back():
    model = llama_with_init("olora")
    la = lora_laplace(model)
    la.fit(loader(random_batch(n=5, n_classes=3, seed=4), 2))
    la.loss = 0.5 * SATURATED_TRAIN_NLL * la.n_data  # as if memorised: the default would use LOO
    with pytest.warns(RuntimeWarning, match="memorised") as record:
        la.optimize_prior_precision(method="lora_marglik")
    assert "do not apply to adapter 'default' (init_lora_weights='olora')" in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller's line
    marglik = la.prior_precision.clone()
    la.prior_precision = 1.0
    for method in ("leave_one_out", "function_space"):
        with pytest.raises(AdapterInitError, match=r"init_lora_weights='olora'.*lora_marglik"):
            la.optimize_prior_precision(method=method)
        assert torch.equal(la.prior_precision, torch.ones_like(la.prior_precision))
    with pytest.warns(RuntimeWarning) as record:
        la.optimize_prior_precision()
    messages = [str(r.message) for r in record]
    assert (
        "init_lora_weights='olora'" in messages[0] and "Using method='lora_marglik'" in messages[0]
    )
    assert "memorised its training data" in messages[1]
    assert {r.filename for r in record} == {__file__}
    torch.testing.assert_close(la.prior_precision, marglik)
