"""MC dropout and ensemble baselines (benchmarks/baselines/) on tiny float64 PEFT models:
p = 0 dropout is MAP, only LoRA dropout samples, ensembles average member probabilities
and restore the model, checkpoint and deep-ensemble bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks.baselines import ensembles, mc_dropout
from benchmarks.finetune import FinetuneConfig, trainable_state_dict
from tests.models import loader, random_batch, tiny_llama, tiny_roberta


def map_probs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch).softmax(-1).float()


def with_lora_dropout(model: nn.Module, p: float) -> nn.Module:
    """Give every LoRA layer an ``nn.Dropout(p)`` as peft would for ``lora_dropout=p``."""
    for d in mc_dropout.lora_dropout_modules(model):
        assert isinstance(d, nn.Identity)  # tiny models are built with lora_dropout = 0
    for m in model.modules():
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict):
            for k in m.lora_dropout:
                m.lora_dropout[k] = nn.Dropout(p)
    return model.eval()


# --------------------------------------------------------------------------- MC dropout
def test_mc_dropout_with_p0_is_map():
    model = tiny_llama()
    batch = random_batch(n=6)
    probs = mc_dropout.predict_probs(model, loader(batch, 4), n_samples=3)
    torch.testing.assert_close(probs, map_probs(model, batch))


def test_mc_dropout_samples_differ_and_only_lora_dropout_trains():
    model = with_lora_dropout(tiny_llama(), 0.5)
    batch = random_batch(n=6)
    with mc_dropout.mc_dropout(model):
        training = {n for n, m in model.named_modules() if m.training}
        assert training and all(".lora_dropout." in n for n in training)
        with torch.no_grad():
            a, b = model(batch), model(batch)
        assert not torch.allclose(a, b)
    assert not any(m.training for m in model.modules())  # flags restored (eval)
    probs = mc_dropout.predict_probs(model, loader(batch, 4), n_samples=20, seed=1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, dtype=probs.dtype))
    assert not torch.allclose(probs, map_probs(model, batch))
    torch.testing.assert_close(mc_dropout.predict_probs(model, loader(batch, 4), 20, seed=1), probs)


def test_mc_dropout_keeps_the_base_models_dropout_off():
    model = tiny_roberta()  # a sequence classifier with its own (non-LoRA) dropout modules
    base_dropouts = [
        m for n, m in model.named_modules() if isinstance(m, nn.Dropout) and "lora" not in n
    ]
    assert base_dropouts
    model.train()
    with mc_dropout.mc_dropout(model):
        assert not any(m.training for m in base_dropouts)
    assert all(m.training for m in model.modules())  # train mode restored


def test_mc_dropout_needs_lora():
    with pytest.raises(ValueError, match="LoRA"):
        mc_dropout.predict_probs(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="n_samples"):
        mc_dropout.predict_probs(tiny_llama(), loader(random_batch(n=2), 2), n_samples=0)


# ---------------------------------------------------------------------------- ensembles
def member_states(model: nn.Module, m: int = 3) -> list[dict[str, torch.Tensor]]:
    base = trainable_state_dict(model)
    gen = torch.Generator().manual_seed(5)
    return [
        {k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}
        for _ in range(m)
    ]


def test_ensemble_averages_member_probabilities_and_restores_the_model():
    model = tiny_llama()
    batch = random_batch(n=6)
    states = member_states(model)
    before = trainable_state_dict(model)
    probs = ensembles.predict_probs(model, loader(batch, 4), states)
    expected = []
    for s in states:
        clone = tiny_llama()
        for n, p in clone.named_parameters():
            if p.requires_grad:
                p.data.copy_(s[n])
        expected.append(map_probs(clone, batch).double())
    torch.testing.assert_close(probs, torch.stack(expected).mean(0).float())
    for k, v in trainable_state_dict(model).items():
        assert torch.equal(v, before[k])
    single = ensembles.predict_probs(model, loader(batch, 4), [before])
    torch.testing.assert_close(single, map_probs(model, batch))


def test_ensemble_rejects_empty_and_mismatched_states():
    model = tiny_llama()
    batch_loader = loader(random_batch(n=2), 2)
    with pytest.raises(ValueError, match="at least one"):
        ensembles.predict_probs(model, batch_loader, [])
    bad = {"not.a.param": torch.zeros(1)}
    with pytest.raises(KeyError, match="mismatch"):
        ensembles.predict_probs(model, batch_loader, [bad])


def test_checkpoint_states_picks_the_last_checkpoints(tmp_path):
    for step in (50, 100, 150, 200):
        torch.save({"trainable": {"w": torch.tensor([float(step)])}}, tmp_path / f"step{step}.pt")
    (tmp_path / "stepx.pt.tmp").write_text("")
    last = ensembles.checkpoint_states(tmp_path, last=2)
    assert [s["w"].item() for s in last] == [150.0, 200.0]
    chosen = ensembles.checkpoint_states(tmp_path, steps=[50, 200])
    assert [s["w"].item() for s in chosen] == [50.0, 200.0]
    with pytest.raises(FileNotFoundError, match="step75"):
        ensembles.checkpoint_states(tmp_path, steps=[75])
    with pytest.raises(FileNotFoundError, match="no step"):
        ensembles.checkpoint_states(tmp_path / "empty")


def test_deep_ensemble_configs_vary_only_the_seed():
    cfg = FinetuneConfig(model="minilm", task="fine_foods", seed=2, data_seed=2, steps=100)
    members = ensembles.deep_ensemble_configs(cfg, m=3)
    assert members[0] is cfg
    assert [c.seed for c in members] == [2, 1002, 2002]
    assert {c.data_seed for c in members} == {2}
    assert len({c.run_dir for c in members}) == 3
    for c in members[1:]:
        same = {k: v for k, v in c.identity.items() if k != "seed"}
        assert same == {k: v for k, v in cfg.identity.items() if k != "seed"}
    with pytest.raises(ValueError, match="m >= 1"):
        ensembles.deep_ensemble_configs(cfg, m=0)


def test_blob_tuned_zero_shot_is_the_base_model_and_the_table_reads_the_rows(tmp_path):
    """The zero-shot row switches every adapter off (tiny Llama: the LoRA-free logits); the
    selection table shows each KL lr's validation row; the first runs are found by name."""
    from benchmarks import llm_blob_tuned as T
    from laplace_lora_ext.inputs import forward_logits

    model = tiny_llama()
    peft_model, batch = model.model, random_batch()
    probs = T.zero_shot_probs(peft_model, model, loader(batch, 4))
    with peft_model.disable_adapter():
        want = forward_logits(model, batch).softmax(-1)
    torch.testing.assert_close(probs, want.float())
    assert not torch.allclose(probs, forward_logits(model, batch).softmax(-1).float())
    val = {"acc": 0.5, "ece": 0.1, "nll": 0.7}
    rows = [{"kl_lr": 0.01, "val": val, "final_train_nll": 0.8, "median_sigma": 0.2}]
    table = T.selection_table("t", 0.01, rows)
    assert "chosen by validation NLL: 0.01" in table and "| 0.01 | 50.0 | 10.0 | 0.700 |" in table
    assert T.first_run("t", 0, tmp_path) is None
    run = {"checkpoints": {}, "cost": {}}
    (tmp_path / "llm_baselines_t_seed0.json").write_text(json.dumps({"runs": {"t": {"0": run}}}))
    assert T.first_run("t", 0, tmp_path) == run
