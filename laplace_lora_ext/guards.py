"""Guards against silent corruption: non-finite values, bad scalars, half-done fits, modes.

* :class:`NonFiniteError` and :func:`check_finite` / :func:`check_finite_curvature`: NaN or
  inf in logits, layer inputs, output gradients or curvature is reported *before* any
  decomposition (laplace-torch's ``symeig`` calls ``exit()`` on NaN factors).
* :func:`check_positive` (prior precision, temperature) and :func:`check_n_samples`.
* :func:`check_labels`: integer class-index tensors only; :func:`check_class_labels` also
  checks one label per example, each in ``0..C-1``.
* :func:`restore_on_error`: a ``fit`` that raises leaves the previous posterior intact.
* :func:`eval_mode`: fit and predict with dropout off, restoring the caller's modes.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "NonFiniteError",
    "check_finite",
    "check_all_finite",
    "check_finite_curvature",
    "check_positive",
    "check_n_samples",
    "check_labels",
    "check_class_labels",
    "restore_on_error",
    "eval_mode",
    "check_finite_saved",
    "warn_if_mean_differs",
]


class NonFiniteError(ValueError):
    """NaN or inf in the model's outputs, its LoRA layers' inputs or gradients, or the
    curvature. Fix the data or the model (a NaN embedding row, an overflow in float16, a
    diverged fine-tune): the Laplace approximation of a non-finite model is undefined."""


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` has a NaN or inf (names how many, and
    which examples when ``tensor`` is batched along dim 0)."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = (~finite).sum().item()
    where = ""
    if tensor.ndim > 1:
        rows = (~finite).reshape(tensor.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        where = f" in example(s) {rows[:10]}{'...' if len(rows) > 10 else ''} of the batch"
    raise NonFiniteError(
        f"{name} contain {bad} NaN/inf value(s){where}. The Laplace approximation needs a "
        "finite model: check the inputs and the weights (e.g. a NaN embedding row, float16 "
        "overflow, a diverged fine-tune)."
    )


def check_all_finite(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """:func:`check_finite` on several ``(name, tensor)`` pairs with one device sync when
    all are finite (the common case)."""
    named = [(n, t) for n, t in named if t.numel() > 0]
    if not named:
        return
    device = named[0][1].device
    # max and min propagate NaN and reach ±inf: two reductions, no (numel,) bool temporary
    extremes = [x.to(device) for _, t in named for x in (t.amax(), t.amin())]
    if bool(torch.isfinite(torch.stack(extremes)).all()):
        return
    for name, t in named:
        check_finite(name, t)


def _curvature_tensors(H: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(H, torch.Tensor):
        yield "curvature", H
        return
    kfacs = getattr(H, "kfacs", None)
    if kfacs is None:
        return
    for i, F in enumerate(kfacs):
        for j, M in enumerate(F):
            if isinstance(M, torch.Tensor):
                yield f"Kronecker factor {j} of block {i}", M
            else:  # LowRankFactor: its stored tensors, without forcing a compression
                for t in M.stored_tensors():
                    yield f"low-rank Kronecker factor {j} of block {i}", t


def check_finite_curvature(H: Any, loss: Any = None) -> None:
    """:func:`check_finite` on a curvature (tensor, ``Kron``, ``LowRankKron``) and a loss."""
    if isinstance(loss, torch.Tensor):
        check_finite("The loss values", loss)
    elif isinstance(loss, float) and not torch.isfinite(torch.tensor(loss)):
        raise NonFiniteError(f"The loss is {loss}.")
    check_all_finite((f"The entries of the {name}", t) for name, t in _curvature_tensors(H))


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool):
        raise TypeError(f"Expected a number or a float tensor, got {value!r}.")
    if isinstance(value, numbers.Real) or torch.is_tensor(value):
        return torch.as_tensor(value).detach()
    raise TypeError(f"Expected a number or a tensor, got {type(value).__name__} {value!r}.")


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless every entry of ``value`` is finite and ``> 0``.

    Raises:
        TypeError: ``value`` is not a real number or a (non-bool) tensor.
        ValueError: an entry is ``<= 0``, NaN or inf.
    """
    try:
        t = _as_tensor(value)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
    if t.is_complex() or not bool((torch.isfinite(t) & (t > 0)).all()):
        shown = t.tolist() if t.numel() <= 8 else f"a tensor with {t.numel()} entries"
        raise ValueError(
            f"{name} must be finite and > 0, got {shown}. A zero, negative, NaN or inf value "
            "gives an improper posterior."
        )


def check_autograd_available(call: str) -> None:
    """Raise a ``RuntimeError`` naming ``call`` inside ``torch.inference_mode()``: the
    curvature, the GLM predictive and the prior searches take gradients, which inference
    mode switches off for good (``torch.no_grad()`` is fine: they turn gradients on)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{call} takes gradients with respect to the LoRA weights (or the prior), which "
            "torch.inference_mode() switches off. Call it outside inference_mode; "
            "torch.no_grad() is fine (gradients are turned on where they are needed)."
        )


def check_n_samples(n_samples: Any) -> int:
    """Return ``n_samples`` if it is an int ``>= 1`` (``bool`` refused)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}.")
    return int(n_samples)


def check_labels(y: Any) -> torch.Tensor:
    """The labels of one batch as a tensor; integer class indices only.

    Raises:
        TypeError: ``y`` is not a tensor (e.g. a list the collate left alone), or is bool,
            float or complex.
    """
    if not torch.is_tensor(y):
        raise TypeError(
            f"Labels must be a tensor of integer class indices (shape (B,)), got "
            f"{type(y).__name__}. Use the default collate (or torch.tensor(labels)) so that "
            "each batch holds a LongTensor."
        )
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(
            f"Classification labels must be integer class indices, got dtype {y.dtype}; "
            "convert them with labels.long()."
        )
    return y


def check_class_labels(y: Any, n_examples: int, n_classes: int) -> torch.Tensor:
    """The labels of one batch as ``(B,)`` int64 class indices, one per example, in
    ``0..n_classes-1``.

    Raises:
        TypeError: as :func:`check_labels`.
        ValueError: not one label per example (per-token language-modelling labels, for
            instance), or a label outside ``0..n_classes-1`` (such as Hugging Face's
            ignore index -100).
    """
    y = check_labels(y)
    if y.numel() != n_examples:
        hint = (
            " Per-token labels (as for language modelling) are not supported: the posterior "
            "predicts one class per example; for answer tokens of a causal LM wrap it in "
            "LastTokenChoiceLM and label each example with its answer's index."
            if y.ndim > 1
            else ""
        )
        raise ValueError(
            f"Got labels of shape {tuple(y.shape)} for a batch of {n_examples} examples; give "
            f"one class index per example (shape ({n_examples},)).{hint}"
        )
    y = y.reshape(-1).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        hint = (
            " -100 is Hugging Face's ignore index: every example needs a class label, so "
            "drop the unlabelled ones."
            if bool((y == -100).any())
            else ""
        )
        raise ValueError(
            f"Labels out of range: found values in [{int(y.min())}, {int(y.max())}] but the "
            f"model has {n_classes} outputs (valid labels are 0..{n_classes - 1}).{hint}"
        )
    return y


@contextlib.contextmanager
def restore_on_error(obj: Any, names: Iterable[str]) -> Iterator[None]:
    """On an exception inside the block, put back ``obj``'s attributes ``names`` as they
    were (references: the block must rebind, not mutate, them); absent ones are removed."""
    missing = object()
    saved = {n: obj.__dict__.get(n, missing) for n in names}
    try:
        yield
    except BaseException:
        for n, v in saved.items():
            if v is missing:
                obj.__dict__.pop(n, None)
            else:
                obj.__dict__[n] = v
        raise


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with every submodule of ``model`` in eval mode (dropout off) and put
    back each submodule's own ``training`` flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _nested_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _nested_tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _nested_tensors(x)
    elif callable(getattr(obj, "stored_tensors", None)):  # LowRankFactor (no compression)
        yield from _nested_tensors(obj.stored_tensors())


def check_finite_saved(state_dict: dict[str, Any]) -> None:
    """NaN/inf in a saved posterior's ``mean``, ``H`` or prior is a :class:`NonFiniteError`."""
    for key in ("mean", "H", "prior_precision", "prior_mean"):
        for t in _nested_tensors(state_dict.get(key)):
            if t.is_floating_point():
                check_finite(f"The saved posterior's {key!r} entries", t.reshape(-1))


def warn_if_mean_differs(mean: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Warn when ``mean`` (a loaded posterior's) is not the model's current ``params``."""
    current = torch.cat([p.detach().reshape(-1) for p in params]).to(mean)
    diff = float((current - mean.reshape(-1)).norm())
    scale = float(mean.norm()) + 1e-12
    if diff > 1e-6 * scale:
        warnings.warn(
            f"The loaded posterior's mean differs from the model's current LoRA weights "
            f"(relative difference {diff / scale:.3g}): it was fitted at other weights, while "
            "predictions linearise around the current ones. Load the adapter the posterior "
            "was fitted for, or refit.",
            UserWarning,
            stacklevel=3,
        )
