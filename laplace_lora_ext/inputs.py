"""Batch handling: splitting HF dict batches and ``(X, y)`` tuples, forward to logits."""

from __future__ import annotations

import inspect
import os
import traceback
import weakref
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "split_batch",
    "to_device",
    "model_inputs",
    "forward_logits",
    "call_model",
    "is_hf_model",
    "attention_mask_of",
]

Batch = torch.Tensor | MutableMapping[str, Any]


def split_batch(
    batch: Any, dict_key_y: str = "labels", device: torch.device | None = None
) -> tuple[Batch, torch.Tensor]:
    """Split a loader item into inputs and integer labels ``(B,)``.

    Accepts an HF dict batch (labels under ``dict_key_y``) or an ``(X, y)`` pair.
    """
    if isinstance(batch, Mapping):
        if dict_key_y not in batch:
            raise ValueError(
                f"Dict batch has no labels under key {dict_key_y!r} (keys: {sorted(batch)}); "
                "pass dict_key_y=... to Laplace or add the labels to the batch."
            )
        x = to_device(batch, device)
        return x, x[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        return to_device(x, device), to_device(y, device)
    raise TypeError(
        f"Unsupported batch type {type(batch).__name__}: the loader must yield dict batches "
        "(with labels) or (X, y) pairs."
    )


def to_device(x: Any, device: torch.device | str | None) -> Any:
    """``x`` on ``device``: a tensor moved, a dict batch (an ``(X, y)`` pair's ``X`` too)
    with its tensor values moved; anything else, ``device=None``, or a batch already there,
    returned as it is (the same object)."""
    if device is None:
        return x
    device = torch.device(device)
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, Mapping) and any(
        torch.is_tensor(v) and v.device != device for v in x.values()
    ):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in x.items()}
    return x


def model_inputs(x: Batch, dict_key_y: str = "labels") -> Batch:
    """Inputs to pass to the model: a dict without the labels, or the tensor itself."""
    if isinstance(x, Mapping):
        return {k: v for k, v in x.items() if k != dict_key_y}
    return x


def attention_mask_of(x: Batch) -> torch.Tensor | None:
    """The ``attention_mask`` ``(B, T)`` of a dict batch, if any."""
    if isinstance(x, Mapping):
        return x.get("attention_mask")
    return None


def forward_logits(
    model: nn.Module,
    x: Batch,
    dict_key_y: str = "labels",
    model_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Run ``model`` on a batch and return logits ``(B, C)``.

    The call follows laplace-torch (see :func:`call_model`): an arbitrary ``nn.Module``
    gets ``model(batch)``, the whole dict batch as one argument; a ``PeftModel`` or HF
    ``PreTrainedModel`` passed directly gets ``model(**inputs)`` (labels removed). Outputs
    may be a tensor or an HF ``ModelOutput`` with ``.logits``.

    Raises:
        TypeError: if the model's ``forward`` cannot take the batch as one argument.
        ValueError: if the batch holds no examples, or the logits are not 2-D (e.g. a
            causal LM's ``(B, T, V)``).
    """
    check_not_empty(x)
    check_sequence_length(model, x)
    out = call_model(model, x, dict_key_y, model_kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    if not torch.is_tensor(logits):
        raise TypeError(
            f"Model returned {type(out).__name__}; expected a tensor or an output with .logits."
        )
    if logits.ndim != 2:
        raise ValueError(
            f"Model logits have shape {tuple(logits.shape)}; Laplace-LoRA needs (batch, classes). "
            "For a causal LM use laplace_lora_ext.LastTokenChoiceLM(model, target_ids) to "
            "restrict the last position to the choice tokens."
        )
    return logits


def check_not_empty(x: Batch) -> None:
    """Raise a clear ``ValueError`` when the batch holds 0 examples.

    The batch size is the leading dimension of ``x`` (a tensor) or of its first tensor
    value with at least one dimension (a dict). HF models fail on an empty batch deep
    inside their attention code (a reshape of 0 elements), so this is checked first.
    """
    tensors = [x] if torch.is_tensor(x) else list(x.values()) if isinstance(x, Mapping) else []
    sizes = [t.shape[0] for t in tensors if torch.is_tensor(t) and t.ndim >= 1]
    if sizes and sizes[0] == 0:
        raise ValueError(
            "The batch holds no examples (batch size 0). Pass at least one example, or "
            "skip empty batches before calling the model or the posterior."
        )


def check_sequence_length(model: nn.Module, x: Batch) -> None:
    """Raise a clear ``ValueError`` when a dict batch is longer than ``model``'s learned
    position table (GPT-2's ``wpe``, BERT's / RoBERTa's ``position_embeddings``), which
    torch would report as a bare ``IndexError`` deep inside the model. Models without such
    a table (rotary positions, as in Llama) and batches with their own ``position_ids``
    are not checked.
    """
    if not isinstance(x, Mapping) or "position_ids" in x:
        return
    tokens = x.get("input_ids", x.get("inputs_embeds"))
    if not torch.is_tensor(tokens) or tokens.ndim < 2:
        return
    limit = max_positions(model)
    if limit is not None and tokens.shape[1] > limit:
        raise ValueError(
            f"The batch has sequences of {tokens.shape[1]} tokens but the model's position "
            f"embedding covers {limit}; truncate them when tokenising (truncation=True, "
            f"max_length={limit})."
        )


_MAX_POSITIONS: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model``'s learned absolute position embedding covers, or
    ``None`` when it has none. RoBERTa-style tables that start after ``padding_idx`` lose
    ``padding_idx + 1`` rows. Found once per model, by module name (``wpe``,
    ``position_embeddings``)."""
    if model not in _MAX_POSITIONS:
        limits = [
            m.num_embeddings - (0 if m.padding_idx is None else m.padding_idx + 1)
            for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES
        ]
        _MAX_POSITIONS[model] = min(limits) if limits else None
    return _MAX_POSITIONS[model]


#: Module names of learned absolute position embeddings (GPT-2; BERT, RoBERTa and kin).
_POSITION_TABLES = ("wpe", "position_embeddings")


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel``, or a ``peft.PeftModel`` around
    one, also inside ``DataParallel`` / ``DistributedDataParallel`` (an ``isinstance`` check,
    not a guess from attributes or signatures). A ``PeftModel`` around a custom module (what
    laplace-torch's documented LoRA recipe builds: ``get_peft_model(MyGPT2(...), config)``)
    is not: it forwards its arguments to that module, whose ``forward`` decides
    (:func:`_peft_around_keyword_module`)."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    model = _unwrap_parallel(model)
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return isinstance(model, PreTrainedModel)


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    """``model.module`` for ``DataParallel`` / ``DistributedDataParallel``, else ``model``."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _forward_owner(model: nn.Module) -> nn.Module:
    """The module whose ``forward`` receives ``model``'s arguments: the base model of a
    ``PeftModel`` (which passes ``*args, **kwargs`` on), else ``model`` itself."""
    from peft import PeftModel

    inner = _unwrap_parallel(model)
    return inner.get_base_model() if isinstance(inner, PeftModel) else model


def _peft_around_keyword_module(model: nn.Module) -> bool:
    """Whether ``model`` is a ``PeftModel`` around a custom module whose ``forward`` takes
    the inputs as keywords (``forward(self, input_ids, attention_mask=None)``, or only
    keywords): PEFT passes ``model(**inputs)`` on to it, as for an HF model. A ``forward``
    whose first argument is anything else (laplace-torch's ``forward(self, data)``) gets the
    whole batch."""
    owner = _forward_owner(model)
    if owner is model:  # not a PeftModel
        return False
    try:
        signature = inspect.signature(owner.forward)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return not positional or positional[0].name in _TENSOR_ARGUMENTS


def call_model(
    model: nn.Module,
    x: Batch,
    dict_key_y: str = "labels",
    model_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Call ``model`` on a batch the way laplace-torch does, with one convenience.

    * tensor ``x``: ``model(x, **model_kwargs)``;
    * dict ``x`` and an HF ``PreTrainedModel``, or a ``PeftModel`` around one or around a
      custom module whose ``forward`` takes keywords (first argument ``input_ids``, ...):
      ``model(**inputs, **model_kwargs)`` with the labels (``dict_key_y``) removed;
    * dict ``x`` and the package's own wrappers (``LastTokenChoiceLM``,
      ``SequenceClassifier``): ``model(inputs, **model_kwargs)``, labels removed;
    * dict ``x`` and any other module, a ``PeftModel`` around one that takes the batch
      (``forward(self, data)``) included:
      ``model(x, **model_kwargs)``, the whole batch, labels included, exactly as
      laplace-torch calls it (its documented HF wrapper has ``def forward(self, data)`` and
      reads ``data["input_ids"]``; its LoRA recipe wraps that module in ``get_peft_model``).
    """
    kwargs = dict(model_kwargs or {})
    if not isinstance(x, Mapping):
        return model(x, **kwargs)
    if is_hf_model(model) or _peft_around_keyword_module(model):
        return model(**model_inputs(x, dict_key_y), **kwargs)
    from .wrappers import _DictModule

    if isinstance(model, _DictModule):
        return model(model_inputs(x, dict_key_y), **kwargs)
    _check_takes_batch(_forward_owner(model), x, kwargs)
    try:
        return model(x, **kwargs)
    except Exception as e:
        if dict_key_y in x and _raised_in_hf_loss(e):
            raise ValueError(
                f"{type(_forward_owner(model)).__name__}.forward passed the batch's "
                f"{dict_key_y!r} on to the HF model (e.g. `self.model(**data)`), which then "
                f"computed its own language-model loss and failed: {e}. Like laplace-torch, "
                "laplace_lora_ext calls a custom module with the whole dict batch, labels "
                "included: drop them in the wrapper (`inputs = {k: v for k, v in "
                'data.items() if k != "labels"}`), pass input_ids and attention_mask '
                "explicitly, or use laplace_lora_ext.LastTokenChoiceLM."
            ) from e
        raise


def _raised_in_hf_loss(error: BaseException) -> bool:
    """Whether ``error`` was raised inside transformers' loss functions."""
    frames = traceback.extract_tb(error.__traceback__)
    return any(f"transformers{os.sep}loss{os.sep}" in frame.filename for frame in frames)


def _check_takes_batch(model: nn.Module, x: Batch, kwargs: dict[str, Any]) -> None:
    """Clear error when ``model.forward`` cannot take the dict batch as one argument."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins, C extensions: let the call decide
        return
    try:
        signature.bind(x, **kwargs)
        reason = _tensor_first_argument(signature)
    except TypeError as e:
        reason = str(e)
    if reason:
        raise TypeError(
            f"{type(model).__name__}.forward{signature} cannot be called as model(batch) "
            f"({reason}). Like laplace-torch, laplace_lora_ext calls a custom module with the "
            "whole dict batch as one argument; write the wrapper as `def forward(self, "
            'data): return self.hf_model(input_ids=data["input_ids"], attention_mask='
            'data["attention_mask"]).logits`, or pass the PeftModel itself, or wrap it in '
            "laplace_lora_ext.SequenceClassifier / LastTokenChoiceLM."
        )


#: HF model arguments that take a tensor: a ``forward`` whose first argument is one of them
#: would get the whole dict batch in its place and fail deep inside the model.
_TENSOR_ARGUMENTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values")


def _tensor_first_argument(signature: inspect.Signature) -> str | None:
    """Why a dict batch cannot go to ``forward`` as its first argument, or ``None``."""
    first = next(iter(signature.parameters.values()), None)
    if first is not None and first.name in _TENSOR_ARGUMENTS:
        return f"its first argument {first.name!r} takes a tensor, and would get the dict batch"
    return None
