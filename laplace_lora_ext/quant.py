"""Support layer for 4-bit (QLoRA) base models quantized with bitsandbytes.

Laplace-LoRA only needs gradients with respect to the LoRA adapter weights, so a frozen 4-bit
base model is fine in principle: bitsandbytes' ``MatMul4Bit`` back-propagates to its *input*.
Two things can go wrong, and this module guards against both:

1. **Silent gradient loss on CPU** (bitsandbytes >= 0.48, verified on 0.50.2). On CPUs with
   AVX512-BF16, ``bnb.nn.Linear4bit.forward`` repacks its weight into an inference-only layout
   the first time it sees an eval-mode forward whose input does not require grad (for example a
   ``torch.no_grad()`` probe, as laplace-torch's ``fit`` does). From then on *every* forward of
   that layer, also with grad enabled, runs a ctypes kernel outside autograd: its output does
   not require grad and every LoRA adapter upstream of it (q/v projections feed ``o_proj``)
   gets ``.grad is None`` with no error. Even a grad-enabled eval forward repacks the layers
   whose input does not require grad (layer 0's q/k/v, fed by frozen embeddings).
   :func:`prepare_4bit_for_laplace` switches the repacking
   off and restores already repacked layers.
2. **Missing gradients in general** (frozen, disabled, merged or detached adapters):
   :func:`check_lora_gradients` / :func:`missing_gradient_error` turn them into an error, so
   that no posterior is ever fitted from missing gradients.

Restoring a repacked layer (what bitsandbytes 0.50.2 does, and what we undo):

- the 4-bit codes are only permuted (nibble re-ordering into ``[N, K/2]`` tiles of 32 rows):
  they are restored bit-exactly;
- the per-block scales (``absmax``, float32, or 8-bit double-quantized "nested" scales) are
  dequantized, transposed to ``[K / blocksize, N]`` and **rounded to bfloat16**; the float32
  originals are dropped. We restore them as float32 (non-nested) tensors holding the bfloat16
  values: relative error at most 2**-8 per block scale, so the restored layer equals the
  loaded one up to that rounding (which the packed inference kernel itself already applied).
  Reload the model for bit-exact weights.

bitsandbytes is optional: ``pip install "laplace-lora-ext[quant]"``. This module imports without
it and detects 4-bit layers by class name and module path.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "INSTALL_HINT",
    "bitsandbytes_available",
    "check_lora_gradients",
    "dequantize_4bit_to_linear",
    "is_quantized_4bit",
    "missing_gradient_error",
    "packed_4bit_modules",
    "prepare_4bit_for_laplace",
    "require_bitsandbytes_if_4bit",
]

INSTALL_HINT = 'pip install "laplace-lora-ext[quant]"'

# bitsandbytes repacks weights for its CPU inference kernel in tiles of this many output rows
# (``block_n`` default of ``bitsandbytes.functional._convert_weight_packed_for_cpu``).
_CPU_PACK_BLOCK_N = 32
_MAX_NAMES_SHOWN = 12


def bitsandbytes_available() -> bool:
    """Whether ``bitsandbytes`` can be imported (a broken native library counts as missing)."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception:  # ImportError, but also OSError/RuntimeError from its native library
        return False
    return True


def _is_bnb_linear4bit_class(cls: type) -> bool:
    """Whether ``cls`` is (a subclass of) ``bitsandbytes.nn.Linear4bit``, by name only."""
    return any(
        c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in cls.__mro__
    )


def _is_4bit_module(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit``, or a module whose ``weight`` is a ``Params4bit``.

    peft's LoRA ``Linear4bit`` qualifies through its ``weight`` property (its base layer's
    weight) as long as its ``base_layer`` is 4-bit.

    Detection uses class names, module paths and parameter types only, so it works (and imports
    nothing) when bitsandbytes is not installed.
    """
    if _is_bnb_linear4bit_class(type(module)):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and type(weight).__name__ == "Params4bit"


def is_quantized_4bit(model: nn.Module) -> bool:
    """Whether ``model`` contains any bitsandbytes 4-bit linear layer.

    Covers plain ``bnb.nn.Linear4bit`` (and its ``LinearNF4``/``LinearFP4`` subclasses), peft's
    LoRA layers wrapping one as ``base_layer`` and any module holding a ``Params4bit`` weight.
    The check inspects modules, not ``config.quantization_config``: a model whose 4-bit layers
    were replaced (e.g. by :func:`dequantize_4bit_to_linear`) is not 4-bit any more.
    """
    return any(_is_4bit_module(m) for m in model.modules())


def require_bitsandbytes_if_4bit(model: nn.Module) -> bool:
    """Return :func:`is_quantized_4bit` ``(model)``; raise if it is 4-bit without bitsandbytes.

    Raises:
        ImportError: the model has 4-bit layers but ``bitsandbytes`` cannot be imported.
    """
    quantized = is_quantized_4bit(model)
    if quantized and not bitsandbytes_available():
        raise ImportError(
            "This model contains bitsandbytes 4-bit (QLoRA) layers, but `bitsandbytes` cannot "
            f"be imported. Install the optional dependency: {INSTALL_HINT}"
        )
    return quantized


def _iter_bnb_linear4bit(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Named ``bitsandbytes.nn.Linear4bit`` modules (peft wrappers excluded, their base kept)."""
    for name, module in model.named_modules():
        if _is_bnb_linear4bit_class(type(module)):
            yield name, module


def _is_packed(module: nn.Module) -> bool:
    """Whether a ``Linear4bit`` holds its weight in bitsandbytes' CPU inference layout."""
    quant_state = getattr(module.weight, "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def packed_4bit_modules(model: nn.Module) -> list[str]:
    """Names of the ``Linear4bit`` modules whose weights were repacked for CPU inference.

    Their forward has no autograd: no gradient flows through them to upstream LoRA adapters.
    """
    return [name for name, module in _iter_bnb_linear4bit(model) if _is_packed(module)]


def _unpack_cpu_codes(packed: torch.Tensor, block_n: int = _CPU_PACK_BLOCK_N) -> torch.Tensor:
    """Invert bitsandbytes' nibble permutation of the CPU inference layout.

    Args:
        packed: ``[N, K/2]`` uint8, the repacked codes (two 4-bit codes per byte).
        block_n: tile height used when packing (32 in bitsandbytes 0.50).

    Returns:
        ``[N*K/2]`` uint8 codes in bitsandbytes' standard layout (row-major ``[N, K]`` codes,
        the even element in the high nibble), bit-exact.
    """
    n_rows, k_half = packed.shape
    if n_rows % block_n:
        raise RuntimeError(f"cannot unpack a [{n_rows}, {k_half}] weight with block_n={block_n}")
    tiles = packed.reshape(-1, 32)  # 32 bytes = 32 low + 32 high codes
    codes = torch.cat([tiles & 0xF, (tiles >> 4) & 0xF], dim=-1)  # [-1, 64]
    codes = codes.reshape(n_rows // block_n, k_half, block_n, 2).transpose(1, 2)
    codes = codes.reshape(-1)  # row-major [N, K] codes, one per element
    return ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)


def _unpacked_weight_and_state(module: nn.Module) -> tuple[torch.Tensor, object]:
    """Standard-layout codes and a fresh ``QuantState`` for a repacked ``Linear4bit``.

    Does not modify ``module``. The returned state is a shallow copy of the module's state with
    float32, non-nested block scales ``[N*K/blocksize]`` (holding bfloat16-rounded values).

    Returns:
        ``(codes, quant_state)`` where ``codes`` has the pre-packing shape and storage dtype
        (``[N*K/2, 1]`` uint8 for transformers' default ``bnb_4bit_quant_storage``).
    """
    state = module.weight.quant_state
    n_rows, n_cols = state.shape
    codes = _unpack_cpu_codes(module.weight.data.view(torch.uint8))
    codes = codes.reshape(getattr(state, "original_qshape", (n_rows * n_cols // 2, 1)))
    storage = getattr(state, "original_storage_type", None)
    if storage is not None:
        codes = codes.view(storage)
    new_state = copy.copy(state)
    # packed absmax: [K / blocksize, N] bfloat16 (transposed); original: [N * K / blocksize]
    new_state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
    new_state.nested = False
    new_state.offset = None
    new_state.state2 = None
    new_state.dtype = getattr(state, "original_dtype", torch.float32)
    new_state.packing_format_for_cpu = False
    return codes, new_state


def _restore_packed(module: nn.Module) -> None:
    """Restore a repacked ``Linear4bit`` in place to the autograd-capable standard layout."""
    codes, new_state = _unpacked_weight_and_state(module)
    old_state = module.weight.quant_state
    # mutate the shared QuantState (module.quant_state is the same object) rather than rebind
    for key, value in vars(new_state).items():
        setattr(old_state, key, value)
    for key in ("original_qshape", "original_dtype", "original_nested", "original_storage_type"):
        if hasattr(old_state, key):
            delattr(old_state, key)
    module.weight.data = codes


def prepare_4bit_for_laplace(model: nn.Module, *, restore_packed: bool = True) -> int:
    """Make every bitsandbytes 4-bit layer of ``model`` safe for gradient-based Laplace.

    Sets ``support_avx512bf16_for_cpu = False`` on every ``bnb.nn.Linear4bit`` (including the
    ``base_layer`` of peft LoRA layers), so no later no-grad eval forward repacks its weight
    into bitsandbytes' autograd-less CPU inference layout. Layers that were *already* repacked
    (a no-grad eval forward ran before this call) are restored: 4-bit codes bit-exactly, block
    scales up to bfloat16 rounding (see the module docstring); a ``UserWarning`` says so.

    Idempotent; a no-op (returning 0) for models without 4-bit layers.

    Args:
        model: any ``nn.Module`` (transformers model, peft model, ...).
        restore_packed: if False, raise instead of restoring already repacked layers.

    Returns:
        The number of ``bnb.nn.Linear4bit`` modules that are now patched (the same number on
        every call).

    Raises:
        ImportError: 4-bit layers but bitsandbytes is not installed.
        RuntimeError: already repacked layers and ``restore_packed=False``.
    """
    if not require_bitsandbytes_if_4bit(model):
        return 0
    modules = list(_iter_bnb_linear4bit(model))
    packed = [name for name, module in modules if _is_packed(module)]
    if packed and not restore_packed:
        raise RuntimeError(
            f"{len(packed)} bitsandbytes Linear4bit layer(s) (e.g. {packed[0]!r}) were already "
            "repacked for CPU inference by a no-grad eval-mode forward; their forward has no "
            "autograd, so LoRA gradients would be missing. Call prepare_4bit_for_laplace(model) "
            "(or construct the Laplace object) before any no-grad forward, reload the model, "
            "or pass restore_packed=True."
        )
    for _, module in modules:
        module.support_avx512bf16_for_cpu = False
        if _is_packed(module):
            _restore_packed(module)
    if packed:
        warnings.warn(
            f"Restored {len(packed)} bitsandbytes Linear4bit layer(s) (e.g. {packed[0]!r}) that "
            "a no-grad eval-mode forward had repacked for CPU inference. Their 4-bit codes are "
            "exact, but bitsandbytes had rounded their block scales to bfloat16 (relative error "
            "<= 2**-8). Reload the model, or call prepare_4bit_for_laplace before any no-grad "
            "forward, for the exact loaded weights.",
            UserWarning,
            stacklevel=2,
        )
    return len(modules)


def missing_gradient_error(
    names: list[str], context: str, *, quantized_4bit: bool | None = None
) -> RuntimeError:
    """Build the error for parameters that no gradient reached.

    Args:
        names: names of the parameters whose gradient is missing (``.grad is None``, or never
            reached by an autograd hook).
        context: where it happened, e.g. ``"KronLaplace.fit (batch 3)"``.
        quantized_4bit: whether the model has bitsandbytes 4-bit layers (then the CPU repacking
            trap is named as the likely cause); ``None`` if unknown (all causes are listed).

    Returns:
        A ``RuntimeError`` (to ``raise``).
    """
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    if len(names) > _MAX_NAMES_SHOWN:
        shown += f", ... ({len(names) - _MAX_NAMES_SHOWN} more)"
    lines = [
        f"{context}: no gradient reached {len(names)} parameter tensor(s): {shown}. "
        "Refusing to fit a posterior from missing gradients."
    ]
    if quantized_4bit is not False:
        lines.append(
            "Likely cause (4-bit base model): on CPUs with AVX512-BF16, bitsandbytes repacks a "
            "Linear4bit weight for inference after any eval-mode forward whose input does not "
            "require grad (e.g. under torch.no_grad()); that kernel has no autograd, so no "
            "gradient flows back to the LoRA adapters. Call "
            "laplace_lora_ext.quant.prepare_4bit_for_laplace(model) before any no-grad forward "
            "(constructing the Laplace object does this)."
        )
    if quantized_4bit is not True:
        lines.append(
            "Check that these adapters are trainable (requires_grad=True), active (peft "
            "active adapter, not disabled or merged) and used in the forward pass, and that the "
            "forward does not detach them (torch.no_grad(), torch.inference_mode(), .detach())."
        )
    return RuntimeError("\n".join(lines))


def check_lora_gradients(
    named_params: Iterable[tuple[str, torch.Tensor]],
    context: str,
    *,
    model: nn.Module | None = None,
) -> None:
    """After a backward pass, raise if any given parameter has no gradient (``.grad is None``).

    Pass exactly the parameters the posterior is over (e.g. the LoRA tensors), not frozen base
    weights, whose ``.grad`` is legitimately ``None``.

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. from ``model.named_parameters()``.
        context: where it happened, used in the message.
        model: the model, if known; used to name the most likely cause (4-bit or not).

    Raises:
        RuntimeError: built by :func:`missing_gradient_error`, listing the missing names.
    """
    missing = [name for name, param in named_params if param.grad is None]
    if missing:
        quantized = None if model is None else is_quantized_4bit(model)
        raise missing_gradient_error(missing, context, quantized_4bit=quantized)


def _dequantized_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding the dequantized weight and the bias of a ``Linear4bit``."""
    import bitsandbytes.functional as bnb_f

    with torch.no_grad():
        if _is_packed(module):
            codes, state = _unpacked_weight_and_state(module)
        else:
            codes, state = module.weight.data, module.weight.quant_state
        weight = bnb_f.dequantize_4bit(codes, state)  # [out_features, in_features]
        dtype = module.compute_dtype if module.compute_dtype is not None else weight.dtype
        bias = module.bias
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        linear.weight.copy_(weight.reshape(module.out_features, module.in_features))
        linear.weight.requires_grad_(False)
        if bias is not None:
            linear.bias.copy_(bias)
            linear.bias.requires_grad_(bias.requires_grad)
    linear.train(module.training)
    return linear


def dequantize_4bit_to_linear(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``bnb.nn.Linear4bit`` replaced by an ``nn.Linear``.

    The ``nn.Linear`` holds ``bnb.functional.dequantize_4bit`` of the 4-bit weight
    (``[out_features, in_features]``) and the original bias, in the layer's compute dtype (or
    the quantized weight's original dtype if none is set), frozen like the 4-bit weight. peft
    LoRA layers keep their adapters; only their ``base_layer`` is replaced. The copy's
    transformers quantization metadata (``quantization_config``, ``hf_quantizer``,
    ``is_loaded_in_4bit``) is removed. ``model`` itself is not modified (repacked layers are
    unpacked in the copy only).

    This is the reference "same model with the 4-bit weights dequantized into ordinary Linear
    layers": its LoRA gradients equal those of the (prepared) 4-bit model up to float rounding.

    Raises:
        ImportError: the model has 4-bit layers but bitsandbytes is not installed.
    """
    require_bitsandbytes_if_4bit(model)
    # pre-seeding deepcopy's memo puts the replacement wherever the 4-bit module is referenced,
    # and never copies the 4-bit weights
    memo: dict[int, object] = {
        id(module): _dequantized_linear(module) for _, module in _iter_bnb_linear4bit(model)
    }
    ref = copy.deepcopy(model, memo)
    for module in ref.modules():
        attrs = vars(module)
        if attrs.get("is_loaded_in_4bit", False):
            module.is_loaded_in_4bit = False
        if "hf_quantizer" in attrs:
            module.hf_quantizer = None
        if attrs.get("is_quantized", False) is True:
            module.is_quantized = False
        config = attrs.get("config")
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
    return ref
