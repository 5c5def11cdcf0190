"""factor_rank: the low-rank Kronecker path equals the dense one at full rank, and never
forms a d x d factor above the threshold."""

from __future__ import annotations

import io

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from laplace_lora_ext import LastTokenChoiceLM
from laplace_lora_ext.lowrank import LowRankFactor, LowRankKron
from laplace_lora_ext.testing import perturb_lora_B, rel
from tests.models import loader, lora_laplace, random_batch, tiny_llama

TOL = 1e-8


def fit_pair(approx="expand"):
    model = tiny_llama(lm_head=True)
    batch = random_batch(7, 6, 3, "left")
    dense = lora_laplace(model, kfac_approx=approx, prior_precision=0.5)
    dense.fit(loader(batch, 3))
    low = lora_laplace(
        model, kfac_approx=approx, prior_precision=0.5, factor_rank=64, rank_threshold=4
    )
    low.fit(loader(batch, 3))
    return model, batch, dense, low


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_full_rank_low_rank_equals_dense(approx):
    model, batch, dense, low = fit_pair(approx)
    assert isinstance(low.H_facs, LowRankKron)
    n_low = sum(isinstance(f, LowRankFactor) for F in low.H_facs.kfacs for f in F)
    assert n_low >= 8  # hidden 8 and vocab 40 sides are above the threshold 4
    assert rel(low.H_facs.to_matrix(), dense.H_facs.to_matrix()) < TOL
    assert rel(low.posterior_precision.to_matrix(), dense.posterior_precision.to_matrix()) < TOL
    ml_d, ml_l = dense.log_marginal_likelihood(), low.log_marginal_likelihood()
    assert abs(float(ml_d - ml_l)) < TOL * abs(float(ml_d))
    fd = dense._glm_predictive_distribution(batch)[1]
    fl = low._glm_predictive_distribution(batch)[1]
    assert rel(fl, fd) < TOL
    for la in (dense, low):
        la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=30)
    assert rel(low.prior_precision, dense.prior_precision) < 1e-6


def test_low_rank_sampling_and_state_dict():
    model, batch, dense, low = fit_pair()
    # the symmetric P^(-1/2) is unique: same noise -> the same samples as the dense path
    s_low = low.sample(50, generator=torch.Generator().manual_seed(0))
    s_dense = dense.sample(50, generator=torch.Generator().manual_seed(0))
    assert rel(s_low - low.mean, s_dense - dense.mean) < TOL
    S = low.posterior_precision.bmm(torch.eye(low.n_params), exponent=-0.5)
    target = torch.linalg.inv(low.posterior_precision.to_matrix())
    assert rel(S @ S.T, target) < TOL
    p = low(batch, pred_type="nn", link_approx="mc", n_samples=10)
    assert torch.allclose(p.sum(-1), torch.ones(len(p)))
    buf = io.BytesIO()
    torch.save(low.state_dict(), buf)
    buf.seek(0)
    again = lora_laplace(model, factor_rank=64, rank_threshold=4)
    again.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.allclose(again(batch), low(batch))


def test_truncated_rank_gives_psd_posterior_and_smaller_factors():
    model = tiny_llama(lm_head=True)
    batch = random_batch(7, 6, 3, "left")
    la = lora_laplace(model, factor_rank=2, rank_threshold=4)
    la.fit(loader(batch, 3))
    for F in la.H_facs.kfacs:
        for f in F:
            if isinstance(f, LowRankFactor):
                assert f.rank <= 2
    assert torch.isfinite(la.log_marginal_likelihood())
    assert torch.linalg.eigvalsh(la.posterior_precision.to_matrix()).min() > 0


def test_vocabulary_sized_factor_is_never_dense():
    """LoRA on lm_head with V = 200,000: a dense V x V float64 factor would need 320 GB."""
    torch.manual_seed(0)
    V = 200_000
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
    batch = random_batch(4, 5, 2, "left")
    la = lora_laplace(model, factor_rank=4)
    la.fit(loader(batch, 2))
    la.optimize_prior_precision(method="marglik", n_steps=5)
    big = [f for F in la.H_facs.kfacs for f in F if isinstance(f, LowRankFactor)]
    assert [f.dim for f in big] == [V]
    assert big[0].U.shape[0] == V and big[0].U.shape[1] <= 4
    assert la(batch, link_approx="mc", n_samples=10).shape == (4, 2)


def test_bf16_model_accumulates_in_float32():
    model = tiny_llama().to(torch.bfloat16)
    batch = random_batch(4, 5, 3, "left")
    la = lora_laplace(model, factor_rank=4, rank_threshold=4)
    la.fit(loader(batch, 2))
    dtypes = {f.dtype for F in la.H_facs.kfacs for f in F}
    assert dtypes == {torch.float32}
    assert la.mean.dtype == torch.float32
    assert torch.isfinite(la.log_marginal_likelihood())
    p = la(batch, pred_type="nn", link_approx="mc", n_samples=3)
    assert p.dtype == torch.float32 and all(q.dtype == torch.bfloat16 for q in la.params)
