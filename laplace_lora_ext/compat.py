"""Everything laplace_lora_ext takes from laplace-torch, in one place, checked at import.

The ``lora`` classes subclass laplace-torch's ``KronLaplace`` / ``DiagLaplace`` /
``FullLaplace`` and rely on private names that may change in any release
(``_check_H_init``, ``_H_factor``, ``_rescale_factors``, ``_curv_closure``,
``utils._is_valid_scalar``, ...). The package imports laplace-torch only through this
module, and :func:`check_laplace_torch` verifies at import that every one of those names
exists with the expected parameters. An incompatible laplace-torch therefore fails at
``import laplace_lora_ext`` with an :class:`IncompatibleLaplaceTorch` error that lists
what is missing, instead of a deep ``AttributeError`` (or a silently wrong answer) later.

Tested with laplace-torch 0.3 (``pyproject.toml`` pins ``laplace-torch>=0.3,<0.4``).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import warnings
from typing import Any

__all__ = [
    "SUPPORTED_VERSIONS",
    "IncompatibleLaplaceTorch",
    "check_laplace_torch",
    "missing_names",
    "BaseLaplace",
    "ParametricLaplace",
    "KronLaplace",
    "DiagLaplace",
    "FullLaplace",
    "CurvatureInterface",
    "CurvlinopsGGN",
    "CurvlinopsEF",
    "Likelihood",
    "Kron",
    "KronDecomposed",
    "block_diag",
    "kron",
    "symeig",
    "is_valid_scalar",
]

SUPPORTED_VERSIONS = (">=0.3", "<0.4")
"""The laplace-torch versions this package is tested with (as in ``pyproject.toml``)."""


class IncompatibleLaplaceTorch(ImportError):
    """The installed laplace-torch lacks names (or signatures) this package relies on."""


def _installed_version() -> str:
    try:
        return importlib.metadata.version("laplace-torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _fail(problem: str) -> IncompatibleLaplaceTorch:
    return IncompatibleLaplaceTorch(
        f"laplace_lora_ext is incompatible with the installed laplace-torch "
        f"{_installed_version()}: {problem}. It needs laplace-torch"
        f"{','.join(SUPPORTED_VERSIONS)}: pip install 'laplace-torch"
        f"{','.join(SUPPORTED_VERSIONS)}'."
    )


try:
    from laplace.baselaplace import (
        BaseLaplace,
        DiagLaplace,
        FullLaplace,
        KronLaplace,
        ParametricLaplace,
    )
    from laplace.curvature import CurvatureInterface, CurvlinopsEF, CurvlinopsGGN
    from laplace.utils.enums import Likelihood
    from laplace.utils.matrix import Kron, KronDecomposed
    from laplace.utils.utils import _is_valid_scalar as is_valid_scalar
    from laplace.utils.utils import block_diag, kron, symeig
except ImportError as e:  # a module or name moved or was renamed
    raise _fail(str(e).split(" (")[0]) from e  # "cannot import name 'x' from 'laplace.y'"


REQUIRED: dict[type, dict[str, tuple[str, ...] | None]] = {
    # member -> parameter names that must appear in its signature (None: just present)
    BaseLaplace: {
        "_device": None,
        "_dtype": None,  # overridden: the posterior's dtype (float32 or better)
        "prior_precision": None,
        "prior_precision_diag": None,
    },
    ParametricLaplace: {
        "_check_H_init": (),
        "_H_factor": None,
        "_init_H": (),
        "_curv_closure": ("X", "y", "N"),
        "_glm_predictive_distribution": ("X", "joint", "diagonal_output"),
        "_nn_predictive_classification": ("X", "n_samples"),
        "_nn_functional_samples": ("X", "n_samples", "generator"),
        "functional_samples": ("x", "pred_type", "n_samples"),
        "predictive_samples": ("x", "pred_type", "n_samples"),
        "sample": ("n_samples", "generator"),
        "state_dict": (),
        "load_state_dict": ("state_dict",),
    },
    KronLaplace: {"_rescale_factors": ("kron", "factor"), "posterior_precision": None},
    # lowrank/kron.py overrides _bmm (called by the stock bmm) and uses _check_deltas
    Kron: {"init_from_model": None, "decompose": ("damping",), "__add__": None, "_bmm": ("W",)},
    KronDecomposed: {
        "bmm": ("W", "exponent"),
        "_bmm": ("W", "exponent"),
        "_check_deltas": ("deltas",),
        "logdet": (),
        "inv_square_form": ("W",),
    },
    # curvature/stock.py: backend=CurvlinopsGGN / CurvlinopsEF, its KFAC over .params
    CurvlinopsGGN: {"kron": ("x", "y", "N"), "_get_kron_factors": ("linop",)},
    CurvlinopsEF: {"kron": ("x", "y", "N"), "_get_kron_factors": ("linop",)},
    CurvatureInterface: {"kron": ("x", "y", "N"), "diag": ("x", "y"), "full": ("x", "y")},
}
"""The laplace-torch members the ``lora`` classes call or override."""


def missing_names(required: dict[type, dict[str, tuple[str, ...] | None]] = REQUIRED) -> list[str]:
    """``Class.member`` entries of ``required`` that are absent or lack a parameter."""
    missing = []
    for cls, members in required.items():
        for name, params in members.items():
            try:
                member = inspect.getattr_static(cls, name)
            except AttributeError:
                missing.append(f"{cls.__name__}.{name}")
                continue
            if params and not _has_params(member, params):
                missing.append(f"{cls.__name__}.{name}({', '.join(params)})")
    return missing


def _has_params(member: Any, params: tuple[str, ...]) -> bool:
    func = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
    try:
        names = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True  # not introspectable: the import-level check must do
    return all(p in names for p in params)


def check_laplace_torch(
    required: dict[type, dict[str, tuple[str, ...] | None]] = REQUIRED,
    version: str | None = None,
) -> None:
    """Raise :class:`IncompatibleLaplaceTorch` if a required name is missing; warn when
    the version is outside :data:`SUPPORTED_VERSIONS` but every name is present."""
    missing = missing_names(required)
    if missing:
        raise _fail(f"missing {', '.join(missing)}")
    version = version or _installed_version()
    if not _version_supported(version):
        warnings.warn(
            f"laplace_lora_ext is tested with laplace-torch{','.join(SUPPORTED_VERSIONS)}, "
            f"found {version}; the names it relies on are present, but results are unverified.",
            stacklevel=2,
        )


def _version_supported(version: str) -> bool:
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (0, 3) <= parts < (0, 4)


check_laplace_torch()
