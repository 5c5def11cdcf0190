"""LoRA-aware curvature: hook capture, grad-output vectors, KFAC roots, the backend.

Why a backend of our own rather than laplace-torch's (``AsdlGGN``, ``CurvlinopsGGN``,
``BackPackGGN``; see ``benchmarks/bench_peers.py`` and ``tests/test_stock_asdl_bug.py``):

* ASDL's KFAC flattens batch x sequence but laplace-torch divides by the number of
  sequences, so its factors are T times too large on sequence inputs, and it crashes on
  peft's ``ModulesToSaveWrapper``; BackPACK rejects frozen parameters and dict batches.
* curvlinops is correctly scaled, but builds every factor dense: a ``d x d`` factor per
  side, 32000 x 32000 (4 GB) for a LLaMA ``lm_head`` adapter, before any low-rank step.
* None of them knows the attention mask (padding tokens must not count in ``T_n``), nor
  returns the factors as roots ``R`` (factor ``= Rᵀ R``) that :mod:`..lowrank` can compress
  without forming ``d x d``, nor covers only the LoRA matrices of a model whose other
  parameters are trainable too.

The formulas are those of Eschenhagen et al. (2023) (:mod:`.kfac`), tested against KFAC by
explicit loops and the exact GGN (``laplace_lora_ext.testing.reference``).
"""

from .backend import DEFAULT_RANK_THRESHOLD, LoraCurvature

__all__ = ["LoraCurvature", "DEFAULT_RANK_THRESHOLD"]
