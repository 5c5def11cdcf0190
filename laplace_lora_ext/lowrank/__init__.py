"""Low-rank Kronecker factor algebra: drop-ins for laplace-torch's ``Kron`` / ``KronDecomposed``
where large factor sides are kept as rank-k PSD approximations ``U diag(s) Uᵀ``."""

from .factor import LowRankFactor
from .kron import LowRankKron, LowRankKronDecomposed, kron_from_dense, to_dense_kron

__all__ = [
    "LowRankFactor",
    "LowRankKron",
    "LowRankKronDecomposed",
    "kron_from_dense",
    "to_dense_kron",
]
