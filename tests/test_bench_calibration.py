"""Fast tests of the calibration benchmark's own logic (benchmarks/calibration.py,
benchmarks/ablation.py): argument defaults and checks, one-pass multi-link prediction,
aggregation. No offline assets are needed."""

from __future__ import annotations

import pytest
import torch

from benchmarks import ablation, calibration
from laplace_lora_ext.testing import perturb_lora_B
from tests.models import loader, lora_laplace, random_batch, tiny_llama


def test_defaults_follow_the_model():
    minilm = calibration.parse([])
    assert (minilm.model, minilm.task, minilm.lr) == ("minilm", "fine_foods", 2e-3)
    smol = calibration.parse(["--model", "smollm2"])
    assert (smol.task, smol.lr) == ("fine_foods_mc", 1e-3)
    assert calibration.parse(["--lr", "5e-5"]).lr == 5e-5
    assert smol.early_methods == list(calibration.EARLY_METHODS)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "minilm", "--task", "strategyqa"], "does not fit model"),
        (["--methods", "map,la_full"], "unknown methods"),
        (["--early-methods", "la_kfac"], "unknown methods"),
    ],
)
def test_bad_arguments_are_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        calibration.parse(argv)
    assert match in capsys.readouterr().err


def test_ablation_rejects_unknown_variant(capsys):
    with pytest.raises(SystemExit):
        ablation.parse(["--variants", "kron,kron_bogus"])
    assert "kron_bogus" in capsys.readouterr().err
    args = ablation.parse(["--variants", "kron,diag", "--model", "smollm2"])
    assert args.variants == ["kron", "diag"] and args.task == "fine_foods_mc"


def test_predict_applies_every_link_to_one_predictive():
    model = tiny_llama()
    perturb_lora_B(model)
    batch = random_batch(n=6)
    la = lora_laplace(model)
    la.fit(loader(batch, 3))
    probs = calibration.predict(la, loader(batch, 3), ("mc", "probit"), n_samples=50, seed=3)
    assert set(probs) == {"mc", "probit"}
    direct = torch.cat([la(b, link_approx="probit") for b in loader(batch, 3)]).float()
    torch.testing.assert_close(probs["probit"], direct)
    gen = torch.Generator().manual_seed(3)
    mc_direct = []
    for b in loader(batch, 3):  # same order of generator draws as predict()
        mc_direct.append(la(b, link_approx="mc", n_samples=50, generator=gen).float())
        la(b, link_approx="probit")  # draws nothing
    torch.testing.assert_close(probs["mc"], torch.cat(mc_direct))


def _metrics(acc: float, ece: float) -> dict:
    return {"acc": acc, "ece": ece, "nll": 0.5, "brier": 0.3, "conf": 0.7}


def test_aggregate_mean_std_over_seeds_and_missing_early_methods():
    runs = {
        "args": {},
        "runs": {
            s: {
                "steps": {
                    50: {"map": _metrics(0.5 + s / 10, 0.2), "_timings": {}},
                    100: {"map": _metrics(0.8, 0.1 * s), "la_kron": _metrics(0.8, 0.05)},
                }
            }
            for s in (0, 1, 2)
        },
    }
    agg = calibration.aggregate(runs)
    assert set(agg[50]) == {"map"} and set(agg[100]) == {"map", "la_kron"}
    mean, std = agg[50]["map"]["acc"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    table = calibration.markdown_table(agg, 100, 3)
    assert "| la_kron | 80.0 ± 0.0 | 5.0 ± 0.0 |" in table


def test_init_prior_mean_follows_la_params_order():
    model = tiny_llama(lm_head=True)
    perturb_lora_B(model)
    batch = random_batch(n=4)
    la = lora_laplace(model)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    centre = ablation.init_prior_mean(la, model, state)
    flat = torch.nn.utils.parameters_to_vector(la.params).detach()
    torch.testing.assert_close(centre, flat.to(centre.dtype))
    la.prior_mean = centre
    la.fit(loader(batch, 2))
    assert float(la.scatter) == 0.0  # prior centred at the MAP: no distance term
