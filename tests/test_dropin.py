"""Drop-in use from laplace-torch code (issue 14, sections 1 and 3): the model call
convention, ``pred_type="nn"`` state, keywords honoured or refused, stock backends,
construction-time validation and the laplace-torch compatibility layer."""

from __future__ import annotations

import pytest

from tests.models import lora_laplace, tiny_llama


@pytest.mark.parametrize(
    "structure, kwargs, match",
    [
        ("kron", {"kfac_approx": "mean"}, "kfac_approx must be one of"),
        ("kron", {"fisher_type": "hessian"}, "fisher_type must be one of"),
        ("diag", {"fisher_type": "gauss"}, "fisher_type must be one of"),
        ("full", {"fisher_type": None}, "fisher_type must be one of"),
        ("kron", {"mc_samples": 0}, "mc_samples"),
        ("kron", {"factor_rank": 2.5}, "factor_rank"),
        ("kron", {"rank_threshold": -1}, "rank_threshold"),
        ("kron", {"seed": "zero"}, "seed"),
    ],
)
def test_unknown_options_fail_at_construction(structure, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_laplace(tiny_llama(), structure, **kwargs)  # no fit needed
