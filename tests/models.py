"""Tiny random PEFT models (float64) and data for the tests. No downloads."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, Dataset
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from laplace_lora_ext import LastTokenChoiceLM, SequenceClassifier
from laplace_lora_ext.testing import exact_float64_norms, perturb_lora_B

VOCAB = 40
TARGET_IDS = [5, 9, 13]


def tiny_llama_config() -> LlamaConfig:
    """The tiny Llama's config: hidden 8, 2 layers, 2 heads, vocabulary :data:`VOCAB`."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="sdpa",
        initializer_range=0.5,
    )


def tiny_llama(lm_head: bool = False, seed: int = 0) -> torch.nn.Module:
    """LlamaForCausalLM (hidden 8, 2 layers) with LoRA r=2 on q, v (and lm_head)."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config()).double()
    exact_float64_norms(base)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if lm_head else [])
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    perturb_lora_B(peft_model, seed)
    return LastTokenChoiceLM(peft_model, TARGET_IDS).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT-2 (Conv1D base, fan_in_fan_out) sequence classifier, 3 classes, SEQ_CLS LoRA."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=8,
        n_layer=2,
        n_head=2,
        n_positions=32,
        num_labels=3,
        pad_token_id=0,
        attn_implementation="eager",
        initializer_range=0.5,
    )
    base = GPT2ForSequenceClassification(config).double()
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS"
    )
    peft_model = get_peft_model(base, lora)
    perturb_lora_B(peft_model, seed)
    return SequenceClassifier(peft_model).eval()


def tiny_roberta(seed: int = 0) -> torch.nn.Module:
    """RoBERTa sequence classifier, 2 classes, LoRA on query/value, head in modules_to_save."""
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        num_labels=2,
        pad_token_id=1,
        attn_implementation="eager",
        initializer_range=0.5,
    )
    base = RobertaForSequenceClassification(config).double()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft_model = get_peft_model(base, lora)
    perturb_lora_B(peft_model, seed)
    return peft_model.eval()


class DictDataset(Dataset):
    """A list of HF-style examples; collated into dict batches by the default collate."""

    def __init__(self, input_ids, attention_mask, labels):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


def random_batch(
    n: int = 7,
    T: int = 6,
    n_classes: int = 3,
    padding: str = "left",
    seed: int = 1,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Random token ids with varying lengths (padding on the given side) and labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, T), generator=gen)
    lengths = torch.randint(min(2, T), T + 1, (n,), generator=gen)
    lengths[0] = T
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, L in enumerate(lengths.tolist()):
        if padding == "left":
            mask[i, T - L :] = 1
        else:
            mask[i, :L] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def zero_lora_B(model: torch.nn.Module, covered: str = "") -> torch.nn.Module:
    """Set every ``lora_B`` weight of ``model`` whose name contains ``covered`` to zero (in
    place; an untrained adapter, or a brute-force ``B = 0`` copy) and return the model."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and covered in n:
                p.zero_()
    return model


def lora_laplace(model: torch.nn.Module, structure: str = "kron", **kwargs):
    """``laplace.Laplace(model, "classification", subset_of_weights="lora", ...)``."""
    from laplace import Laplace

    return Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure=structure, **kwargs
    )


def loader(batch: dict[str, torch.Tensor], batch_size: int) -> DataLoader:
    ds = DictDataset(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return DataLoader(ds, batch_size=batch_size, shuffle=False)
