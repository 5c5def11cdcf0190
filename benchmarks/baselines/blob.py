"""BLoB: Bayesian Low-Rank Adaptation by Backpropagation (Wang, Shi, Han, Metaxas, Wang,
NeurIPS 2024), on a peft LoRA model.

* **Asymmetric Bayesianisation.** Each ``lora_A[adapter]`` (``r × d_in``) gets a Gaussian
  variational posterior ``q(A) = Π_ij N(A_ij | M_ij, Ω_ij²)`` with mean ``M`` (the module's
  ``weight``, so peft still saves and loads it as the adapter) and standard deviation
  ``Ω = G ⊙ G`` (``G`` learnable, initialised uniformly in ``[ε/√2, ε]``). ``lora_B`` stays
  deterministic. :func:`apply_blob` swaps each ``lora_A`` ``nn.Linear`` for a
  :class:`BlobLoraA` that shares its weight; peft's forward ``B(A(dropout(x)))·s`` is untouched.
* **Flipout.** One noise matrix ``E ~ N(0, Ω²)`` per forward pass and layer, decorrelated
  across examples by random signs: example ``b`` sees ``A_b = M + E ⊙ (s_b r_bᵀ)`` with
  ``r_b ∈ {±1}^{d_in}``, ``s_b ∈ {±1}^r``. ``E ⊙ (s rᵀ)`` has the law of ``E``, so every
  example's output has the moments of plain reparameterisation; the cost is two extra
  ``d_in × r`` matmuls. The signs are per example (shared over a sequence's tokens, so each
  sequence sees one weight sample); the authors' code draws them per token.
* **KL to the full-weight prior.** With ``vec(ΔW) = (I ⊗ B) vec(A)``, ``q`` induces a
  Gaussian on ``vec(ΔW)`` of rank ``d_in·r``. Taking the prior on the full-weight update to
  be the image of ``N(0, σ_p² I)`` on ``A`` under the same map (the low-rank prior of the
  paper's Theorems 3.1–3.2), the KL between the two full-weight Gaussians equals the KL
  between ``q(A)`` and ``N(0, σ_p² I)`` whenever ``B`` has full column rank (KL is invariant
  under injective linear maps), which is closed form::

      KL = Σ_ij [ log(σ_p / Ω_ij) + (Ω_ij² + M_ij²) / (2 σ_p²) − 1/2 ].

  For a rank-deficient ``B`` (e.g. ``B = 0`` at LoRA's init) it is an upper bound.
  ``tests/test_blob.py`` checks both against dense Gaussians over ``vec(ΔW)``.
* **KL weighting.** Minibatch ``i`` of each cycle of ``M`` steps weighs the KL by
  ``π_i = 2^i / (2^{M+1} − 1)`` (:func:`kl_weight`; the weights of a cycle sum to about 1),
  with ``M = ⌊100 · N^{π/γ} / b⌋`` (:func:`default_kl_cycle`, ``N`` training examples,
  batch size ``b``, ``γ = 8``), as in the authors' reference implementation;
  :func:`scaled_kl_cycle` caps ``M`` for runs much shorter than the paper's.
* **Training** (:func:`train_blob`): AdamW with a linear warmup/decay schedule on the
  data term, then a separate SGD step (``kl_lr``, same schedule) on ``π_i · KL`` — the
  reference implementation's split, which keeps the KL gradient's scale (Adam would
  normalise it away).
* **Prediction** (:func:`predict_probs`): ``n_samples`` (paper: 10) stochastic passes,
  softmax probabilities averaged.

Paper defaults (LLaMA2-7B): ``ε = 0.05``, ``σ_p = 0.2``, ``γ = 8``, ``kl_lr = 0.01``,
lr ``1e-4``, batch 4, 5000 steps, LoRA r = 8, α = 16, dropout 0, 1 training sample and 10
test samples.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.baselines.common import lora_layers, mc_predict_probs, seeded
from laplace_lora_ext.inputs import forward_logits, split_batch

__all__ = [
    "BlobLoraA",
    "apply_blob",
    "remove_blob",
    "blob_modules",
    "blob_sampling",
    "gaussian_kl",
    "blob_kl",
    "kl_weight",
    "default_kl_cycle",
    "scaled_kl_cycle",
    "BlobTrainResult",
    "train_blob",
    "predict_probs",
]


class BlobLoraA(nn.Linear):
    """peft ``lora_A`` with a Gaussian variational posterior and Flipout sampling.

    ``weight`` ``(r, d_in)`` is the posterior mean (the very Parameter of the replaced
    ``nn.Linear``); ``blob_g`` ``(r, d_in)`` parametrises the standard deviation
    ``sigma = blob_g ** 2``. With ``sample`` False the module is the plain mean ``A``.
    """

    def __init__(self, base: nn.Linear, eps: float = 0.05) -> None:
        nn.Module.__init__(self)
        if base.bias is not None:
            raise ValueError("lora_A with a bias is not a peft LoRA factor")
        if eps <= 0:
            raise ValueError(f"eps (initial sqrt of the std) must be > 0, got {eps}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        g = torch.empty_like(base.weight).uniform_(eps / math.sqrt(2), eps)
        self.blob_g = nn.Parameter(g, requires_grad=base.weight.requires_grad)
        self.sample = True

    @property
    def sigma(self) -> torch.Tensor:
        """Posterior standard deviation ``Ω = G ⊙ G`` ``(r, d_in)``."""
        return self.blob_g**2

    def draw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise ``E`` ``(r, d_in)`` and per-example signs ``r`` ``(B, 1.., d_in)``, ``s``
        ``(B, 1.., r)`` (one sign vector per leading index, broadcast over tokens)."""
        noise = self.sigma * torch.randn_like(self.weight)
        shape = (x.shape[0],) + (1,) * (x.ndim - 2)
        r = torch.randint(0, 2, (*shape, self.in_features), dtype=x.dtype, device=x.device)
        s = torch.randint(0, 2, (*shape, self.out_features), dtype=x.dtype, device=x.device)
        return noise, 2 * r - 1, 2 * s - 1

    @staticmethod
    def flipout(x: torch.Tensor, noise: torch.Tensor, r: torch.Tensor, s: torch.Tensor):
        """Flipout perturbation ``((x ⊙ r) Eᵀ) ⊙ s`` ``(..., r)``."""
        return F.linear(x * r, noise) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.linear(x, self.weight)
        if not self.sample:
            return mean
        if x.ndim < 2:
            raise ValueError(f"BLoB's lora_A needs a batch dimension; got input {tuple(x.shape)}")
        return mean + self.flipout(x, *self.draw(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blob"


def apply_blob(model: nn.Module, eps: float = 0.05, seed: int | None = None) -> list[BlobLoraA]:
    """Replace every ``lora_A[adapter]`` of ``model``'s peft LoRA layers by a
    :class:`BlobLoraA` (idempotent); returns the BLoB modules.

    The means are the current LoRA A weights (shared Parameters); ``G`` is drawn under
    ``seed``. The layers' forward is peft's own.

    Raises:
        ValueError: no LoRA layer, or a LoRA layer without ``nn.Linear`` ``lora_A``
            (embedding/convolution LoRA is not supported).
    """
    with seeded(seed):
        for layer in lora_layers(model):
            if len(getattr(layer, "lora_embedding_A", {})):
                raise ValueError("BLoB supports LoRA on linear layers only, not embeddings")
            for name, mod in list(layer.lora_A.items()):
                if isinstance(mod, BlobLoraA):
                    continue
                if type(mod) is not nn.Linear:
                    raise ValueError(
                        f"lora_A[{name!r}] is {type(mod).__name__}; BLoB supports nn.Linear "
                        "LoRA factors only (target linear / Conv1D layers)."
                    )
                layer.lora_A[name] = BlobLoraA(mod, eps)
    return blob_modules(model)


def blob_modules(model: nn.Module) -> list[BlobLoraA]:
    """The :class:`BlobLoraA` modules of ``model`` (model order)."""
    return [m for m in model.modules() if isinstance(m, BlobLoraA)]


def remove_blob(model: nn.Module) -> None:
    """Put plain ``nn.Linear`` ``lora_A`` modules (holding the means) back; drops ``G``."""
    for layer in lora_layers(model):
        for name, mod in list(layer.lora_A.items()):
            if isinstance(mod, BlobLoraA):
                plain = nn.Linear(mod.in_features, mod.out_features, bias=False)
                plain.weight = mod.weight
                layer.lora_A[name] = plain


def _require_blob(model: nn.Module) -> list[BlobLoraA]:
    mods = blob_modules(model)
    if not mods:
        raise ValueError("The model has no BLoB layer; call apply_blob(model) first.")
    return mods


@contextlib.contextmanager
def blob_sampling(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, BLoB layers sample (``True``) or use the mean (``False``)."""
    mods = _require_blob(model)
    old = [m.sample for m in mods]
    for m in mods:
        m.sample = enabled
    try:
        yield
    finally:
        for m, s in zip(mods, old, strict=True):
            m.sample = s


def gaussian_kl(mean: torch.Tensor, sigma: torch.Tensor, prior_std: float) -> torch.Tensor:
    """``KL(N(mean, diag(sigma²)) || N(0, prior_std² I))`` summed over entries (scalar)."""
    if prior_std <= 0:
        raise ValueError(f"prior_std must be > 0, got {prior_std}")
    var_ratio = (sigma / prior_std) ** 2
    return 0.5 * (var_ratio + (mean / prior_std) ** 2 - 1 - var_ratio.log()).sum()


def blob_kl(model: nn.Module, prior_std: float = 0.2) -> torch.Tensor:
    """KL between BLoB's full-weight variational distribution and the low-rank full-weight
    prior, summed over all BLoB layers (closed form over ``A``; see the module docstring)."""
    return sum(gaussian_kl(m.weight, m.sigma, prior_std) for m in _require_blob(model))


def kl_weight(step: int, cycle: int, reweight: bool = True) -> float:
    """KL weight ``π`` of training step ``step`` (0-based).

    With ``reweight``: ``i = step mod cycle + 1`` and ``π_i = 2^i / (2^{cycle+1} − 1)``
    (grows geometrically within each cycle; a cycle's weights sum to
    ``1 − 1/(2^{cycle+1} − 1)``). Without: the uniform ``1 / cycle``.

    Raises:
        ValueError: if ``cycle < 1`` or ``step < 0``.
    """
    if cycle < 1 or step < 0:
        raise ValueError(f"need cycle >= 1 and step >= 0, got cycle={cycle}, step={step}")
    if not reweight:
        return 1.0 / cycle
    i = step % cycle + 1
    # 2^i / (2^(M+1) - 1) = 2^(i-M-1) / (1 - 2^-(M+1)), without overflow for large M
    return math.ldexp(1.0, i - cycle - 1) / (1.0 - math.ldexp(1.0, -cycle - 1))


def default_kl_cycle(n_train: int, batch_size: int, gamma: float = 8.0) -> int:
    """The reference implementation's KL cycle ``M = ⌊100 · N^{π/γ} / b⌋`` (at least 1)."""
    if n_train < 1 or batch_size < 1 or gamma <= 0:
        raise ValueError("n_train, batch_size and gamma must be positive")
    return max(1, int(100 * n_train ** (math.pi / gamma) / batch_size))


#: KL cycles in the paper's longest setting (5000 steps, M = 316 for N = 640, b = 4).
PAPER_KL_CYCLES = 16


def scaled_kl_cycle(n_train: int, batch_size: int, steps: int, gamma: float = 8.0) -> int:
    """:func:`default_kl_cycle`, capped at ``steps // PAPER_KL_CYCLES`` (at least 1).

    For runs much shorter than the paper's: a run then has at least as many KL cycles (and
    KL-weighted updates of ``σ``) as the paper's 5000 steps, instead of fewer than one.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return max(1, min(default_kl_cycle(n_train, batch_size, gamma), steps // PAPER_KL_CYCLES))


@dataclass
class BlobTrainResult:
    """Per-step logs of :func:`train_blob` (1-based step -> value)."""

    nll: dict[int, float] = field(default_factory=dict)  # data term (mean over the batch)
    kl: dict[int, float] = field(default_factory=dict)  # full KL (all layers)
    kl_weight: dict[int, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    kl_cycle: int = 0


def _batches(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_loader yielded no batch")


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:  # as benchmarks.finetune's schedule
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _kl_cycle(loader: Iterable, kl_cycle: int | None, gamma: float) -> int:
    if kl_cycle is not None:
        return kl_cycle
    n, b = len(getattr(loader, "dataset", ())), getattr(loader, "batch_size", None)
    if not n or not b:
        raise ValueError(
            "Cannot infer the KL cycle: the loader has no dataset/batch_size; pass kl_cycle=..."
        )
    return default_kl_cycle(n, b, gamma)


def train_blob(
    model: nn.Module,
    train_loader: Iterable,
    steps: int,
    lr: float = 1e-4,
    *,
    kl_lr: float = 0.01,
    prior_std: float = 0.2,
    gamma: float = 8.0,
    kl_cycle: int | None = None,
    kl_reweight: bool = True,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> BlobTrainResult:
    """Train a BLoB model (after :func:`apply_blob`) for ``steps`` minibatches.

    Mirrors :func:`benchmarks.finetune.train`'s loop (AdamW, linear schedule with warmup,
    gradient clipping) on the data term ``CE(logits, labels)`` with one Flipout sample,
    followed each step by an SGD step (``kl_lr``, same schedule) on
    ``kl_weight(step, M) · KL``. ``train_loader`` yields dict batches with ``labels`` and
    is cycled. ``M`` defaults to :func:`default_kl_cycle` of the loader's dataset size and
    batch size. ``callback(step, model)`` runs after each step (e.g. to save checkpoints).
    The model is left in eval mode.

    Raises:
        ValueError: no BLoB layer, ``steps < 1``, or no way to infer the KL cycle.
    """
    _require_blob(model)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cycle = _kl_cycle(train_loader, kl_cycle, gamma)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    opt_kl = torch.optim.SGD(params, lr=kl_lr)
    warmup = int(round(warmup_ratio * steps))
    scheds = [_linear_schedule(o, warmup, steps) for o in (opt, opt_kl)]
    result = BlobTrainResult(kl_cycle=cycle)
    batches = _batches(train_loader)
    model.train()
    with blob_sampling(model, True), seeded(seed):
        for step in range(steps):
            t0 = time.perf_counter()
            x, y = split_batch(next(batches))
            nll = F.cross_entropy(forward_logits(model, x), y)
            opt.zero_grad(set_to_none=True)
            nll.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            weight = kl_weight(step, cycle, kl_reweight)
            kl = blob_kl(model, prior_std)
            opt_kl.zero_grad(set_to_none=True)
            (weight * kl).backward()
            opt_kl.step()
            for s in scheds:
                s.step()
            result.step_seconds.append(time.perf_counter() - t0)
            result.nll[step + 1] = nll.item()
            result.kl[step + 1] = kl.item()
            result.kl_weight[step + 1] = weight
            if callback is not None:
                callback(step + 1, model)
    model.eval()
    return result


@contextlib.contextmanager
def _eval_sampling(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with blob_sampling(model, True):
            yield
    finally:
        model.train(was_training)


def predict_probs(
    model: nn.Module, loader: Iterable, n_samples: int = 10, seed: int | None = 0
) -> torch.Tensor:
    """BLoB predictive ``(N, C)``: softmax probabilities averaged over ``n_samples``
    Flipout samples of every BLoB layer (model in eval mode, so dropout is off)."""
    _require_blob(model)
    return mc_predict_probs(model, loader, n_samples, seed, lambda: _eval_sampling(model))
