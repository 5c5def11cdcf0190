"""The bug we fix: stock laplace-torch's ASDL KFAC on sequence inputs is T times too large.

ASDL flattens batch x sequence into one axis of "examples" and laplace-torch divides the
input factor by the number of sequences N only, so A = Σ_{n,t} a aᵀ / N instead of the
expand convention Σ_{n,t} a aᵀ / (N T). Our factors match the reference formulas.
"""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace

from laplace_lora_ext import collect_targets
from laplace_lora_ext.testing import kfac_reference
from tests.models import loader, random_batch, tiny_llama


@pytest.mark.parametrize("T", [3, 6])
def test_stock_asdl_input_factors_are_T_times_too_large(T):
    from laplace.curvature import AsdlGGN

    model = tiny_llama()
    model.model.config.pad_token_id = 1  # not among the ids: stock ASDL passes no mask
    batch = random_batch(4, T, 3, "left")
    batch["attention_mask"][:] = 1  # no padding: T tokens per sequence
    targets = collect_targets(model)
    modules = [t.module for t in targets]
    textbook = kfac_reference(model, batch, modules, 4, "expand", reaching_only=False)
    ref = kfac_reference(model, batch, modules, 4, "expand")  # ours: reaching positions only

    _, stock = AsdlGGN(model, "classification").kron(batch["input_ids"], batch["labels"], N=4)
    ours = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    ours.fit(loader(batch, 4))
    for i, ((G, A), (_, A_textbook)) in enumerate(zip(ref, textbook, strict=True)):
        stock_G, stock_A = stock.kfacs[i]
        assert torch.allclose(stock_G, G, rtol=1e-8)
        assert torch.allclose(stock_A, T * A_textbook, rtol=1e-8)  # the bug: a factor of T
        assert torch.allclose(ours.H_facs.kfacs[i][1], A, rtol=1e-8)
