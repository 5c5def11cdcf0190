"""Saving and loading a ``lora`` posterior (``la.state_dict()`` / ``la.load_state_dict``).

laplace-torch's state dict holds the curvature, mean and prior but not the options that
shaped them; this mixin adds them (``lora_config``) and refuses to load a posterior into an
object built with other options or for other LoRA parameters, so a loaded posterior never
predicts with curvature that belongs to another model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import guards
from ..lowrank import LowRankFactor

__all__ = ["FIT_STATE", "PosteriorPersistenceMixin"]

FIT_STATE = (
    "H",
    "H_facs",
    "loss",
    "n_data",
    "n_outputs",
    "mean",
    "_prior_precision",
    "_prior_mean",
    "_posterior_scale",
)
"""Attributes a failed ``fit`` or ``load_state_dict`` puts back (both rebind them, never
mutate in place)."""


class PosteriorPersistenceMixin:
    """``state_dict`` / ``load_state_dict`` with the options of the ``lora`` classes
    (needs ``lora_param_names``, ``params``, ``factor_rank``, ``kfac_approx``,
    ``fisher_type`` and ``_key``)."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lora_config"] = {
            "param_names": self.lora_param_names,
            "hessian_structure": self._key[1],
            **self._saved_options(),
            "param_shapes": [tuple(p.shape) for p in self.params],
        }
        if _is_factor_lists(state.get("H")):  # kron: low-rank factors as plain dicts
            state["H"] = [[_plain(F) for F in block] for block in state["H"]]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a posterior saved by :meth:`state_dict` (atomic: a refused one changes
        nothing). The training data of an earlier ``fit`` are forgotten: they do not belong
        to the loaded posterior, so the training-data prior rules need a new ``fit`` (the
        default falls back to ``"lora_marglik"`` with a warning).

        Raises:
            ValueError: the saved posterior was built with another ``hessian_structure`` or
                other options (``factor_rank``, ``kfac_approx``, ``fisher_type``,
                ``damping``) or for other LoRA parameters (names or
                shapes), or holds NaN/inf (:class:`~laplace_lora_ext.guards.NonFiniteError`).

        Warns:
            UserWarning: when the loaded ``mean`` differs from the model's current LoRA
                weights (the posterior was fitted at other weights).
        """
        if _is_factor_lists(state_dict.get("H")):  # a copy: the caller's dict stays as it is
            state_dict = {**state_dict, "H": [[_factor(F) for F in b] for b in state_dict["H"]]}
        config = state_dict.get("lora_config")
        if config is not None:
            self._check_saved_config(config)
        guards.check_finite_saved(state_dict)  # before laplace-torch decomposes it
        with guards.restore_on_error(self, FIT_STATE):
            super().load_state_dict(state_dict)
        # the training data of an earlier fit do not belong to the loaded posterior: the
        # training-data prior rules would read them (the default falls back with a warning)
        self._fit_loaders = None
        guards.warn_if_mean_differs(self.mean, self.params)

    def _saved_options(self) -> dict[str, Any]:
        """The construction options a saved posterior must match (``damping``: ``kron``'s
        damped prior, ``False`` for the other structures)."""
        return {
            "factor_rank": self.factor_rank,
            "kfac_approx": self.kfac_approx,
            "fisher_type": self.fisher_type,
            "damping": bool(getattr(self, "damping", False)),
        }

    def _check_saved_config(self, config: Mapping[str, Any]) -> None:
        structure = config.get("hessian_structure", self._key[1])
        if structure != self._key[1]:
            raise ValueError(
                f"The saved posterior has hessian_structure={structure!r} but this object is "
                f"{self._key[1]!r}; build it with Laplace(..., hessian_structure={structure!r}) "
                "before load_state_dict."
            )
        for key, value in self._saved_options().items():
            if key in config and config[key] != value:
                raise ValueError(
                    f"The saved posterior has {key}={config[key]!r} but this object was built "
                    f"with {key}={value!r}; build it with the same {key} (and "
                    "the same other options) before load_state_dict."
                )
        if config["param_names"] != self.lora_param_names:
            raise ValueError(_param_names_message(config["param_names"], self.lora_param_names))
        shapes = [tuple(p.shape) for p in self.params]
        saved = [tuple(s) for s in config.get("param_shapes", shapes)]
        if saved != shapes:
            bad = next(i for i, (a, b) in enumerate(zip(saved, shapes, strict=True)) if a != b)
            raise ValueError(
                f"The saved posterior's {self.lora_param_names[bad]} has shape {saved[bad]} "
                f"but the model's is {shapes[bad]} (another LoRA rank?); rebuild the model "
                "with the same LoraConfig."
            )


_LOW_RANK_KEY = "low_rank_factor"


def _is_factor_lists(H: Any) -> bool:
    """Whether ``H`` is a Kronecker posterior's saved factors (a list of factor lists)."""
    return isinstance(H, list) and all(isinstance(block, list) for block in H)


def _plain(F: Any) -> Any:
    """A Kronecker factor as ``torch.load(weights_only=True)`` reads it: a tensor as it is,
    a :class:`~laplace_lora_ext.lowrank.LowRankFactor` as a dict of tensors and ints."""
    return {_LOW_RANK_KEY: F.state()} if isinstance(F, LowRankFactor) else F


def _factor(F: Any) -> Any:
    """Inverse of :func:`_plain` (files saved before it hold the objects themselves)."""
    if isinstance(F, dict) and _LOW_RANK_KEY in F:
        return LowRankFactor.from_state(F[_LOW_RANK_KEY])
    return F


def _param_names_message(saved: list[str], here: list[str]) -> str:
    """Why a saved posterior's parameter names differ from this object's: the first pair
    that differs, and whether only a wrapper's name prefix does (every saved name ends
    with this object's, or the other way round)."""
    n = min(len(saved), len(here))
    first = next(
        ((a, b) for a, b in zip(saved, here, strict=False) if a != b),
        (saved[n] if len(saved) > n else None, here[n] if len(here) > n else None),
    )
    msg = (
        f"The saved posterior covers different LoRA parameters than this model "
        f"({len(saved)} vs {len(here)} tensors; first difference: saved {first[0]!r}, "
        f"here {first[1]!r}). "
    )
    if len(saved) == len(here) and all(
        a.endswith(b) or b.endswith(a) for a, b in zip(saved, here, strict=True)
    ):  # the same names under another wrapper's prefix
        return msg + (
            "Only the name prefix differs: was the posterior saved on the model in another "
            "wrapper (e.g. the PeftModel itself vs SequenceClassifier / LastTokenChoiceLM)? "
            "Build the Laplace object on the model wrapped as when it was saved."
        )
    return msg + "Rebuild the model with the same LoraConfig, adapter and lora_modules."
