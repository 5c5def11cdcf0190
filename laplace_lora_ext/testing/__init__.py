"""Brute-force references and model patches shared by ``tests/`` and ``benchmarks/``.

``reference``: explicit Jacobians, exact GGN, KFAC by loops, dense Kronecker factors, ``rel``.
``models``: exact float64 RMSNorm, ``lora_B`` perturbation (a "trained" adapter).
"""

from .models import exact_float64_norms, perturb_lora_B
from .reference import (
    dense_kron_factors,
    exact_ggn,
    exact_ggn_blocks,
    explicit_jacobians,
    ggn_from_jacobians,
    kfac_reference,
    kron_block_dense,
    kron_frobenius,
    layer_io_jacobians,
    reaching_positions,
    rel,
    softmax_hessian,
)

__all__ = [
    "dense_kron_factors",
    "exact_float64_norms",
    "exact_ggn",
    "exact_ggn_blocks",
    "explicit_jacobians",
    "ggn_from_jacobians",
    "kfac_reference",
    "kron_block_dense",
    "kron_frobenius",
    "layer_io_jacobians",
    "perturb_lora_B",
    "reaching_positions",
    "rel",
    "softmax_hessian",
]
