"""The options of the ``lora`` Laplace classes: their types and their validation, in one place.

Each choice option is a ``Literal`` type; its allowed values are read from the type, so the
annotation and the check cannot drift apart. :func:`validate_lora_options` runs when a
posterior is constructed (not at the first ``fit``) and raises ``ValueError`` (or
``TypeError`` for a wrong type) naming the option, the value and the allowed values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

__all__ = [
    "KfacApprox",
    "FisherType",
    "PredType",
    "LinkApprox",
    "KFAC_APPROX",
    "FISHER_TYPES",
    "PRED_TYPES",
    "LINK_APPROXIMATIONS",
    "check_choice",
    "check_int",
    "validate_lora_options",
    "check_backend",
    "check_backend_kwargs",
    "resolve_kfac_approx",
    "check_unsupported_keywords",
]

KfacApprox = Literal["expand", "reduce"]
"""KFAC rule for weights shared over sequence positions (Eschenhagen et al., 2023)."""
FisherType = Literal["exact", "mc", "empirical"]
"""How the GGN / Fisher is computed: exactly over all classes, by sampled labels, or at
the true labels (empirical Fisher)."""
PredType = Literal["glm", "nn"]
"""Predictive: linearised model (``"glm"``) or sampled weights (``"nn"``)."""
LinkApprox = Literal["mc", "mc_indep", "probit", "bridge", "bridge_norm"]
"""Link approximation of the GLM predictive."""

KFAC_APPROX: tuple[str, ...] = get_args(KfacApprox)
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)
PRED_TYPES: tuple[str, ...] = get_args(PredType)
LINK_APPROXIMATIONS: tuple[str, ...] = get_args(LinkApprox)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` naming them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an int ``>= minimum`` (or ``None`` when allowed).

    ``bool`` is refused (``True`` is an ``int`` in Python, but never a meaningful count).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return value


def validate_lora_options(
    *,
    kfac_approx: Any,
    fisher_type: Any,
    mc_samples: Any,
    factor_rank: Any,
    rank_threshold: Any,
    seed: Any,
) -> None:
    """Check the curvature options of a ``lora`` posterior at construction.

    Raises:
        ValueError: an unknown ``kfac_approx`` / ``fisher_type``, ``mc_samples < 1``,
            ``factor_rank`` not a positive int, ``"auto"`` or ``None``, ``rank_threshold < 0``,
            ``seed`` not an int or ``None``.
    """
    check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
    check_choice("fisher_type", fisher_type, FISHER_TYPES)
    check_int("mc_samples", mc_samples, 1)
    if factor_rank != "auto":  # "auto": see laplace_lora_ext/lowrank/auto.py
        check_int("factor_rank", factor_rank, 1, allow_none=True)
    check_int("rank_threshold", rank_threshold, 0)
    check_int("seed", seed, -(2**63), allow_none=True)


# --------------------------------------------------------------------------- laplace-torch
# keywords that laplace-torch's classes take and that mean something else (or nothing) here

_EQUIVALENT_FISHER = {"GGN": "exact", "EF": "empirical"}


def check_backend(backend: Any, own: type) -> None:
    """Refuse laplace-torch's curvature backends, naming the equivalent options.

    ``own`` is :class:`~laplace_lora_ext.LoraCurvature`; it and its subclasses are accepted.
    """
    if backend is None or (isinstance(backend, type) and issubclass(backend, own)):
        return
    name = getattr(backend, "__name__", repr(backend))
    kind = "EF" if name.endswith("EF") else "GGN"
    stochastic = " (stochastic=True: fisher_type='mc')" if kind == "GGN" else ""
    raise ValueError(
        f"backend={name} is not supported with subset_of_weights='lora'. Leave backend=None: "
        f"the built-in LoraCurvature computes the {kind} KFAC (or diagonal / full matrix) of "
        f"the LoRA matrices, correctly scaled for sequences; the equivalent of {name} is "
        f"fisher_type={_EQUIVALENT_FISHER[kind]!r}{stochastic}, with kfac_approx='expand' or "
        "'reduce' as in curvlinops; backend=CurvlinopsGGN / CurvlinopsEF also run on the "
        "LoRA matrices with hessian_structure='kron'. (laplace-torch's ASDL KFAC is T times "
        "too large on sequence inputs and fails on PEFT's ModulesToSaveWrapper; BackPACK "
        "rejects frozen parameters and dict batches.)"
    )


def resolve_kfac_approx(
    kfac_approx: KfacApprox | None, asdl_fisher_kwargs: dict[str, Any] | None, structure: str
) -> KfacApprox:
    """``kfac_approx`` after laplace-torch's idiom ``asdl_fisher_kwargs={"kfac_approx": ...}``.

    ``None`` (the keyword not given) means the dict's value, else ``"expand"``; an explicit
    value that differs from the dict's (``"expand"`` included), another key, or the key
    with ``diag``/``full`` is refused.
    """
    if not asdl_fisher_kwargs:
        return "expand" if kfac_approx is None else kfac_approx
    if not isinstance(asdl_fisher_kwargs, dict):
        raise TypeError(f"asdl_fisher_kwargs must be a dict, got {asdl_fisher_kwargs!r}.")
    unknown = sorted(set(asdl_fisher_kwargs) - {"kfac_approx"})
    if unknown:
        raise ValueError(
            f"asdl_fisher_kwargs keys {unknown} are not supported with "
            "subset_of_weights='lora' (only 'kfac_approx' is; it is the same as the "
            "kfac_approx=... keyword). Use fisher_type=/mc_samples= for the Fisher options."
        )
    value = check_choice(
        "asdl_fisher_kwargs['kfac_approx']", asdl_fisher_kwargs["kfac_approx"], KFAC_APPROX
    )
    if structure != "kron":
        raise ValueError(
            f"asdl_fisher_kwargs={{'kfac_approx': {value!r}}} only applies to "
            f"hessian_structure='kron', not {structure!r}; remove it."
        )
    if kfac_approx is not None and kfac_approx != value:
        raise ValueError(
            f"kfac_approx={kfac_approx!r} conflicts with asdl_fisher_kwargs={{'kfac_approx': "
            f"{value!r}}}; give one of them."
        )
    return value


def check_backend_kwargs(backend_kwargs: dict[str, Any] | None, reserved: Iterable[str]) -> None:
    """Refuse ``backend_kwargs`` that would override what the posterior passes its curvature.

    ``reserved`` are the keywords the posterior gives :class:`LoraCurvature` (``fisher_type``,
    ``kfac_approx``, ``targets``, ...). Set through ``backend_kwargs`` they changed the
    curvature while ``la.fisher_type`` etc. (and the saved posterior) kept the keyword's
    value. laplace-torch's ``stochastic=True`` is named as ``fisher_type='mc'``. Other keys
    go to the backend (a subclass of ``LoraCurvature`` may take them).
    """
    keys = set(backend_kwargs or {})
    if "stochastic" in keys:
        raise ValueError(
            "backend_kwargs={'stochastic': ...} is laplace-torch's ASDL/BackPACK option; with "
            "subset_of_weights='lora' pass fisher_type='mc' (a Monte Carlo Fisher, "
            "mc_samples=...) or leave fisher_type='exact'."
        )
    clash = sorted(keys & set(reserved))
    if clash:
        raise ValueError(
            f"backend_kwargs keys {clash} are set by the posterior itself; pass them to "
            "Laplace(...) as keywords instead (e.g. fisher_type='mc'), so that the curvature "
            "and the posterior's recorded options agree."
        )


def check_unsupported_keywords(*, enable_backprop: Any, dict_key_x: Any) -> None:
    """Refuse laplace-torch keywords that would otherwise be silently ignored.

    * ``enable_backprop=True``: the LoRA predictives return detached values (no gradients
      to the inputs through the predictive).
    * ``dict_key_x`` other than its default ``"input_ids"``: the whole dict batch goes to
      the model (laplace-torch's convention), so no input key is ever looked up.
    """
    if enable_backprop:
        raise ValueError(
            "enable_backprop=True is not supported with subset_of_weights='lora': the GLM "
            "and nn predictives return detached tensors. Leave enable_backprop=False; for "
            "gradients w.r.t. the inputs differentiate the model itself."
        )
    if dict_key_x != "input_ids":
        raise ValueError(
            f"dict_key_x={dict_key_x!r} has no effect with subset_of_weights='lora': the "
            "whole dict batch is passed to the model (model(batch), as laplace-torch does; an "
            "HF model, or a PeftModel around one or around a keyword forward, gets "
            "model(**batch) without the labels), so your model reads its "
            "inputs itself. Remove dict_key_x (labels are still found under dict_key_y)."
        )
