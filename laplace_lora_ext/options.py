"""The options of the ``lora`` Laplace classes: their types and their validation, in one place.

Each choice option is a ``Literal`` type; its allowed values are read from the type, so the
annotation and the check cannot drift apart. :func:`validate_lora_options` runs when a
posterior is constructed (not at the first ``fit``) and raises ``ValueError`` (or
``TypeError`` for a wrong type) naming the option, the value and the allowed values.
"""

from __future__ import annotations

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
