"""The public evaluation API against hand-computed metrics, torchmetrics and laplace-torch."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from laplace_lora_ext import (
    calibration_bins,
    choice_token_ids,
    classification_metrics,
    evaluate,
    reliability_diagram,
)
from tests.models import loader, lora_laplace, random_batch, tiny_llama

# five examples, three classes; confidences kept away from the bin edges k/15
PROBS = torch.tensor(
    [
        [0.95, 0.03, 0.02],  # y=0 right, conf .95 -> bin 14
        [0.62, 0.30, 0.08],  # y=1 wrong, conf .62 -> bin 9
        [0.20, 0.71, 0.09],  # y=1 right, conf .71 -> bin 10
        [0.10, 0.07, 0.83],  # y=0 wrong, conf .83 -> bin 12
        [0.65, 0.25, 0.10],  # y=0 right, conf .65 -> bin 9
    ]
)
LABELS = torch.tensor([0, 1, 1, 0, 0])


def test_metrics_by_hand():
    m = classification_metrics(PROBS, LABELS)
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["conf"] == pytest.approx((0.95 + 0.62 + 0.71 + 0.83 + 0.65) / 5)
    nll = -(math.log(0.95) + math.log(0.30) + math.log(0.71) + math.log(0.10) + math.log(0.65))
    assert m["nll"] == pytest.approx(nll / 5)
    brier = [
        0.05**2 + 0.03**2 + 0.02**2,
        0.62**2 + 0.70**2 + 0.08**2,
        0.20**2 + 0.29**2 + 0.09**2,
        0.90**2 + 0.07**2 + 0.83**2,
        0.35**2 + 0.25**2 + 0.10**2,
    ]
    assert m["brier"] == pytest.approx(sum(brier) / 5)
    # bins: {.95: right} {.62 wrong, .65 right} {.71 right} {.83 wrong}
    gaps = [1 * abs(1 - 0.95), 2 * abs(0.5 - 0.635), 1 * abs(1 - 0.71), 1 * abs(0 - 0.83)]
    assert m["ece"] == pytest.approx(sum(gaps) / 5)
    assert m["n"] == 5


def test_bins_by_hand_and_confidence_one_slot():
    probs = torch.cat([PROBS, torch.tensor([[0.0, 1.0, 0.0]])])
    labels = torch.cat([LABELS, torch.tensor([2])])
    bins = calibration_bins(probs, labels)
    assert bins["count"].tolist() == [0] * 9 + [2, 1, 0, 1, 0, 1, 1]
    assert bins["acc"][9] == pytest.approx(0.5) and bins["conf"][9] == pytest.approx(0.635)
    assert bins["count"][15] == 1 and bins["acc"][15] == 0 and bins["conf"][15] == 1


@pytest.mark.parametrize("n_bins", [0, -1, 2.5, True])
def test_bins_refuse_a_bin_count_that_is_not_a_positive_int(n_bins):
    with pytest.raises(ValueError, match="n_bins must be an int >= 1"):
        calibration_bins(PROBS, LABELS, n_bins=n_bins)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_bins_reproduce_torchmetrics_ece(n_classes):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, n_classes, generator=gen), dim=-1)
    probs[:5] = torch.nn.functional.one_hot(torch.arange(5) % n_classes, n_classes).double()
    labels = torch.randint(0, n_classes, (200,), generator=gen)
    bins = calibration_bins(probs, labels)
    ece = (bins["prop"] * (bins["acc"] - bins["conf"]).abs()).sum()
    reference = MulticlassCalibrationError(num_classes=n_classes, n_bins=15)(probs, labels)
    assert float(ece) == pytest.approx(float(reference), abs=1e-6)  # torchmetrics: float32
    assert classification_metrics(probs, labels)["ece"] == pytest.approx(float(reference))


def test_metrics_take_a_low_precision_softmax_and_refuse_unnormalised_rows():
    """A bfloat16 softmax's rows are a few 1e-3 off 1 (also cast to float32): accepted and
    renormalised; rows 5 % off are refused with the deviation in the message."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, generator=gen)
    labels = torch.randint(0, 4, (64,), generator=gen)
    probs = torch.softmax(logits.bfloat16(), dim=-1)
    assert float((probs.double().sum(-1) - 1).abs().max()) > 1e-3
    exact = probs.double() / probs.double().sum(-1, keepdim=True)
    for p in (probs, probs.float()):
        got = classification_metrics(p, labels)
        assert got == pytest.approx(classification_metrics(exact, labels))
    with pytest.raises(ValueError, match="sum to 1, but one is 0.05 off"):
        classification_metrics(exact * 1.05, labels)


def test_metrics_take_numpy_probabilities_and_check_bins_and_columns():
    probs = torch.softmax(torch.randn(20, 3, generator=torch.Generator().manual_seed(1)), -1)
    labels = torch.arange(20) % 3
    got = classification_metrics(probs.numpy(), labels.numpy())
    assert got == pytest.approx(classification_metrics(probs, labels))
    for bad in (True, 0, 2.5):
        with pytest.raises(ValueError, match="n_bins"):
            classification_metrics(probs, labels, n_bins=bad)
    with pytest.raises(ValueError, match="C >= 2"):
        classification_metrics(probs[:, :1], torch.zeros(20, dtype=torch.long))


def test_metrics_reject_logits_and_bad_labels():
    with pytest.raises(ValueError, match="not logits"):
        classification_metrics(torch.log(PROBS), LABELS)
    with pytest.raises(ValueError, match="one label each"):
        classification_metrics(PROBS, LABELS[:3])
    with pytest.raises(ValueError, match="0..2"):
        classification_metrics(PROBS, LABELS + 2)
    with pytest.raises(ValueError, match="integer class indices"):  # as fit and evaluate
        classification_metrics(PROBS[:2, :2], torch.tensor([True, False]))


# --------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def fitted():
    model = tiny_llama()
    data = loader(random_batch(n=9, seed=3), batch_size=4)  # batches of 4, 4, 1
    la = lora_laplace(model, "kron", prior_precision=0.5)
    la.fit(data)
    return la, data


def manual_probs(la, data, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {"map": [], "mc": [], "probit": []}
    for batch in data:
        with torch.no_grad():
            out["map"].append(torch.softmax(la.model(batch), dim=-1))
        out["mc"].append(la(batch, link_approx="mc", n_samples=50, generator=gen))
        out["probit"].append(la(batch, link_approx="probit"))
    labels = torch.cat([b["labels"] for b in data])
    return {k: torch.cat(v) for k, v in out.items()}, labels


def test_evaluate_equals_metrics_of_each_method(fitted):
    la, data = fitted
    gen = torch.Generator().manual_seed(7)
    metrics, probs, labels = evaluate(
        la, data, n_samples=50, generator=gen, progress_bar=False, return_probs=True
    )
    expected, expected_labels = manual_probs(la, data, seed=7)
    assert list(metrics) == ["map", "mc", "probit"]
    assert torch.equal(labels, expected_labels)
    for method in metrics:
        assert torch.allclose(probs[method], expected[method], atol=1e-12)
        assert metrics[method] == pytest.approx(
            classification_metrics(expected[method], labels), abs=1e-12
        )


def test_evaluate_one_model_pass_per_batch(fitted):
    la, data = fitted
    calls = {"forward": 0, "moments": 0}
    hook = la.model.register_forward_hook(
        lambda *_: calls.__setitem__("forward", calls["forward"] + 1)
    )
    original = la.predictive_moments

    def counted(x):
        calls["moments"] += 1
        return original(x)

    la.predictive_moments = counted
    try:
        evaluate(la, data, link_approx=("mc", "probit", "bridge"), n_samples=10, progress_bar=False)
        assert calls == {"forward": 3, "moments": 3}
        calls.update(forward=0, moments=0)
        result = evaluate(la, data, link_approx=(), progress_bar=False)  # MAP only
        assert list(result) == ["map"] and calls == {"forward": 3, "moments": 0}
    finally:
        hook.remove()
        del la.predictive_moments


def test_evaluate_errors(fitted):
    la, data = fitted
    with pytest.raises(ValueError, match="Unsupported link_approx"):
        evaluate(la, data, link_approx="map", progress_bar=False)
    with pytest.raises(TypeError, match="subset_of_weights='lora'"):
        evaluate(la.model, data, progress_bar=False)
    with pytest.raises(ValueError, match="no batches"):
        evaluate(la, [], progress_bar=False)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
            evaluate(la, data, n_samples=bad, progress_bar=False)
    for bad in (0, 2.5, True):  # refused before the model runs over the loader
        with pytest.raises(ValueError, match="n_bins must be an int >= 1"):
            evaluate(la, [object()], n_bins=bad, progress_bar=False)
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        evaluate(la, data, link_approx=(), include_map=False, progress_bar=False)
    gen = torch.Generator().manual_seed(0)
    for kwargs in ({"n_samples": 5}, {"generator": gen}):
        with pytest.raises(ValueError, match="draws no samples.*would be ignored"):
            evaluate(la, [object()], link_approx=("probit", "bridge"), **kwargs)
    evaluate(la, data, link_approx=("probit", "mc_indep"), n_samples=5, progress_bar=False)


def test_predictive_moments_is_the_glm_predictive(fitted):
    la, data = fitted
    batch = next(iter(data))
    f_mu, f_var = la.predictive_moments(batch)
    mu2, var2 = la._glm_predictive_distribution(batch)
    assert f_mu.shape == (4, 3) and f_var.shape == (4, 3, 3)
    assert torch.equal(f_mu, mu2) and torch.equal(f_var, var2)
    with torch.no_grad():
        assert torch.allclose(f_mu, la.model(batch), atol=1e-12)
    assert torch.allclose(f_var, f_var.transpose(1, 2))


def test_laplace_torch_validate_works(fitted):
    import torchmetrics
    from laplace.utils import validate
    from laplace.utils.utils import get_nll

    la, data = fitted
    ours = evaluate(la, data, link_approx="probit", include_map=False, progress_bar=False)
    nll = validate(la, data, get_nll, link_approx="probit")
    assert nll == pytest.approx(ours["probit"]["nll"], rel=1e-9)
    acc = validate(la, data, torchmetrics.Accuracy("multiclass", num_classes=3))
    assert acc == pytest.approx(ours["probit"]["acc"], rel=1e-6)
    assert math.isfinite(validate(la, data, get_nll, pred_type="nn", link_approx="mc", n_samples=3))


# --------------------------------------------------------------------------- plots


def test_reliability_diagram_bars_are_the_ece_bins():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = torch.cat([PROBS, torch.tensor([[0.0, 1.0, 0.0]])])
    labels = torch.cat([LABELS, torch.tensor([1])])
    ax = reliability_diagram(probs, labels)
    bins = calibration_bins(probs, labels)
    bars = sorted(ax.patches, key=lambda r: r.get_x())
    full = torch.nonzero(bins["count"][:15]).flatten()
    assert [round(r.get_x() * 15) for r in bars] == full.tolist()
    assert [r.get_height() for r in bars] == pytest.approx(bins["acc"][full].tolist())
    assert all(r.get_width() == pytest.approx(1 / 15) for r in bars)
    ece = classification_metrics(probs, labels)["ece"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"ECE {100 * ece:.1f}" in t for t in legend)
    assert any("confidence = 1" in t for t in legend)
    plt.close(ax.figure)


# --------------------------------------------------------------------------- choice tokens


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "Answer", ":", "A", "B", "yes", "no"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def byte_level_bpe():
    """A GPT-2-style byte-level BPE trained on a few prompts (" A" is one token "ĠA")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["Answer: A", "Answer: B", "Answer: yes"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


class SentencePieceLike:
    """Mimics Llama 2's tokenizer: a bare " A" is ["▁", "▁A"], after text it is ["▁A"]."""

    vocab = {"▁": 0, "▁A": 1, "▁B": 2, "▁Answer": 3, ":": 4, "▁ma": 5, "ybe": 6}

    def __call__(self, text, add_special_tokens=True):
        pieces = {
            " A": ["▁", "▁A"],
            "Answer:": ["▁Answer", ":"],
            "Answer: A": ["▁Answer", ":", "▁A"],
            "Answer: B": ["▁Answer", ":", "▁B"],
            "Answer: maybe": ["▁Answer", ":", "▁ma", "ybe"],
        }[text]
        return {"input_ids": [self.vocab[p] for p in pieces]}


def test_choice_token_ids_word_and_bpe():
    words = word_tokenizer()
    assert choice_token_ids(words, ["A", "B"]) == [3, 4]
    assert choice_token_ids(words, [" yes", "no"]) == [5, 6]
    bpe = byte_level_bpe()
    ids = choice_token_ids(bpe, ["A", "B"])
    assert bpe.convert_ids_to_tokens(ids) == ["ĠA", "ĠB"]
    assert ids == [bpe(s, add_special_tokens=False)["input_ids"][0] for s in (" A", " B")]


def test_choice_token_ids_sentencepiece_convention():
    sp = SentencePieceLike()
    assert len(sp(" A")["input_ids"]) == 2  # what a bare tokenizer(" A")[-1] papers over
    assert choice_token_ids(sp, ["A", "B"]) == [1, 2]
    with pytest.raises(ValueError, match="'maybe' is 2 tokens"):
        choice_token_ids(sp, ["A", "maybe"])


def test_choice_token_ids_errors():
    bpe = byte_level_bpe()
    with pytest.raises(ValueError, match="not one"):
        choice_token_ids(bpe, ["A", "zebra"])
    with pytest.raises(ValueError, match="repeated"):
        choice_token_ids(word_tokenizer(), ["A", "A"])
    with pytest.raises(ValueError, match="at least two"):
        choice_token_ids(word_tokenizer(), "AB")


def test_choice_token_ids_after_a_context_ending_in_a_space():
    """After ``"Answer: "`` the answer is ``"A"``; before, the default leading space scored
    ``"Answer:  A"`` and silently returned the ids of ``" A"``. Byte-level BPE merges the
    prompt's trailing space into the answer, so that prompt is refused with a hint; a word
    tokenizer, which keeps the two apart, gives the answer's ids."""
    with pytest.raises(ValueError, match="merges choice 'A'.*end the prompt"):
        choice_token_ids(byte_level_bpe(), ["A", "B"], context="Answer: ")
    assert choice_token_ids(word_tokenizer(), ["A", "B"], context="Answer: ") == [3, 4]
    with pytest.raises(ValueError, match="non-empty string"):
        choice_token_ids(word_tokenizer(), ["A", ""])
