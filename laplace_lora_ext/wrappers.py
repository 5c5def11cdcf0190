"""Model wrappers turning HF models into ``(batch, classes)`` logits.

* :class:`LastTokenChoiceLM`: a causal LM read at the last non-padding position and
  restricted to given target tokens (the multiple-choice "... Answer:" -> " A"/" B" setup).
* :class:`SequenceClassifier`: a sequence-classification model's ``.logits``.

Both accept HF dict batches (``input_ids``, ``attention_mask``; a ``labels`` entry is
ignored) and can be called as ``wrapper(batch_dict)`` or ``wrapper(**batch_dict)``. Ids that
the embedding would reject with a bare ``IndexError`` or dtype error (float, 1-D, outside the
vocabulary) and a mask of another shape raise a clear error first (:func:`check_input_ids`).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import nn

from .inputs import check_sequence_length

__all__ = [
    "LastTokenChoiceLM",
    "SequenceClassifier",
    "last_token_positions",
    "check_not_vocabulary_logits",
]

MAX_VOCABULARY_OUTPUTS = 1024
"""Above this many outputs, logits as wide as the model's vocabulary are refused as classes
(:func:`check_not_vocabulary_logits`)."""


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``(B,)`` of the last non-padding position of each row.

    Works for left and right padding. Rows without any real token raise ValueError.
    """
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("A row of attention_mask has no real token (all padding).")
    T = mask.shape[1]
    return T - 1 - mask.flip(1).long().argmax(dim=1)


class _DictModule(nn.Module):
    """Base: accepts ``forward(batch_dict)``, ``forward(**batch)`` or ``forward(input_ids)``."""

    def __init__(self, model: nn.Module, label_key: str = "labels") -> None:
        super().__init__()
        self.model = model
        self.label_key = label_key

    def _unpack(self, batch: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(batch, Mapping):
            inputs = dict(batch)
        elif batch is None:
            inputs = {}
        elif torch.is_tensor(batch):
            inputs = {"input_ids": batch}
        else:
            raise TypeError(
                f"Expected a dict batch (input_ids, attention_mask, ...) or an input_ids tensor, "
                f"got {type(batch).__name__}. Pass the batch as a dict, e.g. "
                "{'input_ids': ids, 'attention_mask': mask}: laplace-torch calls model(batch) "
                "with the whole batch."
            )
        inputs.update(kwargs)
        inputs.pop(self.label_key, None)
        if "input_ids" not in inputs and "inputs_embeds" not in inputs:
            raise ValueError("Batch has neither input_ids nor inputs_embeds.")
        _check_tensor_fields(inputs)
        if "input_ids" in inputs:
            check_input_ids(
                inputs["input_ids"], inputs.get("attention_mask"), _n_tokens(self.model)
            )
        else:
            _check_mask_matches_embeds(inputs["inputs_embeds"], inputs.get("attention_mask"))
        check_sequence_length(self.model, inputs)
        return inputs


class LastTokenChoiceLM(_DictModule):
    """Causal LM -> logits of the choice tokens at the last real position ``(B, C)``.

    When the model's ``forward`` takes ``position_ids`` and the batch has an
    ``attention_mask`` but no ``position_ids``, positions are derived from the mask
    (``cumsum - 1``), so left and right padding give the same logits also on
    absolute-position models such as GPT-2.

    Only the last position is fed to the output layer (``lm_head``, LoRA'd or not), so
    the vocabulary projection costs ``B x V`` instead of ``B x T x V`` and a LoRA on
    ``lm_head`` sees exactly one input per sequence.

    Args:
        model: a (PEFT-wrapped) ``...ForCausalLM``.
        target_ids: vocabulary ids of the C choice tokens, in class order (distinct ints in
            ``0..V-1``; checked against the output layer's size when it is known).
        label_key: key of the labels in dict batches (dropped before the forward).
    """

    def __init__(
        self, model: nn.Module, target_ids: Sequence[int], label_key: str = "labels"
    ) -> None:
        super().__init__(model, label_key)
        ids = torch.as_tensor(_check_token_ids(target_ids, _vocab_size(model)), dtype=torch.long)
        self.register_buffer("target_ids", ids, persistent=False)
        self._takes_position_ids = _accepts(model, "position_ids")

    def forward(self, batch: Any = None, **kwargs: Any) -> torch.Tensor:
        """Logits ``(B, C)`` of the target tokens at the last non-padding position."""
        inputs = self._unpack(batch, kwargs)
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in inputs:
                raise ValueError(
                    f"LastTokenChoiceLM already computes the logits of the last real position "
                    f"only; drop {name}={inputs[name]!r} (it would pick another position)."
                )
        ids = inputs.get("input_ids")
        mask = inputs.get("attention_mask")
        if mask is None:
            ref = ids if ids is not None else inputs["inputs_embeds"][..., 0]
            _check_no_unmasked_padding(ids, ref.shape[0], _pad_token_id(self.model))
            mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        positions = last_token_positions(mask)
        if self._takes_position_ids and "position_ids" not in inputs and "attention_mask" in inputs:
            # absolute-position models (GPT-2) would see left padding as a position shift
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        head = self._output_layer()
        if head is None:
            logits = self.model(**inputs).logits  # (B, T, V)
            if logits.ndim != 3:
                raise ValueError(
                    f"LastTokenChoiceLM reads next-token logits (batch, seq_len, vocabulary), "
                    f"but the model returns logits of shape {tuple(logits.shape)}: a "
                    "sequence-classification model? Wrap it in SequenceClassifier instead."
                )
            rows = torch.arange(len(positions), device=logits.device)
            last = logits[rows, positions.to(logits.device)]
        else:
            handle = head.register_forward_pre_hook(_gather_rows_hook(positions))
            try:
                last = self.model(**inputs).logits[:, -1]  # (B, V)
            finally:
                handle.remove()
        return last[:, self.target_ids.to(last.device)]

    def _output_layer(self) -> nn.Module | None:
        get = getattr(self.model, "get_output_embeddings", None)
        return get() if callable(get) else None


def _check_token_ids(target_ids: Any, vocab_size: int | None) -> list[int]:
    """``target_ids`` as a list of distinct non-negative ints (below ``vocab_size``)."""
    if isinstance(target_ids, (str, bytes, Mapping)) or not hasattr(target_ids, "__iter__"):
        raise TypeError(
            f"target_ids must be a sequence of token ids (one per class), got {target_ids!r}."
        )
    if isinstance(target_ids, AbstractSet):
        raise TypeError(
            f"target_ids must be an ordered sequence (a list or tuple: the i-th id is class "
            f"i's token), got a {type(target_ids).__name__}, whose order is arbitrary; pass "
            "e.g. [id_A, id_B]."
        )
    ids = []
    for t in target_ids:
        if torch.is_tensor(t) and t.ndim == 0 and not t.is_floating_point():
            t = t.item()
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(
                f"target_ids must be integer token ids, got {t!r} ({type(t).__name__}) in "
                f"{list(target_ids)!r}; map the choice strings with the tokenizer first."
            )
        ids.append(int(t))
    if len(ids) < 2:
        raise ValueError("target_ids must list at least two token ids (one per class).")
    if len(set(ids)) != len(ids):
        raise ValueError(f"target_ids contains duplicates: {ids}.")
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        limit = f"0..{vocab_size - 1}" if vocab_size is not None else "non-negative"
        raise ValueError(
            f"target_ids {bad} are not valid token ids (vocabulary: {limit}); negative ids "
            "would silently index from the end of the vocabulary."
        )
    return ids


def _check_tensor_fields(inputs: Mapping[str, Any]) -> None:
    """Raise a ``TypeError`` naming the fix when ``input_ids``, ``attention_mask`` or
    ``inputs_embeds`` is not a tensor (e.g. a tokenizer's lists, which the model would
    reject deep inside with an ``AttributeError``)."""
    for key in ("input_ids", "attention_mask", "inputs_embeds"):
        value = inputs.get(key)
        if value is not None and not torch.is_tensor(value):
            raise TypeError(
                f"{key} must be a torch.Tensor, got {type(value).__name__}: tokenise with "
                "return_tensors='pt' or collate the batch with a DataLoader "
                "(e.g. transformers.DataCollatorWithPadding)."
            )


def check_input_ids(
    ids: torch.Tensor, attention_mask: Any = None, n_tokens: int | None = None
) -> None:
    """Raise a clear error for ``input_ids`` the embedding would reject with a bare
    ``IndexError`` or dtype error (or, for a mismatched mask, read wrongly).

    Args:
        ids: ``(B, T)`` integer token ids.
        attention_mask: ``(B, T)`` or ``None``.
        n_tokens: rows of the input embedding (ids must lie in ``0..n_tokens-1``), if known.
    """
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(
            f"input_ids must be integer token ids, got dtype {ids.dtype}; use ids.long()."
        )
    if ids.ndim != 2:
        raise ValueError(
            f"input_ids must be (batch, seq_len), got shape {tuple(ids.shape)}; for one "
            "example add the batch dimension with ids.unsqueeze(0)."
        )
    _check_mask_shape(attention_mask, ids, "input_ids", "they must match (tokenise them together).")
    if ids.numel() and n_tokens is not None:
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one pass, one sync
        if low < 0 or high >= n_tokens:
            raise ValueError(
                f"input_ids range over {low}..{high} but the model's embedding has {n_tokens} "
                f"tokens (0..{n_tokens - 1}): was the batch tokenised with another model's "
                "tokenizer?"
            )


def _check_mask_matches_embeds(embeds: Any, attention_mask: Any) -> None:
    """``attention_mask`` ``(B, T)`` must match ``inputs_embeds`` ``(B, T, d)``."""
    if torch.is_tensor(embeds):
        fix = f"the mask must be (batch, seq_len) = {tuple(embeds.shape[:2])}."
        _check_mask_shape(attention_mask, embeds, "inputs_embeds", fix)


def _check_mask_shape(attention_mask: Any, tokens: torch.Tensor, name: str, fix: str) -> None:
    """Raise when a tensor ``attention_mask`` is not ``tokens``' ``(B, T)``; ``name`` is
    ``tokens``' key in the batch and ``fix`` ends the message."""
    if torch.is_tensor(attention_mask) and attention_mask.shape != tokens.shape[:2]:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but {name} "
            f"{tuple(tokens.shape)}; {fix}"
        )


def _embedding_rows(model: nn.Module, getter: str) -> int | None:
    """Rows of the layer ``model.<getter>()`` returns (``get_input_embeddings`` or
    ``get_output_embeddings``), if it has a 2-D weight."""
    get = getattr(model, getter, None)
    try:
        layer = get() if callable(get) else None
    except NotImplementedError:  # HF's default when a model has no such layer
        return None
    weight = getattr(layer, "weight", None)
    return int(weight.shape[0]) if torch.is_tensor(weight) and weight.ndim == 2 else None


def _n_tokens(model: nn.Module) -> int | None:
    """Rows of the model's input embedding, if it has one."""
    return _embedding_rows(model, "get_input_embeddings")


def _pad_token_id(model: nn.Module) -> int | None:
    """The model config's ``pad_token_id``, if it names one."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad if isinstance(pad, int) else None


def _check_no_unmasked_padding(
    input_ids: torch.Tensor | None, n_rows: int, pad_id: int | None
) -> None:
    """Refuse a batch of ``n_rows`` without an attention mask that may be padded.

    Without the mask every row is read at position ``T - 1`` (a pad for right-padded rows)
    and left-padded rows attend to their pads, which silently changes the logits (an
    ``(input_ids, labels)`` ``TensorDataset`` drops the tokenizer's mask). One row cannot be
    padded. Several rows are accepted only when the model's config names its pad token and
    no row of ``input_ids`` ``(B, T)`` begins or ends with it; without a pad id (many causal
    LMs keep it on the tokenizer only) padding cannot be told from text.
    """
    if n_rows <= 1:
        return
    fix = (
        "Pass the tokenizer's attention_mask in the batch dict (for (X, y) pairs, make X the "
        "dict {'input_ids': ..., 'attention_mask': ...}). If the rows are not padded, pass "
        "attention_mask=torch.ones_like(input_ids), or set "
        "peft_model.config.pad_token_id = tokenizer.pad_token_id (rows that neither begin "
        "nor end with it are then read as unpadded)."
    )
    if pad_id is None or input_ids is None:
        raise ValueError(
            f"The batch of {n_rows} rows has no attention_mask, and the model's config names "
            "no pad_token_id, so padded rows cannot be recognised: they would be read at a "
            f"padding position. {fix}"
        )
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        return
    edges = torch.stack([input_ids[:, 0], input_ids[:, -1]])
    if bool((edges == pad_id).any()):
        raise ValueError(
            f"The batch has no attention_mask, but its input_ids begin or end with the "
            f"model's pad token ({pad_id}): padded rows would be read at a padding position. "
            f"{fix}"
        )


def _vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's output layer (its logits' last dimension), if known."""
    rows = _embedding_rows(model, "get_output_embeddings")
    if rows is not None:
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_not_vocabulary_logits(model: nn.Module, n_outputs: int) -> None:
    """Refuse next-token logits over a whole vocabulary as the classes of a posterior.

    laplace-torch's LLM wrapper pattern can return ``logits[:, -1, :]`` of a causal LM:
    ``(B, V)`` over tens of thousands of tokens. The exact-Fisher KFAC then needs ``V - 1``
    backward passes per batch and a ``(B, V, V)`` factor, and the GLM predictive a
    ``(B, V, V)`` covariance (SmolLM2: ``V`` = 49,152, 19 GB per example in float64): the
    fit runs out of memory deep inside torch. Small vocabularies (``n_outputs`` up to
    :data:`MAX_VOCABULARY_OUTPUTS`) are allowed.

    Raises:
        ValueError: ``n_outputs`` equals the vocabulary size of an HF model inside ``model``
            and exceeds :data:`MAX_VOCABULARY_OUTPUTS`; it names :class:`LastTokenChoiceLM`.
    """
    if n_outputs <= MAX_VOCABULARY_OUTPUTS:
        return
    sizes = {_vocab_size(m) for m in model.modules() if hasattr(m, "get_output_embeddings")}
    if n_outputs in sizes:
        raise ValueError(
            f"The model returns {n_outputs} logits per example, its whole vocabulary: a "
            "posterior over that many classes needs (B, V, V) matrices and V - 1 backward "
            "passes per batch. Restrict the outputs to the answer tokens with "
            "LastTokenChoiceLM(peft_model, target_ids) (target_ids from choice_token_ids("
            "tokenizer, choices)) and label each example with its answer's index 0..C-1."
        )


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the (PEFT-wrapped) HF model's ``forward`` has a parameter ``name``."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _gather_rows_hook(positions: torch.Tensor):
    """Forward pre-hook replacing hidden states ``(B, T, d)`` by ``(B, 1, d)`` at positions."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.ndim != 3:
            return args
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, positions.to(hidden.device)].unsqueeze(1)
        return (picked, *args[1:])

    return hook


class SequenceClassifier(_DictModule):
    """Sequence-classification model -> ``.logits`` ``(B, C)`` from a dict batch.

    The logits are exactly ``model(**batch).logits``: unlike :class:`LastTokenChoiceLM`,
    no ``position_ids`` are derived from the mask, so the posterior is that of the model as
    it was fine-tuned. On absolute-position models (GPT-2, BERT) a left-padded row then
    sees shifted positions and other logits than the same row right-padded, as in
    Hugging Face itself: pad on the side the model was fine-tuned with.
    """

    def forward(self, batch: Any = None, **kwargs: Any) -> torch.Tensor:
        inputs = self._unpack(batch, kwargs)
        out = self.model(**inputs)
        return out.logits if hasattr(out, "logits") else out
