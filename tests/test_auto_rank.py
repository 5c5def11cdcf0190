"""``factor_rank="auto"`` (the default): small models keep exact dense factors, large sides
are never formed densely, and a LLaMA-2-7B-shaped LoRA posterior fits in 1 GB."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from laplace_lora_ext import LastTokenChoiceLM
from laplace_lora_ext.lowrank import LowRankFactor
from laplace_lora_ext.lowrank.auto import (
    AUTO_MIN_SIDE,
    AUTO_RANK,
    factor_bytes,
    resolve_factor_rank,
)
from tests.models import loader, lora_laplace, perturb_lora_B, random_batch, tiny_llama


def llama7b_lora_shapes(layers: int = 32, r: int = 8) -> list[tuple[int, int]]:
    """LoRA matrix shapes of LLaMA-2-7B with LoRA r on q_proj, v_proj and lm_head."""
    h, vocab = 4096, 32000
    return [(r, h), (h, r)] * (2 * layers) + [(r, h), (vocab, r)]


def test_llama7b_posterior_fits_in_1gb_and_keeps_small_sides_dense():
    shapes = llama7b_lora_shapes()
    rank, threshold = resolve_factor_rank("auto", 2048, shapes)
    assert (rank, threshold) == (AUTO_RANK, 2048)
    size = factor_bytes(shapes)
    assert size["largest_dense_side"] == 8  # only the r x r factors are dense
    n_params = sum(a * b for a, b in shapes)
    mean_and_prior = 2 * 4 * n_params
    assert size["total"] + mean_and_prior <= 1e9, size
    dense = factor_bytes(shapes, factor_rank=None)["total"]
    assert dense > 12e9  # what factor_rank=None would take (12.75 GB)


def test_dense_budget_lowers_the_threshold():
    """64 factors of side 2048 (Llama-3.2-1B-like q, v) would take 1 GiB densely."""
    shapes = [(8, 2048), (2048, 8)] * 32
    rank, threshold = resolve_factor_rank("auto", 2048, shapes)
    assert rank == AUTO_RANK and threshold == AUTO_MIN_SIDE
    assert factor_bytes(shapes)["largest_dense_side"] == 8
    # under the budget nothing changes
    assert resolve_factor_rank("auto", 2048, [(8, 2048), (2048, 8)]) == (AUTO_RANK, 2048)
    # explicit choices pass through
    assert resolve_factor_rank(16, 100, shapes) == (16, 100)
    assert resolve_factor_rank(None, 2048, shapes) == (None, 2048)


def test_small_model_default_equals_dense_exactly():
    model = tiny_llama(lm_head=True)
    batch = random_batch(7, 6, 3, "left")
    auto = lora_laplace(model, prior_precision=0.5)
    dense = lora_laplace(model, prior_precision=0.5, factor_rank=None)
    assert auto.factor_rank == "auto"
    for la in (auto, dense):
        la.fit(loader(batch, 3))
    for Fa, Fd in zip(auto.H_facs.kfacs, dense.H_facs.kfacs, strict=True):
        for a, d in zip(Fa, Fd, strict=True):
            assert isinstance(a, torch.Tensor) and torch.equal(a, d)
    assert torch.equal(auto.log_marginal_likelihood(), dense.log_marginal_likelihood())
    assert torch.equal(auto(batch), dense(batch))


def test_damping_with_auto_needs_dense_factors():
    model = tiny_llama()
    lora_laplace(model, damping=True).fit(loader(random_batch(4, 5, 3, "left"), 2))
    with pytest.raises(ValueError, match="damping=True needs dense"):
        lora_laplace(model, damping=True, rank_threshold=4)


def test_diag_and_full_accept_the_auto_default():
    model = tiny_llama()
    for structure in ("diag", "full"):
        lora_laplace(model, structure, factor_rank="auto")
        with pytest.raises(ValueError, match="only apply"):
            lora_laplace(model, structure, factor_rank=4)


class _LargestTensors(TorchDispatchMode):
    """Records every op output shape whose two largest dims are both >= ``side``."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side, self.square = side, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and sum(s >= self.side for s in t.shape) >= 2:
                self.square.append((str(func), tuple(t.shape)))
        return out


def test_default_never_forms_a_factor_above_the_threshold():
    """LoRA on lm_head with V = 3000 > 2048: at the default, the V x V output factor of
    lora_B is low-rank, and no V x V tensor appears in fit, marglik or the predictive."""
    torch.manual_seed(0)
    V = 3000
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    base = LlamaForCausalLM(cfg)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    perturb_lora_B(peft_model)
    model = LastTokenChoiceLM(peft_model, [5, 9]).eval()
    batch = random_batch(6, 5, 2, "left")
    la = lora_laplace(model)
    with _LargestTensors(V) as rec:
        la.fit(loader(batch, 2))
        la.optimize_prior_precision(method="marglik", n_steps=5)
        probs = la(batch, link_approx="mc", n_samples=10)
    assert rec.square == []
    big = [f for F in la.H_facs.kfacs for f in F if isinstance(f, LowRankFactor)]
    assert [f.dim for f in big] == [V] and big[0].max_rank == AUTO_RANK
    assert probs.shape == (6, 2)
