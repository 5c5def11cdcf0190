"""Evaluate a fitted Laplace-LoRA posterior: ACC, ECE, NLL, Brier and reliability diagrams.

* :func:`evaluate` runs a loader once and scores the fine-tuned model ("map") and any number
  of link approximations, from **one** GLM pass per batch
  (:meth:`~laplace_lora_ext.posterior.mixin.LoraLaplaceMixin.predictive_moments`).
* :func:`classification_metrics` scores given probabilities (your own predictions, or a
  peer method's).
* :func:`calibration_bins` and :func:`reliability_diagram` show where the ECE comes from,
  with the ECE's own binning.
* :func:`choice_token_ids` finds the vocabulary ids of answer choices (" A", " B", ...) for
  :class:`~laplace_lora_ext.LastTokenChoiceLM`, refusing choices that are not one token.

The ECE is torchmetrics' ``CalibrationError(task="multiclass", n_bins=15)`` (15 equal-width
bins of the top-class probability, L1), the convention of Laplace-LoRA's successors (BLoB,
BayesAdapt); it is reported as a fraction here (multiply by 100 for the papers' tables).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import tqdm

from . import guards
from .inputs import forward_logits, split_batch
from .links import LINK_APPROXIMATIONS, apply_link
from .options import check_int

__all__ = [
    "evaluate",
    "classification_metrics",
    "calibration_bins",
    "confidence_bin_index",
    "reliability_diagram",
    "choice_token_ids",
]

METRICS = ("acc", "ece", "nll", "brier", "conf", "n")
"""Keys of every metrics dict (``n``: the number of examples)."""

#: Probabilities are clamped here before the log (a saturated softmax).
NLL_FLOOR = 1e-12


# --------------------------------------------------------------------------- metrics


def _row_sum_tolerance(dtype: torch.dtype, n_classes: int) -> float:
    """How far a row of probabilities in ``dtype`` may sum from 1: ``1e-2`` (a bfloat16
    softmax over 4 classes was 2.7e-3 off, also after a cast to float32), or the rounding of
    ``n_classes`` terms in a low-precision float if larger. Logits and unnormalised scores
    miss by far more, or are negative."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-2, 2 * n_classes * eps)


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``probs`` ``(N, C)`` as float64 with rows renormalised to sum to 1 (within
    :func:`_row_sum_tolerance`) and ``labels`` ``(N,)`` as int64 (CPU)."""
    if not torch.is_tensor(probs) and hasattr(probs, "__array__"):  # a NumPy array
        probs = torch.as_tensor(probs)
    if not torch.is_tensor(probs) or probs.ndim != 2:
        raise ValueError(
            f"probs must be a (N, C) tensor of class probabilities, got "
            f"{tuple(probs.shape) if torch.is_tensor(probs) else type(probs).__name__}."
        )
    labels = torch.as_tensor(labels).reshape(-1).detach().cpu()
    N, C = probs.shape
    if C < 2:
        raise ValueError(
            f"probs must have one column per class (C >= 2), got shape {tuple(probs.shape)}; "
            "for a binary model with one probability p, pass torch.stack([1 - p, p], dim=-1)."
        )
    if N == 0 or len(labels) != N:
        raise ValueError(f"Need N > 0 examples and one label each; got {N} rows, {len(labels)}.")
    if (
        labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
        or int(labels.min()) < 0
        or int(labels.max()) >= C
    ):
        raise ValueError(f"labels must be integer class indices in 0..{C - 1}.")
    p = probs.detach().cpu().double()
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(
            "probs must be finite and non-negative; pass probabilities, not logits (apply "
            "torch.softmax(logits, dim=-1) first)."
        )
    off = float((p.sum(-1) - 1).abs().max())
    tol = _row_sum_tolerance(probs.dtype, C)
    if off > tol:
        raise ValueError(
            f"probs rows must sum to 1, but one is {off:.3g} off (tolerance {tol:.3g} for "
            f"{probs.dtype}); pass probabilities, not logits or unnormalised scores (apply "
            "torch.softmax(logits.float(), dim=-1) first)."
        )
    p = p / p.sum(-1, keepdim=True)  # rounding of a low-precision softmax
    return p, labels.long()


def calibration_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> dict[str, torch.Tensor]:
    """Per-bin accuracy, confidence and share of the examples, binned like the ECE.

    Examples are binned by their top-class probability into ``n_bins`` equal-width bins
    ``[k/n, (k+1)/n)``, exactly as torchmetrics' ``CalibrationError``, which puts a
    confidence of exactly 1.0 (a saturated softmax) into one extra slot: every tensor has
    ``n_bins + 1`` entries, the last for confidence 1.0. As there, the bin of an example is
    decided in float32. Then ``ECE = Σ_k prop[k] · |acc[k] - conf[k]|`` (torchmetrics
    averages in float32, so the two agree to about 1e-7).

    Args:
        probs: ``(N, C)`` class probabilities.
        labels: ``(N,)`` integer labels.
        n_bins: number of equal-width bins (an int >= 1).

    Returns:
        ``{"edges" (n_bins + 1,), "acc", "conf", "count", "prop"}``, the last four
        ``(n_bins + 1,)`` float64 (``acc`` and ``conf`` are 0 in empty bins).
    """
    check_int("n_bins", n_bins, minimum=1)
    p, y = _check_probs(probs, labels)
    confidence, predicted = p.max(dim=-1)
    correct = (predicted == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    index = confidence_bin_index(confidence, n_bins)
    count = torch.zeros(n_bins + 1, dtype=p.dtype).scatter_add_(0, index, torch.ones_like(p[:, 0]))
    conf = torch.zeros_like(count).scatter_add_(0, index, confidence)
    acc = torch.zeros_like(count).scatter_add_(0, index, correct)
    return {
        "edges": edges.double(),
        "acc": torch.nan_to_num(acc / count),
        "conf": torch.nan_to_num(conf / count),
        "count": count,
        "prop": count / count.sum(),
    }


def confidence_bin_index(confidence: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """The ECE bin of each top-class probability: ``(...,)`` -> ``(...,)`` int64 in
    ``0..n_bins`` (``n_bins``: a confidence of exactly 1.0), as in :func:`calibration_bins`."""
    # torchmetrics bins float32 confidences against float32 edges: same here, so that a
    # confidence next to an edge lands in the same bin as in the ECE
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    return torch.bucketize(confidence.float(), edges, right=True) - 1


def _expected_calibration_error(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> float:
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=p.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(p, y))


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> dict[str, float]:
    """Accuracy, ECE, NLL, Brier score and mean confidence of predicted probabilities.

    * ``acc``: fraction of examples whose most probable class is the label;
    * ``ece``: torchmetrics' ``CalibrationError(task="multiclass", n_bins=n_bins)``, L1,
      as a fraction (see :func:`calibration_bins`);
    * ``nll``: mean of ``-log p[label]`` (probabilities clamped at 1e-12 first);
    * ``brier``: mean over examples of ``Σ_c (p_c - 1[c = label])²``;
    * ``conf``: mean top-class probability (above ``acc``: over-confident);
    * ``n``: number of examples.

    Args:
        probs: ``(N, C)`` class probabilities (rows sum to one); computed in float64.
        labels: ``(N,)`` integer labels in ``0..C-1``.
        n_bins: ECE bins.

    Raises:
        ValueError: for logits instead of probabilities, or mismatched or bad labels.
    """
    check_int("n_bins", n_bins, minimum=1)
    p, y = _check_probs(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return {
        "acc": float((p.argmax(-1) == y).double().mean()),
        "ece": _expected_calibration_error(p, y, n_bins),
        "nll": float(-p.gather(1, y[:, None]).clamp_min(NLL_FLOOR).log().mean()),
        "brier": float((p - onehot).square().sum(-1).mean()),
        "conf": float(p.max(-1).values.mean()),
        "n": len(y),
    }


# --------------------------------------------------------------------------- evaluate


def _links(link_approx: str | Sequence[str]) -> tuple[str, ...]:
    links = (link_approx,) if isinstance(link_approx, str) else tuple(link_approx)
    bad = [link for link in links if link not in LINK_APPROXIMATIONS]
    if bad:
        raise ValueError(
            f"Unsupported link_approx {bad}; choose from {LINK_APPROXIMATIONS} (the fine-tuned "
            "model's own softmax is include_map=True, not a link)."
        )
    return tuple(dict.fromkeys(links))


def _batch_probs(
    la: Any,
    x: Any,
    methods: tuple[str, ...],
    n_samples: int | None,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """``{method: (B, C) probabilities}`` of one batch from one pass through the model."""
    links = [m for m in methods if m != "map"]
    if links:
        f_mu, f_var = la.predictive_moments(x)  # the one GLM pass of this batch
    else:  # the fine-tuned model alone: a plain forward (works before fit, too)
        with torch.no_grad():
            f_mu = forward_logits(la.model, x, la.dict_key_y).to(la._dtype)
    out = {}
    if "map" in methods:  # f_mu is the fine-tuned model's own logits
        out["map"] = torch.softmax(f_mu, dim=-1)
    for link in links:
        out[link] = apply_link(link, f_mu, f_var, n_samples, generator)
    return out


def _predict_probs(
    la: Any,
    loader: Iterable,
    link_approx: str | Sequence[str] = ("mc", "probit"),
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
    include_map: bool = True,
    progress_bar: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Class probabilities of every method on every example of ``loader``.

    Arguments as :func:`evaluate`. Returns ``({method: (N, C) probabilities}, labels (N,))``
    on the CPU, methods in the order ``"map"``, then ``link_approx``.
    """
    if not callable(getattr(la, "predictive_moments", None)):
        raise TypeError(
            f"evaluate needs a fitted subset_of_weights='lora' Laplace object, got "
            f"{type(la).__name__}; build it with laplace.Laplace(model, 'classification', "
            "subset_of_weights='lora', ...) and call fit first."
        )
    links = _links(link_approx)
    methods = (("map",) if include_map else ()) + links
    if not methods:
        raise ValueError("Nothing to evaluate: include_map=False and no link_approx given.")
    probs: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    labels: list[torch.Tensor] = []
    modes = {m: m.training for m in la.model.modules()}  # dropout off, restored after
    la.model.eval()
    try:
        for batch in tqdm.tqdm(loader, desc="[Evaluating]", disable=not progress_bar):
            x, y = split_batch(batch, la.dict_key_y, la._device)
            batch_probs = _batch_probs(la, x, methods, n_samples, generator)
            for method, p in batch_probs.items():
                probs[method].append(p.cpu())
            n_examples, n_classes = batch_probs[methods[0]].shape
            labels.append(guards.check_class_labels(y, n_examples, n_classes).cpu())
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not labels:
        raise ValueError("The loader yielded no batches; nothing to evaluate.")
    return {m: torch.cat(p) for m, p in probs.items()}, torch.cat(labels)


def evaluate(
    la: Any,
    loader: Iterable,
    link_approx: str | Sequence[str] = ("mc", "probit"),
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
    include_map: bool = True,
    progress_bar: bool = True,
    n_bins: int = 15,
    return_probs: bool = False,
) -> Any:
    """ACC, ECE, NLL, Brier and confidence of the fine-tuned model and the posterior.

    Each batch goes through the model once: :meth:`predictive_moments
    <laplace_lora_ext.posterior.mixin.LoraLaplaceMixin.predictive_moments>` gives the GLM
    logit mean and covariance, ``"map"`` is the softmax of that mean (the fine-tuned
    model's own prediction) and every link approximation is applied to the same moments.

    Args:
        la: a fitted ``subset_of_weights="lora"`` Laplace object (after ``fit`` and, usually,
            ``optimize_prior_precision``).
        loader: dict batches with labels under ``la.dict_key_y``, or ``(X, y)`` pairs.
        link_approx: one link or several, from ``"mc"`` (joint MC, the paper's),
            ``"probit"``, ``"mc_indep"``, ``"bridge"``, ``"bridge_norm"``.
        n_samples: Monte Carlo draws per example for ``"mc"`` / ``"mc_indep"``; ``None``
            (default): :func:`laplace_lora_ext.links.default_draws` (10,000 for up to 14
            classes), as ``la(x)`` draws.
        generator: random generator for reproducible Monte Carlo (on ``la``'s device).
        include_map: also score the fine-tuned model (key ``"map"``).
        progress_bar: show a tqdm progress bar over batches.
        n_bins: ECE bins.
        return_probs: also return the probabilities and labels (e.g. for
            :func:`reliability_diagram`).

    Returns:
        ``{method: {"acc", "ece", "nll", "brier", "conf", "n"}}`` (see
        :func:`classification_metrics`), methods ``"map"`` then the links in the given
        order. With ``return_probs=True``: ``(metrics, {method: probs (N, C)}, labels (N,))``.

    Raises:
        TypeError: if ``la`` is not a ``lora`` Laplace object.
        ValueError: for an unknown link, an ``n_samples`` or ``n_bins`` that is not an int
            ``>= 1``, ``n_samples`` or ``generator`` with no sampling link (``"mc"``,
            ``"mc_indep"``), or an empty loader.
        AttributeError: if ``la`` has not been fitted.
    """
    if n_samples is not None:
        guards.check_n_samples(n_samples)
    check_int("n_bins", n_bins, minimum=1)  # before the model runs over the whole loader
    _refuse_unused_sampling(link_approx, n_samples, generator)
    probs, labels = _predict_probs(
        la, loader, link_approx, n_samples, generator, include_map, progress_bar
    )
    metrics = {m: classification_metrics(p, labels, n_bins) for m, p in probs.items()}
    return (metrics, probs, labels) if return_probs else metrics


def _refuse_unused_sampling(
    link_approx: str | Sequence[str], n_samples: int | None, generator: Any
) -> None:
    """Refuse ``n_samples`` / ``generator`` when no link in ``link_approx`` draws samples
    (only ``"mc"`` and ``"mc_indep"`` do); they would be ignored."""
    links = (link_approx,) if isinstance(link_approx, str) else tuple(link_approx)
    given = [k for k, v in (("n_samples", n_samples), ("generator", generator)) if v is not None]
    if given and not any(str(link).startswith("mc") for link in links):
        raise ValueError(
            f"evaluate(link_approx={link_approx!r}) draws no samples, so {given} would be "
            "ignored; drop them, or add 'mc' (or 'mc_indep') to link_approx."
        )


# --------------------------------------------------------------------------- plots


def reliability_diagram(
    probs: torch.Tensor,
    labels: torch.Tensor,
    ax: Any = None,
    n_bins: int = 15,
    title: str | None = None,
) -> Any:
    """Accuracy against confidence per bin, with the ECE's binning (matplotlib).

    Bars: the accuracy of each of the ``n_bins`` equal-width confidence bins (empty bins
    are left out), drawn over the bin; dots: the bin's mean confidence; the diagonal is
    perfect calibration. Bars below the diagonal are over-confident. Examples with a
    confidence of exactly 1.0, which the ECE bins on their own (see
    :func:`calibration_bins`), are a separate marker at confidence 1. The legend gives the
    ECE (:func:`classification_metrics`).

    Args:
        probs: ``(N, C)`` class probabilities.
        labels: ``(N,)`` integer labels.
        ax: matplotlib axes to draw on (default: a new figure).
        n_bins: number of bins (use the ECE's, 15).
        title: axes title.

    Returns:
        The matplotlib axes.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is in the dev/bench extras
        raise ImportError(
            'reliability_diagram needs matplotlib: pip install matplotlib (or ".[bench]").'
        ) from err
    bins = calibration_bins(probs, labels, n_bins)
    ece = classification_metrics(probs, labels, n_bins)["ece"]
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    full = bins["count"][:n_bins] > 0
    left, width = bins["edges"][:-1][full], 1.0 / n_bins
    ax.bar(
        left,
        bins["acc"][:n_bins][full],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label=f"accuracy (ECE {100 * ece:.1f})",
    )
    ax.plot(
        left + width / 2,
        bins["conf"][:n_bins][full],
        "o",
        color="C3",
        ms=3,
        label="mean confidence",
    )
    if bins["count"][n_bins] > 0:
        ax.plot(
            [1.0],
            [float(bins["acc"][n_bins])],
            "s",
            color="C1",
            label=f"confidence = 1 ({int(bins['count'][n_bins])} ex.)",
        )
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize="small")
    return ax


# --------------------------------------------------------------------------- choice tokens


def choice_token_ids(
    tokenizer: Any,
    choices: Sequence[str],
    context: str = "Answer:",
    leading_space: bool = True,
) -> list[int]:
    """Vocabulary ids of the answer choices, one token each, in class order.

    The id of a choice is the token that follows ``context`` in ``context + " " + choice``
    (the prompt ends in ``"Answer:"`` and the model's next token is the answer). Reading it
    from the tokenised continuation handles both conventions for the leading space: BPE
    vocabularies (GPT-2, Llama 3, SmolLM2) have a token ``"ĠA"``; SentencePiece ones
    (Llama 2, Mistral) split a bare ``" A"`` into ``["▁", "▁A"]`` but give ``"▁A"`` after
    text.

    Args:
        tokenizer: a Hugging Face tokenizer.
        choices: the answer strings, e.g. ``["A", "B"]`` or ``["yes", "no"]``.
        context: the end of the prompt the answer follows.
        leading_space: put a space between ``context`` and the choice (a choice that
            already starts with a space, or a ``context`` that ends in whitespace, is used
            as given: after ``"Answer: "`` the answer is ``"A"``, not ``" A"``; byte-level
            BPE merges that space into the answer and gets the merge error below).

    Returns:
        One token id per choice, for
        :class:`LastTokenChoiceLM(model, target_ids=...) <laplace_lora_ext.LastTokenChoiceLM>`.

    Raises:
        ValueError: if a choice is not exactly one token after ``context`` (its first-token
            logit would then not be the choice's probability: pick single-token choices such
            as letters), if the tokenizer merges the choice with ``context``, or if two
            choices give the same token.
    """
    if isinstance(choices, str) or len(choices) < 2:
        raise ValueError(f"choices must be a list of at least two strings, got {choices!r}.")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"Every choice must be a non-empty string, got {list(choices)!r}.")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    prefix = encode(context)
    ids = []
    for choice in choices:
        spaced = leading_space and not choice.startswith(" ") and not context[-1:].isspace()
        text = " " + choice if spaced else choice
        full = encode(context + text)
        tokens = full[len(prefix) :]
        if full[: len(prefix)] != prefix:
            hint = (
                " A prompt that ends in whitespace leaves a lone space token the model "
                "rarely saw before an answer: end the prompt (and context) at 'Answer:'."
                if context[-1:].isspace()
                else ""
            )
            raise ValueError(
                f"The tokenizer merges choice {choice!r} with the context {context!r} "
                f"({prefix} vs {full}); pass the exact end of your prompt as context=.{hint}"
            )
        if len(tokens) != 1:
            raise ValueError(
                f"Choice {choice!r} is {len(tokens)} tokens {tokens} after {context!r} for this "
                "tokenizer, not one: its next-token logit would not be the choice's "
                "probability. Use single-token choices (e.g. letters 'A', 'B')."
            )
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"Choices {list(choices)} map to repeated token ids {ids}.")
    return ids
