"""Which of ``optimize_prior_precision``'s options each method reads, and the checks that
refuse the others (laplace-torch ignores them silently).

* :func:`refuse_ignored_options`: a ``prior_structure``, ``loss``, ``val_loader``,
  ``pred_type``, ``link_approx`` or ``n_samples`` the chosen method would not use.
* :func:`refuse_unused_search_options`: grid options without ``"gridsearch"``, the
  evidence's ``lr`` / ``init_prior_prec`` without an evidence method, ``n_steps`` with
  ``"gridsearch"`` (:data:`READ_BY`); values equal to the defaults are accepted.
"""

from __future__ import annotations

from typing import Any

import torch

from ..links import LINK_APPROXIMATIONS
from ..options import check_int

__all__ = [
    "TUNING_METHODS",
    "READ_BY",
    "refuse_ignored_options",
    "refuse_unused_search_options",
    "check_search_values",
]

TUNING_METHODS = (
    "auto",
    "lora_marglik",
    "function_space",
    "leave_one_out",
    "linearised",
    "marglik",
    "gridsearch",
)

#: Methods that score the joint MC predictive of :func:`laplace_lora_ext.loo_prior`
#: (``"auto"`` may take it) and so would ignore another ``link_approx``.
JOINT_MC_RULES = ("auto", "leave_one_out")
#: Methods that score a predictive, and so read ``n_samples``; the others (evidence,
#: function space) would ignore ``n_samples`` and ``link_approx``.
PREDICTIVE_METHODS = (*JOINT_MC_RULES, "gridsearch")


#: methods that run the evidence's Adam steps (``"auto"`` may fall back to it; an explicit
#: training-data rule raises instead of falling back, so it reads none of their options)
EVIDENCE_METHODS = ("auto", "lora_marglik", "marglik")
GRID_ONLY = ("gridsearch",)
#: optimize_prior_precision's keywords that only some methods read, and those methods
READ_BY = {
    "grid_size": GRID_ONLY,
    "log_prior_prec_min": GRID_ONLY,
    "log_prior_prec_max": GRID_ONLY,
    "log_prior_prec_base": GRID_ONLY,
    "lr": EVIDENCE_METHODS,
    "init_prior_prec": EVIDENCE_METHODS,
    "n_steps": (*EVIDENCE_METHODS, "linearised"),
}


def refuse_unused_search_options(
    method: str, given: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """Raise for keywords of :data:`READ_BY` that ``method`` does not read; ``given`` maps
    them to the values passed, ``defaults`` to ``optimize_prior_precision``'s defaults (read
    from its signature by the caller, not repeated here). A value equal to its default counts
    as not given."""
    changed = [
        name
        for name, readers in READ_BY.items()
        if method not in readers and not bool(torch.as_tensor(given[name] == defaults[name]).all())
    ]
    if changed:
        readers = "; ".join(
            f"{name} is read by method in {list(READ_BY[name])}" for name in changed
        )
        raise ValueError(
            f"optimize_prior_precision(method={method!r}) does not use {changed} ({readers}). "
            "Drop them or change method."
        )


def refuse_ignored_options(
    method: str,
    prior_structure: str | None,
    loss: Any,
    pred_type: str,
    link_approx: str,
    val_loader: Any,
    n_samples: int | None = None,
) -> None:
    """Raise for options the chosen method would otherwise ignore silently."""
    allowed = {
        "auto": (None, "layerwise"),
        "lora_marglik": (None, "layerwise"),
        "function_space": (None, "layerwise"),
        "leave_one_out": (None, "layerwise"),
        "gridsearch": (None, "scalar"),
        "linearised": (None, "scalar", "layerwise"),
    }
    if method in allowed and prior_structure not in allowed[method]:
        raise ValueError(
            f"method={method!r} supports prior_structure in "
            f"{[s for s in allowed[method] if s]}, got {prior_structure!r}; use "
            "method='marglik' for other prior structures."
        )
    if loss is not None:
        raise ValueError(
            "A custom loss is not supported: method='gridsearch' scores the validation NLL "
            "of the predictive; leave loss=None."
        )
    if val_loader is not None and method != "gridsearch":
        raise ValueError(
            f"val_loader is used only by method='gridsearch'; method={method!r} chooses the "
            "prior without validation data. Pass method='gridsearch' to tune on it, or "
            "drop val_loader."
        )
    if pred_type != "glm":
        scores = (
            "maximises the evidence, which uses no predictive (laplace-torch's marglik "
            "ignores pred_type)"
            if method == "marglik"
            else "scores the linearised (GLM) predictive, the one la(x) uses by default"
        )
        raise ValueError(
            f"optimize_prior_precision(method={method!r}) {scores}; pred_type={pred_type!r} "
            "is not supported here. Leave pred_type='glm'."
        )
    if method not in PREDICTIVE_METHODS and (link_approx != "mc" or n_samples is not None):
        given = "link_approx" if link_approx != "mc" else "n_samples"
        raise ValueError(
            f"optimize_prior_precision(method={method!r}) scores no predictive, so {given} "
            "would be ignored; it is read by the default, 'leave_one_out' (n_samples) and "
            "'gridsearch' (n_samples, link_approx). Drop it, or set it on the prediction: "
            "la(x, link_approx=..., n_samples=...)."
        )
    if method == "gridsearch" and link_approx not in LINK_APPROXIMATIONS:
        raise ValueError(
            f"Unsupported link_approx {link_approx!r}; choose one of {LINK_APPROXIMATIONS}."
        )
    if method == "gridsearch" and n_samples is not None and not link_approx.startswith("mc"):
        raise ValueError(
            f"optimize_prior_precision(method='gridsearch', link_approx={link_approx!r}) "
            "draws no samples, so n_samples would be ignored; drop it, or use "
            "link_approx='mc'."
        )
    if link_approx != "mc" and method in JOINT_MC_RULES:
        raise ValueError(
            f"optimize_prior_precision(method={method!r}) scores the joint Monte Carlo "
            f"predictive (link_approx='mc'), which defines its rule; link_approx="
            f"{link_approx!r} is used only by method='gridsearch'. Leave link_approx='mc'."
        )


def check_search_values(method: str, grid_size: Any, n_steps: Any, init_prior_prec: Any) -> None:
    """Raise a ``ValueError`` for a ``grid_size`` or ``n_steps`` that is not an int ``>= 1``
    (where ``method`` reads it), and for an ``init_prior_prec`` that the evidence rules
    (``"auto"``, ``"lora_marglik"``, the training-data rules' fall-back) cannot start from:
    they take one finite value ``> 0`` for every tensor (laplace-torch's ``"marglik"``
    checks its own, per-tensor values included)."""
    if method in READ_BY["grid_size"]:
        check_int("grid_size", grid_size, 1)
    if method in READ_BY["n_steps"]:
        check_int("n_steps", n_steps, 1)
    if method in EVIDENCE_METHODS and method != "marglik":
        value = torch.as_tensor(init_prior_prec)
        if value.numel() != 1 or not bool(torch.isfinite(value).all() and (value > 0).all()):
            raise ValueError(
                f"method={method!r} starts the evidence search from one prior precision for "
                f"every tensor; init_prior_prec must be a finite number > 0, got "
                f"{init_prior_prec!r}. Per-tensor starting values: method='marglik'."
            )
