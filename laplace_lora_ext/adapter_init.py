"""Which PEFT initialisation the adapters started from, for the training-data priors.

The ``"leave_one_out"`` and ``"function_space"`` priors read the change fine-tuning made as
``f(x) - f_base(x)`` with PEFT's adapters switched off, and the leave-one-out kernel is the
linearised adapter at ``B = 0`` with ``lora_A`` redrawn as PEFT initialised it
(:func:`gaussian_lora_a_adapters` says which adapters drew it from a normal distribution).
Both hold only for adapters that started as a no-op on the unchanged base weights: PEFT's
``init_lora_weights=True`` (the default), ``"gaussian"`` and ``"eva"`` (``B = 0``). PiSSA,
OLoRA, CorDA, LoftQ and LoRA-GA move part of the base weight into the adapter (the base
model with adapters off is then not the pre-trained one); ``False``, ``"orthogonal"`` and
MiCA start from ``B != 0`` or train ``A`` only. For those, :func:`unsupported_init` names the
initialisation so that the caller can refuse or fall back.
"""

from __future__ import annotations

from torch import nn

from .prior import RuleNotApplicableError

__all__ = ["ZERO_B_INITS", "AdapterInitError", "gaussian_lora_a_adapters", "unsupported_init"]

#: ``init_lora_weights`` values after which the adapter is a no-op on the unchanged base
#: weights (``lora_B = 0``)
ZERO_B_INITS = (True, "gaussian", "eva")


class AdapterInitError(RuleNotApplicableError):
    """The adapter did not start at ``lora_B = 0`` on the unchanged base weights (a
    ``ValueError``)."""


def _active_configs(model: nn.Module) -> list[tuple[str, object]]:
    """``(adapter name, LoraConfig)`` of the active adapters of every PEFT tuner (e.g. the
    ``LoraModel`` inside a ``PeftModel``) in the module tree."""
    from peft.tuners.tuners_utils import BaseTuner

    found, seen = [], set()
    for tuner in (m for m in model.modules() if isinstance(m, BaseTuner)):
        active = tuner.active_adapters
        for name in [active] if isinstance(active, str) else active:
            config = tuner.peft_config.get(name)
            if config is not None and id(config) not in seen:
                seen.add(id(config))
                found.append((name, config))
    return found


def unsupported_init(model: nn.Module) -> str | None:
    """A description of the first active adapter whose ``init_lora_weights`` is not one of
    :data:`ZERO_B_INITS` (e.g. ``"adapter 'default' (init_lora_weights='pissa')"``), or
    ``None`` when every one is (or no PEFT tuner is found: LoRA layers injected without one
    are taken to start at ``B = 0``)."""
    for name, config in _active_configs(model):
        init = getattr(config, "init_lora_weights", True)
        if not any(init is ok or (isinstance(init, str) and init == ok) for ok in ZERO_B_INITS):
            return f"adapter {name!r} (init_lora_weights={init!r})"
    return None


def gaussian_lora_a_adapters(model: nn.Module) -> set[str]:
    """The names of the active adapters whose ``lora_A`` PEFT drew from a normal
    distribution (``init_lora_weights="gaussian"``: std ``1/r``) rather than from its default
    Kaiming-uniform, so that the leave-one-out kernel redraws it the same way."""
    return {
        name
        for name, config in _active_configs(model)
        if isinstance(getattr(config, "init_lora_weights", True), str)
        and config.init_lora_weights.lower() == "gaussian"
    }
