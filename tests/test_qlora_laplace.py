"""Laplace-LoRA on a bitsandbytes 4-bit (nf4) base equals the dequantized reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from laplace import Laplace

from laplace_lora_ext import LastTokenChoiceLM, quant
from laplace_lora_ext.testing import perturb_lora_B, rel
from tests.models import loader, random_batch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96


@pytest.fixture(scope="module")
def qlora_and_reference(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("tiny_llama_4bit")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = transformers.LlamaForCausalLM.from_pretrained(
        path, quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
    )
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_lora_B(model, seed=1, scale=0.3, dtype=torch.get_default_dtype())
    # a no-grad eval probe first: the CPU repacking trap (undone, with a warning, by
    # prepare_4bit_for_laplace, which the Laplace constructor also calls)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (2, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.prepare_4bit_for_laplace(model)
    assert not quant.packed_4bit_modules(model)
    reference = quant.dequantize_4bit_to_linear(model)
    assert quant.is_quantized_4bit(model) and not quant.is_quantized_4bit(reference)
    return LastTokenChoiceLM(model, [5, 9, 13]), LastTokenChoiceLM(reference, [5, 9, 13])


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_4bit_equals_dequantized_reference(qlora_and_reference, structure):
    model, reference = qlora_and_reference
    batch = random_batch(6, 7, 3, "left", seed=3)
    batch["input_ids"] = batch["input_ids"] % VOCAB
    results = []
    for m in (model, reference):
        kw = {"factor_rank": 8, "rank_threshold": 32} if structure == "kron" else {}
        la = Laplace(
            m, "classification", subset_of_weights="lora", hessian_structure=structure, **kw
        )
        la.fit(loader(batch, 3))
        la.optimize_prior_precision(method="marglik", n_steps=30)
        f_mu, f_var = la._glm_predictive_distribution(batch)
        H = la.H_facs.to_matrix() if structure == "kron" else la.H
        results.append((H, la.log_marginal_likelihood(), f_mu, f_var, la.prior_precision))
        p = la(batch, pred_type="nn", link_approx="mc", n_samples=3)
        assert torch.isfinite(p).all()
    (H4, ml4, mu4, var4, pp4), (Hr, mlr, mur, varr, ppr) = results
    assert rel(H4, Hr) < 1e-4
    assert abs(float(ml4 - mlr)) < 1e-4 * abs(float(mlr))
    assert rel(mu4, mur) < 1e-5
    assert rel(var4, varr) < 1e-4
    assert rel(pp4, ppr) < 1e-3


def test_4bit_leave_one_out_kernel_shares_its_pass_and_equals_the_reference(
    qlora_and_reference, monkeypatch
):
    """The kernel's 8 draws of ``lora_A`` share one ``B = 0`` pass through the 4-bit layers
    (no fall-back to one pass per draw) and give the dequantized reference's leave-one-out
    logits."""
    from laplace_lora_ext import loo_prior

    batch = random_batch(6, 7, 3, "left", seed=3)
    batch["input_ids"] = batch["input_ids"] % VOCAB
    logits = []
    for m in qlora_and_reference:
        la = Laplace(m, "classification", subset_of_weights="lora", hessian_structure="kron")
        la.fit(loader(batch, 3))
        calls, capture = [0], la.backend.capture

        def counted(x, capture=capture, calls=calls):
            calls[0] += 1
            return capture(x)

        monkeypatch.setattr(la.backend, "capture", counted)
        logits.append(loo_prior.loo_cache(la, loader(batch, 3)).logits)
        assert calls[0] == 2 + 2  # the shared B = 0 pass and the MAP pass, 2 batches each
    assert rel(logits[0], logits[1]) < 1e-4
