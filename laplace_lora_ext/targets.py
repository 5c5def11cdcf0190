"""Discovery of the parameters a Laplace-LoRA posterior covers.

A *target* is one ``nn.Linear`` whose weight (and, for extra layers, bias) enters the
posterior. For every PEFT LoRA layer the targets are its ``lora_A`` (``d_in -> r``) and
``lora_B`` (``r -> d_out``) of the active adapter, in module order. Optionally, other
trainable ``nn.Linear`` layers (e.g. a ``modules_to_save`` classifier head) are added.
The order of :func:`collect_targets` defines ``la.params`` and therefore the order of the
mean, the prior and every curvature matrix.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "LoraTarget",
    "collect_targets",
    "target_params",
    "untracked_trainable",
    "warn_untracked",
]


@dataclass(frozen=True)
class LoraTarget:
    """One linear layer of the posterior.

    Attributes:
        name: qualified module name inside the model.
        module: the ``nn.Linear`` whose parameters are covered.
        kind: ``"lora_A"``, ``"lora_B"`` or ``"extra"`` (another trainable Linear).
        with_bias: whether the layer's bias is a separate posterior block (extra layers).
        lora_layer: the PEFT LoRA layer that owns a ``lora_A``/``lora_B`` matrix (``None``
            for extra layers); read to explain why a matrix was not called.
        adapter: the PEFT adapter name of a LoRA matrix (``None`` for extra layers).
    """

    name: str
    module: nn.Linear
    kind: str
    with_bias: bool = False
    lora_layer: nn.Module | None = field(default=None, compare=False, repr=False)
    adapter: str | None = None

    def bypass_reason(self) -> str | None:
        """Why PEFT does not call this LoRA matrix in a forward pass, if the reason is a
        state of its layer: ``"disabled"``, ``"merged"`` into the base weight, or its adapter
        ``"inactive"`` (another one set active)."""
        layer = self.lora_layer
        if layer is None:
            return None
        if getattr(layer, "disable_adapters", False):
            return "disabled"
        if getattr(layer, "merged", False):
            return "merged"
        if self.adapter not in getattr(layer, "active_adapters", [self.adapter]):
            return "inactive"
        return None

    @property
    def params(self) -> list[nn.Parameter]:
        """Parameters in posterior order: weight ``(d_out, d_in)`` then bias ``(d_out,)``."""
        if self.with_bias:
            return [self.module.weight, self.module.bias]
        return [self.module.weight]


def _lora_layer_cls() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _active_adapters(layer: nn.Module, adapter_name: str | None) -> list[str]:
    """The adapters of ``layer`` the posterior covers: ``adapter_name`` where the layer has
    it (an adapter may cover only some layers; :func:`collect_targets` raises if none has
    it), else the layer's active adapters."""
    if adapter_name is not None:
        return [adapter_name] if adapter_name in layer.lora_A else []
    active = layer.active_adapters
    return [a for a in active if a in layer.lora_A]


def collect_targets(
    model: nn.Module,
    adapter_name: str | None = None,
    include_extra_params: bool = False,
    lora_modules: str | None = None,
) -> list[LoraTarget]:
    r"""Find the LoRA matrices (and optionally other trainable Linear layers) of ``model``.

    Works on a ``PeftModel`` or on any module that contains one.

    Args:
        model: the model to search.
        adapter_name: adapter to use; ``None`` means the active adapter(s).
        include_extra_params: also cover every other trainable parameter, which must
            belong to an ``nn.Linear`` (weight as a Kronecker block, bias as a dense block).
        lora_modules: optional regular expression; only LoRA layers whose qualified module
            name matches (``re.search``) are covered, e.g. ``r"layers\.11\."`` for the
            last block of a 12-layer model ("last-layer" Laplace-LoRA).

    Raises:
        ValueError: if the model has no LoRA layer, uses DoRA or LoRA embeddings (not
            supported), or has extra trainable parameters that are not ``nn.Linear``.
    """
    lora_layer_cls = _lora_layer_cls()
    targets: list[LoraTarget] = []
    adapters_seen: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer_cls):
            continue
        if lora_modules is not None and re.search(lora_modules, name) is None:
            continue
        adapters_seen.update(module.lora_A.keys())
        layer_targets = _layer_targets(name, module, adapter_name, model)
        if layer_targets:  # only layers the posterior covers must read the batch first
            _check_batch_first(model, name)
        targets += layer_targets
    if not targets and adapter_name is not None and adapters_seen:
        raise ValueError(
            f"No LoRA layer{' matching lora_modules' if lora_modules else ''} holds adapter "
            f"{adapter_name!r}; the adapters there are {sorted(adapters_seen)}."
        )
    if not targets and lora_modules is not None:
        raise ValueError(f"No LoRA layer name matches lora_modules={lora_modules!r}.")
    if not targets:
        raise ValueError(
            "The model has no PEFT LoRA layers (no lora_A/lora_B found). Wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)) before building the Laplace "
            "approximation, or use laplace-torch's subset_of_weights='all'."
        )
    if include_extra_params:
        targets.extend(_extra_targets(model, {id(t.module.weight) for t in targets}))
    return targets


_TYING_HINT = (
    " With PEFT's LoraConfig(ensure_weight_tying=True) a LoRA on lm_head is tied to one on the "
    "input embedding: target neither, or set ensure_weight_tying=False and target lm_head "
    "without the embedding."
)


def _tying_hint(model: nn.Module) -> str:
    """:data:`_TYING_HINT` for the embedding-LoRA error where PEFT's weight tying put a LoRA
    on the input embedding: a config of ``model`` has ``ensure_weight_tying=True`` and
    records layers it tied (``target_modules_to_tie``, e.g. ``{"lm_head"}``), whether the
    user targeted ``lm_head`` or the embedding. Else ``""``."""
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict) and any(
            getattr(c, "ensure_weight_tying", False) and getattr(c, "target_modules_to_tie", None)
            for c in configs.values()
        ):
            return _TYING_HINT
    return ""


def _layer_targets(
    name: str, module: nn.Module, adapter_name: str | None, model: nn.Module
) -> list[LoraTarget]:
    """``lora_A`` and ``lora_B`` of each active adapter of one PEFT LoRA layer ``name`` of
    ``model``."""
    targets = []
    for adapter in _active_adapters(module, adapter_name):
        _check_parameter_target(name, module)
        if module.use_dora.get(adapter, False):
            raise ValueError(
                f"LoRA layer {name!r} uses DoRA, which laplace_lora_ext does not support; "
                "fine-tune with use_dora=False."
            )
        _check_variant(name, module, adapter)
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        for kind, sub in (("lora_A", lora_a), ("lora_B", lora_b)):
            if not isinstance(sub, nn.Linear) or sub.bias is not None:
                raise ValueError(
                    f"{name}.{kind}.{adapter} is a {type(sub).__name__}; only bias-free "
                    "nn.Linear LoRA matrices are supported (not Conv or lora_bias=True)."
                )
            target = LoraTarget(
                f"{name}.{kind}.{adapter}", sub, kind, lora_layer=module, adapter=adapter
            )
            targets.append(target)
    if len(getattr(module, "lora_embedding_A", {})) > 0:
        raise ValueError(
            f"LoRA layer {name!r} is an embedding LoRA, which is not supported; "
            f"target linear layers only.{_tying_hint(model)}"
        )
    return targets


def _check_parameter_target(name: str, module: nn.Module) -> None:
    """Refuse PEFT's ``target_parameters`` LoRA (a ``ParamWrapper``, e.g. on mixture-of-
    experts weights): it adds ``B @ A`` to a parameter, so ``lora_A``/``lora_B`` are never
    called on inputs and the curvature's hooks would see nothing."""
    if type(module).__name__ != "ParamWrapper":
        return
    raise ValueError(
        f"LoRA layer {name!r} adapts the parameter {getattr(module, 'parameter_name', '?')!r} "
        "directly (PEFT's LoraConfig(target_parameters=...)), which laplace_lora_ext does not "
        "support: its LoRA matrices update a weight instead of acting on the layer's inputs. "
        "Target the layers with target_modules=[...] instead."
    )


#: PEFT LoRA variants checked against the exact GGN (a review, 2026-12-04): their layers
#: are ``lora_B(lora_A(x))`` as far as the posterior is concerned.
CHECKED_VARIANTS = ("QALoraLinearVariant", "VeloraLinearVariant")


def _check_variant(name: str, module: nn.Module, adapter: str) -> None:
    """Refuse a PEFT LoRA variant the posterior has not been checked against (KaSA rewrites
    the base weight and trains a diagonal inside the LoRA path, aLoRA adapts a subset of
    the tokens, ...): its extra parameters or base changes would be left out silently."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    kind = type(variant).__name__
    if variant is None or kind in CHECKED_VARIANTS or kind.startswith("Dora"):
        return  # DoRA has its own message below
    raise ValueError(
        f"LoRA layer {name!r} uses PEFT's {kind} (a LoRA variant), which laplace_lora_ext "
        "does not support: its extra parameters or changes to the base weight would be left "
        "out of the posterior. Fine-tune a plain LoRA (no kasa_config, "
        "alora_invocation_tokens, arrow_config, ...), or use laplace-torch's "
        "subset_of_weights='all'."
    )


def _check_batch_first(model: nn.Module, name: str) -> None:
    """Refuse a LoRA layer ``name`` inside a module with ``batch_first=False`` (torch's
    ``TransformerEncoderLayer``, ``MultiheadAttention``, ...): its inputs are
    ``(T, B, d)``, and the curvature reads dimension 0 as the example (where ``T == B`` no
    shape check could tell)."""
    parts = name.split(".")
    for depth in range(len(parts)):
        outer = model.get_submodule(".".join(parts[:depth]))
        if _sequence_first(outer):
            where = ".".join(parts[:depth]) or "the model"
            raise ValueError(
                f"LoRA layer {name!r} sits in {where!r} ({type(outer).__name__}) with "
                "batch_first=False, so its inputs are (sequence, batch, features); "
                "laplace_lora_ext needs the batch first. Build it with batch_first=True, or "
                "leave it out of the posterior (lora_modules=...)."
            )


def _sequence_first(module: nn.Module) -> bool:
    """Whether ``module`` says its inputs are ``(T, B, d)``: ``batch_first=False`` on the
    module, or on the self-attention of torch's transformer layers (which keep no flag of
    their own)."""
    if getattr(module, "batch_first", None) is False:
        return True
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    return isinstance(module, layers) and module.self_attn.batch_first is False


def _extra_targets(model: nn.Module, exclude: set[int]) -> list[LoraTarget]:
    extras: list[LoraTarget] = []
    claimed: set[int] = set(exclude)
    for name, module in model.named_modules():
        if _LORA_MATRIX.search(name + "."):
            continue  # a LoRA matrix left out on purpose (lora_modules, adapter_name)
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        own = [p for p in own if id(p) not in claimed]
        if not own:
            continue
        if not isinstance(module, nn.Linear):
            owned = {id(p) for p in own}
            names = [n for n, p in module.named_parameters(recurse=False) if id(p) in owned]
            raise ValueError(
                f"Trainable parameters {names} of {name!r} ({type(module).__name__}) are "
                "not LoRA matrices nor nn.Linear; include_extra_params supports only "
                f"nn.Linear layers.{_BIAS_HINT if names == ['bias'] else ''} Freeze them "
                "(requires_grad_(False)) or set include_extra_params=False."
            )
        if not module.weight.requires_grad:
            raise ValueError(
                f"{name!r} has a trainable bias but a frozen weight, which "
                f"include_extra_params=True does not support (it covers whole nn.Linear "
                f"layers).{_BIAS_HINT} Fine-tune with bias='none', or set "
                "include_extra_params=False to hold the biases at their fitted values."
            )
        with_bias = module.bias is not None and module.bias.requires_grad
        extras.append(LoraTarget(name, module, "extra", with_bias=with_bias))
        claimed.update(id(p) for p in own)
    return extras


_BIAS_HINT = " (PEFT's LoraConfig(bias='all' or 'lora_only') trains the base layers' biases.)"


def untracked_trainable(model: nn.Module, targets: list[LoraTarget]) -> list[str]:
    """Names of ``model``'s trainable parameters outside every LoRA matrix that no target
    covers (e.g. a ``modules_to_save`` head, or biases trained by PEFT's ``bias='all'``):
    the posterior holds them at their fitted values. LoRA matrices left out on purpose
    (``lora_modules``, ``adapter_name``) are not listed."""
    covered = {id(p) for p in target_params(targets)}
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in covered and not _LORA_MATRIX.search(n)
    ]


_LORA_MATRIX = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B)\.")


def warn_untracked(model: nn.Module, targets: list[LoraTarget]) -> None:
    """Warn (``UserWarning``) when trainable parameters lie outside the posterior, naming
    the first few and what can be done: ``include_extra_params=True`` covers trainable
    ``nn.Linear`` layers; a lone trainable bias (PEFT's ``bias='all'``) can only be frozen
    or not trained."""
    names = untracked_trainable(model, targets)
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    lone_bias = [n for n in names if n.endswith("bias") and n[:-4] + "weight" not in names]
    if lone_bias:  # include_extra_params would refuse these: do not suggest it
        action = (
            f"{_BIAS_HINT} The posterior cannot cover a bias whose weight is frozen: "
            "fine-tune with bias='none', or freeze them (requires_grad_(False)) to silence "
            "this warning."
        )
    else:
        action = (
            " Pass include_extra_params=True to cover trainable nn.Linear layers too, or "
            "freeze them (requires_grad_(False)) to silence this warning."
        )
    warnings.warn(
        f"The posterior covers the LoRA matrices only; {len(names)} other trainable "
        f"parameter tensor(s) ({shown}) stay at their fitted values.{action}",
        UserWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` called here that names the first frame
    outside laplace-torch and this package (the user's ``Laplace(...)`` line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        "laplace",
        "laplace_lora_ext",
    ):
        frame, level = frame.f_back, level + 1
    return level


def target_params(targets: list[LoraTarget]) -> list[nn.Parameter]:
    """Flatten the targets into the posterior's parameter list (``la.params`` order)."""
    return [p for t in targets for p in t.params]


def param_names(targets: list[LoraTarget]) -> list[str]:
    """Qualified names matching :func:`target_params`."""
    names = []
    for t in targets:
        names.append(f"{t.name}.weight")
        if t.with_bias:
            names.append(f"{t.name}.bias")
    return names


def check_same_device(params: list[torch.Tensor]) -> None:
    """Raise a clear error if the posterior parameters live on several devices."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(
            f"LoRA parameters are spread over devices {sorted(map(str, devices))}; "
            "laplace_lora_ext needs them on one device."
        )
