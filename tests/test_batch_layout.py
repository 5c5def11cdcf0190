"""Which LoRA layers the posterior can cover: each layer's inputs must lead with the batch
(the curvature and the predictive read dimension 0 as the example), and an explicit
``adapter_name`` may cover only some layers. Sequence-first layers and flattening blocks
(mixture-of-experts) gave a curvature 18-42 % off the exact GGN, silently (a review
helper's measurement); now they are refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

from laplace_lora_ext import LastTokenChoiceLM
from laplace_lora_ext.testing import exact_float64_norms, exact_ggn, perturb_lora_B, rel
from tests.models import TARGET_IDS, loader, lora_laplace, random_batch, tiny_llama_config


class TinyEncoder(nn.Module):
    """torch's ``TransformerEncoderLayer`` with a mean-pooled 3-class head, float64."""

    def __init__(self, batch_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.emb(batch["input_ids"])
        if not self.enc.self_attn.batch_first:
            return self.head(self.enc(h.transpose(0, 1)).mean(0))
        return self.head(self.enc(h).mean(1))


def encoder_lora(batch_first: bool) -> nn.Module:
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["linear1", "linear2"])
    peft_model = get_peft_model(TinyEncoder(batch_first).double(), lora)
    perturb_lora_B(peft_model, 0)
    return peft_model.eval()


def full_batch(n: int, T: int) -> dict:
    batch = random_batch(n, T, 3, "right")
    batch["attention_mask"][:] = 1
    return batch


def test_sequence_first_layers_are_refused_where_no_shape_could_tell():
    with pytest.raises(ValueError, match=r"enc'.*TransformerEncoderLayer.*batch_first=False"):
        lora_laplace(encoder_lora(batch_first=False), "diag")


def test_batch_first_encoder_layers_are_accepted():
    la = lora_laplace(encoder_lora(batch_first=True), "diag")
    assert len(la.params) == 4  # lora_A and lora_B of linear1 and linear2


class FlattensTokens(nn.Module):
    """A block that runs a Linear on ``(B·T, d)`` tokens, as mixture-of-experts blocks do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 8)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.emb(batch["input_ids"])
        B, T, d = h.shape
        return self.head(self.mlp(h.reshape(B * T, d)).reshape(B, T, d).mean(1))


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_a_layer_that_sees_flattened_tokens_gets_a_clear_error(structure):
    model = get_peft_model(FlattensTokens().double(), LoraConfig(r=2, target_modules=["mlp"]))
    la = lora_laplace(model, structure)
    with pytest.raises(ValueError, match=r"sees 20 rows in .* for a batch of 4 examples"):
        la.fit(loader(full_batch(4, 5), 4))


def two_adapters() -> tuple[nn.Module, nn.Module]:
    """Adapter ``a`` on q and v, adapter ``b`` on v only (tiny Llama, float64)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).double()
    exact_float64_norms(base)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(base, lora, adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    perturb_lora_B(peft_model, 0)
    return LastTokenChoiceLM(peft_model, TARGET_IDS).eval(), peft_model


def test_adapter_name_may_cover_only_some_layers():
    model, peft_model = two_adapters()
    peft_model.set_adapter("b")
    implicit = lora_laplace(model, "full")
    explicit = lora_laplace(model, "full", adapter_name="b")
    assert explicit.lora_param_names == implicit.lora_param_names
    names = explicit.lora_param_names
    assert len(names) == 4 and all(".b." in n for n in names)
    batch = random_batch(5, 6, 3, "left")
    explicit.fit(loader(batch, 2))
    assert rel(explicit.H, exact_ggn(model, batch, explicit.params)) < 1e-12
    with pytest.raises(ValueError, match=r"No LoRA layer holds adapter 'c'.*\['a', 'b'\]"):
        lora_laplace(model, adapter_name="c")


class EncoderAndHead(TinyEncoder):
    """A sequence-first encoder layer and a head: adapter ``a`` on the encoder's linear
    layers, adapter ``b`` on the head only."""


def test_an_uncovered_sequence_first_layer_is_not_refused():
    model = get_peft_model(
        EncoderAndHead(batch_first=False).double(),
        LoraConfig(r=2, target_modules=["linear1", "linear2"]),
        adapter_name="a",
    )
    model.add_adapter("b", LoraConfig(r=2, target_modules=["head"]))
    la = lora_laplace(model, "diag", adapter_name="b")
    assert [n.split(".")[-3:] for n in la.lora_param_names] == [
        ["lora_A", "b", "weight"],
        ["lora_B", "b", "weight"],
    ]
    with pytest.raises(ValueError, match="batch_first=False"):
        lora_laplace(model, "diag", adapter_name="a")


@pytest.mark.parametrize(
    "variant, kind",
    [({"kasa_config": {}}, "KasaLinearVariant"), ({"alora_invocation_tokens": [7]}, "ALora")],
)
def test_unchecked_lora_variants_are_refused_at_construction(variant, kind):
    """KaSA rewrites the base weight and trains a diagonal the posterior would leave out
    (it passed every check before); aLoRA adapts a subset of the tokens."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).double()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **variant)
    model = LastTokenChoiceLM(get_peft_model(base, lora), TARGET_IDS).eval()
    with pytest.raises(ValueError, match=f"uses PEFT's {kind}.*does not support"):
        lora_laplace(model)


def test_peft_target_parameters_is_refused_at_construction():
    """``LoraConfig(target_parameters=...)`` adds ``B @ A`` to the weight; its matrices are
    never called on inputs, and fit used to fail with "were not called"."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).double()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["q_proj.weight"])
    model = LastTokenChoiceLM(get_peft_model(base, lora), TARGET_IDS).eval()
    with pytest.raises(ValueError, match=r"q_proj' adapts the parameter 'weight'.*target_modules"):
        lora_laplace(model)


@pytest.mark.parametrize(
    "targets, tied, match",
    [
        (["lm_head"], True, r"embed_tokens' is an embedding.*ensure_weight_tying"),
        # embed_tokens targeted, lm_head tied to it by PEFT: the same advice applies
        (["embed_tokens"], True, r"target neither, or set ensure_weight_tying=False"),
        (["embed_tokens"], False, r"embedding LoRA.*linear layers only\.$"),  # no tying, no hint
    ],
)
def test_embedding_lora_from_weight_tying_names_the_option(targets, tied, match):
    """``ensure_weight_tying=True`` on a tied model puts a LoRA on the input embedding beside
    ``lm_head``'s; the error says where it came from, and only where tying did it."""
    torch.manual_seed(0)
    config = tiny_llama_config()
    config.tie_word_embeddings = tied
    base = LlamaForCausalLM(config).double()
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", *targets], ensure_weight_tying=tied
    )
    model = LastTokenChoiceLM(get_peft_model(base, lora), TARGET_IDS).eval()
    with pytest.raises(ValueError, match=match):
        lora_laplace(model)
