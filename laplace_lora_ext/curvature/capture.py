"""Forward/backward capture of layer inputs and output gradients with autograd hooks.

One forward pass records, for every target ``nn.Linear``, its input ``a`` and its output
(still attached to the graph). Output gradients ``g = dF/d(output)`` for several
"grad-output" vectors ``V_k`` on the logits are then obtained by one
``torch.autograd.grad`` call per ``k`` — never a per-parameter Jacobian. This uses plain
autograd (no ``torch.func``), so it also runs through bitsandbytes 4-bit layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..guards import check_all_finite
from ..quant import missing_gradient_error
from ..targets import LoraTarget

__all__ = ["Captured", "capture_forward", "output_gradients", "token_weights"]


@dataclass
class Captured:
    """Result of :func:`capture_forward`.

    Attributes:
        logits: ``(B, C)`` model outputs (attached to the graph).
        inputs: per target, the layer input ``(B, T, d_in)`` (detached; ``T = 1`` for
            2-D inputs).
        outputs: per target, the layer output ``(B, T', d_out)`` attached to the graph.
    """

    logits: torch.Tensor
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 2:
        return t.unsqueeze(1)
    if t.ndim == 3:
        return t
    return t.reshape(t.shape[0], -1, t.shape[-1])


def capture_forward(forward: Callable[[], torch.Tensor], targets: list[LoraTarget]) -> Captured:
    """Run ``forward()`` with hooks on all targets.

    Raises:
        RuntimeError: if a target is called more than once per forward (weight sharing is
            not supported) or never called.
        NonFiniteError: NaN or inf in the logits or a target's input.
    """
    inputs: list[torch.Tensor | None] = [None] * len(targets)
    outputs: list[torch.Tensor | None] = [None] * len(targets)

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if inputs[i] is not None:
                raise RuntimeError(
                    f"Layer {targets[i].name} was called twice in one forward pass; "
                    "shared weights are not supported."
                )
            inputs[i] = _as_3d(args[0].detach())
            outputs[i] = out

        return hook

    handles = [t.module.register_forward_hook(make_hook(i)) for i, t in enumerate(targets)]
    # the posterior covers the LoRA matrices even if they were loaded frozen
    # (e.g. PeftModel.from_pretrained without is_trainable=True)
    frozen = [p for t in targets for p in t.params if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            logits = forward()
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    missing = [t for t, a in zip(targets, inputs, strict=True) if a is None]
    if missing:
        raise RuntimeError(_not_called_message(missing))
    if torch.is_tensor(logits):
        _check_batch_dimension(logits.shape[0], targets, inputs, outputs)  # type: ignore[arg-type]
    named = [
        (f"The inputs of LoRA layer {t.name}", a) for t, a in zip(targets, inputs, strict=True)
    ]
    if torch.is_tensor(logits):
        named.insert(0, ("The model's logits", logits.detach()))
    check_all_finite(named)  # type: ignore[arg-type]
    return Captured(logits, inputs, outputs)  # type: ignore[arg-type]


def _check_batch_dimension(
    B: int, targets: list[LoraTarget], inputs: list[torch.Tensor], outputs: list[torch.Tensor]
) -> None:
    """Raise a ``ValueError`` for a target whose input or output does not lead with the
    batch's ``B`` examples: the curvature and the predictive read dimension 0 as the
    example. Mixture-of-experts blocks flatten tokens to ``(B·T, d)`` and route subsets of
    them to each expert; a sequence-first layer gives ``(T, B, d)``."""
    for t, a, out in zip(targets, inputs, outputs, strict=True):
        if a.shape[0] != B or not torch.is_tensor(out) or out.shape[0] != B:
            got = (a.shape[0], out.shape[0] if torch.is_tensor(out) else type(out).__name__)
            raise ValueError(
                f"LoRA layer {t.name} sees {got[0]} rows in (output: {got[1]}) for a batch "
                f"of {B} examples: its module flattens or reorders the batch (a mixture-of-"
                "experts block, which flattens tokens and routes subsets of them, or a "
                "sequence-first layer). laplace_lora_ext needs each LoRA layer's inputs as "
                "(batch, ..., features); leave this module out of target_modules, or out "
                "of the posterior with lora_modules=..."
            )


def _not_called_message(missing: list[LoraTarget]) -> str:
    """Why the ``missing`` targets were not called, with the fix when PEFT says why."""
    names = [t.name for t in missing]
    head = f"LoRA layers {names[:5]}{'...' if len(names) > 5 else ''} were not called in the "
    by_reason: dict[str | None, list[LoraTarget]] = {}
    for t in missing:
        by_reason.setdefault(t.bypass_reason(), []).append(t)
    if "merged" in by_reason:
        return head + (
            "forward pass: the adapter is merged into the base weights (merge_adapter()), so "
            "the LoRA matrices have no inputs or gradients. Call peft_model.unmerge_adapter() "
            "before fit and prediction."
        )
    if "disabled" in by_reason:
        return head + (
            "forward pass: the adapters are disabled (inside peft_model.disable_adapter()?). "
            "Fit and predict outside that context."
        )
    if "inactive" in by_reason:
        adapters = sorted({t.adapter for t in by_reason["inactive"]})
        return head + (
            f"forward pass: adapter(s) {adapters} are not active in the model. Call "
            "peft_model.set_adapter(...) with the adapter the posterior covers "
            "(adapter_name=...) before fit and prediction, or build the posterior for the "
            "active adapter."
        )
    return head + "forward pass; is the adapter active and the layer used by the model?"


def output_gradients(
    captured: Captured, grad_outputs: torch.Tensor, targets: list[LoraTarget]
) -> Iterator[list[torch.Tensor]]:
    """Yield, for each ``V_k`` in ``grad_outputs`` ``(K, B, C)``, the output gradients
    ``g_l = V_kᵀ dF/d(out_l)`` of every target, each ``(B, T', d_out)``.

    Raises:
        RuntimeError: if autograd does not reach a target (its gradient would be missing:
            e.g. a detached adapter or a bitsandbytes 4-bit layer that lost autograd).
        NonFiniteError: NaN or inf in an output gradient.
    """
    K = grad_outputs.shape[0]
    if not captured.logits.requires_grad:
        raise missing_gradient_error([t.name for t in targets], "computing the curvature")
    for k in range(K):
        grads = torch.autograd.grad(
            captured.logits,
            captured.outputs,
            grad_outputs=grad_outputs[k].to(captured.logits.dtype),
            retain_graph=k < K - 1,
            allow_unused=True,
        )
        none = [t.name for t, g in zip(targets, grads, strict=True) if g is None]
        if none:
            raise missing_gradient_error(none, "computing the curvature")
        out = [_as_3d(g.detach()) for g in grads]
        check_all_finite(
            (f"The output gradients of LoRA layer {t.name}", g)
            for t, g in zip(targets, out, strict=True)
        )
        yield out


def token_weights(attention_mask: torch.Tensor | None, layer_input: torch.Tensor) -> torch.Tensor:
    """0/1 weights ``(B, T)`` of real tokens for a layer input ``(B, T, d)``.

    The batch's ``attention_mask`` is used when its shape matches the layer's token axis;
    otherwise (pooled inputs, a last-position head) every position counts.
    """
    B, T = layer_input.shape[:2]
    if attention_mask is not None and tuple(attention_mask.shape) == (B, T):
        return attention_mask.to(device=layer_input.device, dtype=layer_input.dtype)
    return torch.ones(B, T, device=layer_input.device, dtype=layer_input.dtype)
