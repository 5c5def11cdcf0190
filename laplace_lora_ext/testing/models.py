"""Model patches shared by the tests and the benchmarks: exact float64 norms and a
"trained" adapter (``lora_B`` moved off its zero init)."""

from __future__ import annotations

import types

import torch

__all__ = ["perturb_lora_B", "exact_float64_norms"]


def perturb_lora_B(
    model: torch.nn.Module, seed: int = 0, scale: float = 0.3, dtype: torch.dtype | None = None
) -> None:
    """Move every ``lora_B`` away from its zero init (emulates a trained adapter).

    Draws ``N(0, 1)`` from ``torch.Generator().manual_seed(seed)`` in ``dtype`` (``None``:
    each parameter's own dtype), in ``named_parameters()`` order, and multiplies by ``scale``
    in the wider of the draw's and the parameter's dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                z = torch.randn(p.shape, generator=gen, dtype=dtype or p.dtype)
                p.copy_(scale * z.to(torch.promote_types(z.dtype, p.dtype)))


def _rmsnorm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_float64_norms(model: torch.nn.Module) -> None:
    """HF's RMSNorm computes in float32 even for float64 inputs; brute-force comparisons
    need float64 throughout, so compute every ``*RMSNorm`` in its input dtype (in place)."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rmsnorm_in_input_dtype, module)
