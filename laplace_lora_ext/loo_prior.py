"""The leave-one-out prior: ``optimize_prior_precision(method="leave_one_out")``.

Why. Once an adapter has memorised its training data (training NLL ≈ 0), the training data
no longer say how much of the fine-tuning change carries over to new inputs: the evidence's
curvature has vanished (``p(1 - p) → 0``) and the size of the fitted change (the
function-space rule, :func:`laplace_lora_ext.prior.function_space_precision`) is the same
whether the change generalises or not. Leaving each training example out does say it, and
the adapter's linearised model gives the leave-one-out prediction in closed form, without
retraining:

* **Kernel.** ``J0_n`` ``(C-1, P_B)``: the Jacobian of the class-centred logits of example
  ``n`` with respect to the ``lora_B`` matrices at ``B = 0`` (the adapter before
  fine-tuning) and ``lora_A`` redrawn from PEFT's initialisation (:func:`lora_a_redrawn`),
  in an orthonormal basis ``Q`` ``(C, C-1)`` of the centred logits; ``K = J0 J0ᵀ``
  ``(M(C-1), M(C-1))``, averaged over :data:`KERNEL_DRAWS` draws of ``lora_A``. At ``B = 0``
  the kernel does not yet contain the fitted labels. The kernel at the MAP does: there its
  leave-one-out predictions of memorised SmolLM2 adapters were 98 % accurate where
  validation accuracy was 42-72 % (``benchmarks/prior_loo_check.py``). The trained
  ``lora_A`` does too, more weakly: after 30 epochs it has been fitted to every training
  example, the left-out one too. Redrawing it had the lower validation NLL on the memorised
  benchmark (1.073 against 1.081 over 9 checkpoints,
  ``benchmarks/prior_loo_redrawn_check.py``); ``kernel_lora_a="trained"`` keeps the trained
  one. At ``B = 0`` the forward pass does not depend on ``lora_A``, so the mean over draws
  tends to the kernel's expectation over the initialisation, which depends on no seed; 8
  draws had a slightly lower validation NLL than one (1.072 against 1.073,
  ``benchmarks/prior_loo_draws_check.py``). The draws share one Jacobian pass: at ``B = 0``
  the gradient that reaches each ``lora_B`` does not depend on ``lora_A``, only ``lora_B``'s
  input ``A x`` does, so each draw costs one ``A x`` and one per-example product.
* **Targets.** ``y_n = Qᵀ (f_MAP(x_n) - f_base(x_n))`` ``(C-1,)``: the change fine-tuning made
  (adapters switched off for ``f_base``).
* **Leave-one-out.** Kernel regression (the minimum-norm ``B`` that fits the other examples,
  which is where gradient descent from ``B = 0`` ends in the linear model) predicts example
  ``n`` from the others with residual ``y_n - μ_-n = [K⁻¹]_nn⁻¹ [K⁻¹ y]_n`` (blocks of
  ``C - 1`` rows), :func:`loo_residuals`.
* **Scale.** ``δ_B``, one precision for every tensor but ``lora_A`` (whose prior stays
  spread-matched, as in the other rules), minimises the NLL of the training labels under the
  posterior's own predictive centred at the leave-one-out logits ``f_MAP(x_n) - Q (y_n -
  μ_-n)``. At memorisation an example's own curvature is negligible, so the posterior's
  variance at ``x_n`` is already about what it would be without ``x_n``.

Cost: two more GLM passes over the examples used (the Jacobians at ``B = 0``, for every
draw of ``lora_A`` whose rows fit :data:`LOO_DRAW_BYTES`, and at the MAP), one more pass at
``B = 0`` per group of draws that did not fit, one forward with the adapters off, an
``M(C-1)``-sided Cholesky, and the grid's predictive evaluations on those examples. ``K``
needs every ``J0_n`` at once, so the examples used are the first ``M`` of the training data
whose ``J0`` fit in :data:`LOO_JACOBIAN_BYTES`; with fewer examples each one is predicted
from fewer others, which errs towards more variance. In a data-parallel fit each rank
leaves one out within its own shard and the grid's NLL sums are all-reduced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import tqdm
from torch import Tensor

from . import distributed, guards
from .adapter_init import gaussian_lora_a_adapters
from .curvature.capture import Captured
from .inputs import forward_logits, split_batch
from .jacobian_cache import LogitJacobianCache
from .prior import (
    RuleNotApplicableError,
    UnchangedLogitsError,
    agree_on_rule,
    lora_a_mask,
    lora_b_zeroed,
    spread_matched_precision,
)

__all__ = [
    "LOO_JACOBIAN_BYTES",
    "LOO_DRAW_BYTES",
    "KERNEL_LORA_A",
    "KERNEL_DRAWS",
    "lora_b_zeroed",
    "lora_a_redrawn",
    "centred_basis",
    "loo_residuals",
    "loo_cache",
    "loo_precision",
    "best_loo_precision",
]

#: Memory for the ``B = 0`` Jacobians of the examples used (later examples are left out).
LOO_JACOBIAN_BYTES = 1024**3
#: Memory for the centred Jacobian rows of the kernel's further draws of ``lora_A`` held
#: in one pass with the first draw's; draws that do not fit take further passes.
LOO_DRAW_BYTES = 2 * 1024**3
#: Jacobian blocks of the examples used, at the MAP, kept for the grid (else recomputed).
LOO_CACHE_BYTES = 2 * 1024**3
#: ``log10 δ_B``: a coarse grid, then a fine one around its best value.
COARSE_LOG10 = torch.arange(-4.0, 6.01, 0.5)
FINE_STEP = 0.0625
#: The kernel's ``lora_A``: ``"trained"`` (as fitted) or ``"redrawn"`` (a fresh draw from
#: PEFT's initialisation, seeded by :data:`REDRAW_SEED`; see :func:`lora_a_redrawn`).
KERNEL_LORA_A = ("trained", "redrawn")
REDRAW_SEED = 0
#: How many draws of ``lora_A`` the redrawn kernel averages (seeds ``REDRAW_SEED + i``).
#: A Monte Carlo mean, not the exact expectation over the draw: that is the kernel of the
#: full ``out × in`` weight matrices, whose per-example Jacobians do not fit at LLM sizes.
KERNEL_DRAWS = 8


@contextmanager
def lora_a_redrawn(la: Any, seed: int = REDRAW_SEED) -> Iterator[None]:
    """Every ``lora_A`` tensor of ``la.params`` drawn anew as PEFT initialises it
    (Kaiming-uniform with ``a = √5``: uniform on ``±1/√fan_in``, ``fan_in`` the elements
    of one row; normal with std ``1/r`` after ``init_lora_weights="gaussian"``), from a CPU
    generator seeded with ``seed`` (the same draw on every rank), then restored exactly
    (also when the body raises).

    Why: after many epochs the trained ``lora_A`` has been fitted to every training
    example, the one a leave-one-out prediction leaves out too; a kernel built on it
    predicts left-out training examples better than the MAP predicts new inputs
    (docs/benchmarks.md, ``pet_species_mc``)."""
    with _lora_a_set(la, _draws_of_lora_a(la, seed)):
        yield


@contextmanager
def _lora_a_set(la: Any, values: dict[str, Tensor]) -> Iterator[None]:
    """The ``lora_A`` tensors of ``la.params`` named in ``values`` set to them, then
    restored exactly (also when the body raises)."""
    saved = [
        (p, p.detach().clone(), values[name])
        for p, name in zip(la.params, la.lora_param_names, strict=True)
        if name in values
    ]
    try:
        with torch.no_grad():
            for p, _, value in saved:
                p.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for p, value, _ in saved:
                p.copy_(value)


def centred_basis(C: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(C, C-1)`` orthonormal basis of the class-centred logits (``Qᵀ 1 = 0``)."""
    q, _ = torch.linalg.qr(torch.eye(C, dtype=torch.float64) - 1.0 / C)
    return q[:, : C - 1].to(dtype)


def loo_residuals(y: Tensor, K: Tensor) -> Tensor:
    """Kernel-regression leave-one-out residuals ``y_n - μ_-n`` ``(M, k)``.

    Args:
        y: targets ``(M, k)``, ``k`` outputs per example.
        K: their kernel ``(Mk, Mk)`` (example-major, as ``y.reshape(-1)``), positive
            semi-definite; a relative jitter of 1e-10 keeps it invertible.

    ``μ_-n = K_n,-n K_-n,-n⁻¹ y_-n`` is the noise-free kernel prediction of example ``n``
    from the others; the closed form ``[K⁻¹]_nn⁻¹ [K⁻¹ y]_n`` needs one Cholesky.
    """
    M, k = y.shape
    K = K.double()
    jitter = 1e-10 * float(K.diagonal().mean().clamp_min(1e-300))
    L = torch.linalg.cholesky(K + jitter * torch.eye(M * k, dtype=K.dtype, device=K.device))
    K_inv = torch.cholesky_inverse(L)
    alpha = (K_inv @ y.double().reshape(-1)).view(M, k)
    idx = torch.arange(M, device=K.device)
    diag_blocks = K_inv.view(M, k, M, k)[idx, :, idx, :]  # (M, k, k)
    return torch.linalg.solve(diag_blocks, alpha.unsqueeze(-1)).squeeze(-1)


def _draws_of_lora_a(la: Any, seed: int) -> dict[str, Tensor]:
    """One draw of every ``lora_A`` tensor of ``la.params`` from PEFT's initialisation
    (Kaiming-uniform with ``a = √5``: uniform on ``±1/√fan_in``, ``fan_in`` the elements of
    one row; for an adapter made with ``init_lora_weights="gaussian"``, normal with std
    ``1/r``, ``r`` the tensor's rows), by parameter name, from a CPU generator seeded with
    ``seed`` (the same draw on every rank), each on its parameter's device."""
    gaussian = gaussian_lora_a_adapters(la.model)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for target in la.lora_targets:  # the order of la.params, so the draws keep theirs
        if target.kind == "lora_A":
            weight = target.module.weight
            value = torch.empty(weight.shape, dtype=weight.dtype)
            if target.adapter in gaussian:
                value.normal_(0.0, 1.0 / weight.shape[0], generator=gen)
            else:
                bound = 1.0 / weight[0].numel() ** 0.5
                value.uniform_(-bound, bound, generator=gen)
            out[f"{target.name}.weight"] = value.to(weight.device)
    return out


def _lora_pairs(targets: list) -> list[tuple[int, int]]:
    """``(lora_B index, its lora_A index)`` into ``targets`` for every ``lora_B``."""
    where = {t.name: i for i, t in enumerate(targets)}
    return [
        (i, where[t.name.replace(".lora_B.", ".lora_A.", 1)])
        for i, t in enumerate(targets)
        if t.kind == "lora_B"
    ]


def _lora_b_sees_lora_a_of_x(cap: Captured, targets: list) -> bool:
    """Whether each ``lora_B``'s captured input is its ``lora_A`` applied to the ``lora_A``'s
    captured input (to 1 % in norm); not so for a PEFT LoRA variant that changes the path."""
    for b, a in _lora_pairs(targets):
        x, seen = cap.inputs[a], cap.inputs[b]
        own = torch.nn.functional.linear(x, targets[a].module.weight.detach().to(x.dtype))
        if not float((own - seen).norm()) <= 1e-2 * float(seen.norm()) + 1e-30:
            return False
    return True


def _lora_b_inputs(cap: Captured, targets: list, draw: dict[str, Tensor]) -> list[Tensor]:
    """The captured layer inputs with each ``lora_B``'s input ``(B, T, r)`` recomputed as
    ``lora_A(x)`` with ``lora_A`` from ``draw``. At ``B = 0`` nothing else in the forward
    pass depends on ``lora_A``, so these are the inputs that draw would have produced
    (where :func:`_lora_b_sees_lora_a_of_x`)."""
    inputs = list(cap.inputs)
    for b, a in _lora_pairs(targets):
        x = cap.inputs[a]
        weight = draw[f"{targets[a].name}.weight"].to(device=x.device, dtype=x.dtype)
        inputs[b] = torch.nn.functional.linear(x, weight)
    return inputs


def _centred_jacobian_rows(
    la: Any, X: Any, free: Tensor, draws: list[dict[str, Tensor] | None]
) -> tuple[list[Tensor], int]:
    """``(rows, bytes)``: per entry of ``draws``, the ``B = 0`` Jacobian ``(B(C-1), P_B)``
    of the logits of inputs ``X`` with respect to the ``free`` tensors, in the centred
    basis (example-major), with ``lora_A`` from that draw (``None``: as it is now); and the
    bytes of one uncentred ``(B, C, P_B)`` Jacobian (the budget's unit).

    One forward and ``C`` backward passes serve every draw: at ``B = 0`` the gradient that
    reaches each ``lora_B`` does not depend on ``lora_A``, only ``lora_B``'s input
    ``A x`` does (:func:`_lora_b_inputs`). Where a LoRA variant breaks that, each draw is
    set in the model and takes its own pass."""
    backend = la.backend
    with lora_b_zeroed(la):
        cap = backend.capture(X)
        shared = all(d is None for d in draws) or _lora_b_sees_lora_a_of_x(cap, backend.targets)
        if shared:
            views = [
                cap
                if d is None
                else Captured(cap.logits, _lora_b_inputs(cap, backend.targets, d), cap.outputs)
                for d in draws
            ]
            rows = _rows_from_capture(la, cap, views, free)
    if not shared:
        return _rows_draw_by_draw(la, X, free, draws)
    B, C = cap.logits.shape
    uncentred_bytes = B * C * rows[0].shape[-1] * rows[0].element_size()
    return [r.reshape(-1, r.shape[-1]) for r in rows], uncentred_bytes


def _rows_from_capture(la: Any, cap: Captured, views: list[Captured], free: Tensor) -> list[Tensor]:
    """Per view (the capture with one draw's ``lora_B`` inputs), the Jacobian of the
    captured logits with respect to the ``free`` tensors in the centred basis
    ``(B, C-1, P_B)``, from ``C`` backward passes shared by all views."""
    backend, keep = la.backend, free.tolist()
    B, C = cap.logits.shape
    P_B = sum(p.numel() for p, k in zip(la.params, keep, strict=True) if k)
    Q = centred_basis(C).to(cap.logits.device)
    rows = [cap.logits.new_zeros((B, C - 1, P_B), dtype=torch.float64) for _ in views]
    for c, grads in enumerate(backend.logit_output_gradients(cap)):
        for d, view in enumerate(views):
            phis = backend.per_example_gradients(view, grads)
            J_c = torch.cat([W for W, k in zip(phis, keep, strict=True) if k], -1).double()
            rows[d] += J_c.unsqueeze(1) * Q[c].view(1, -1, 1)
    return rows


def _rows_draw_by_draw(
    la: Any, X: Any, free: Tensor, draws: list[dict[str, Tensor] | None]
) -> tuple[list[Tensor], int]:
    """:func:`_centred_jacobian_rows` with one pass per draw, the draw set in the model."""
    rows, nbytes = [], 0
    for draw in draws:
        with _lora_a_set(la, draw or {}):
            (J,), nbytes = _centred_jacobian_rows(la, X, free, [None])
        rows.append(J)
    return rows, nbytes


def _draws_that_fit(rows_of_one_draw: list[Tensor]) -> int:
    """How many draws' Jacobian rows one pass holds: one, plus as many as fit
    :data:`LOO_DRAW_BYTES` at the size of ``rows_of_one_draw``."""
    size = sum(r.numel() * r.element_size() for r in rows_of_one_draw)
    return 1 + int(LOO_DRAW_BYTES // max(size, 1))


def _checked_draws(kernel_lora_a: str, kernel_draws: int | None) -> int:
    if kernel_lora_a not in KERNEL_LORA_A:
        raise ValueError(f"kernel_lora_a must be one of {KERNEL_LORA_A}, got {kernel_lora_a!r}.")
    if kernel_draws is None:
        kernel_draws = KERNEL_DRAWS if kernel_lora_a == "redrawn" else 1
    if (
        not isinstance(kernel_draws, int)
        or kernel_draws < 1
        or (kernel_lora_a == "trained" and kernel_draws != 1)
    ):
        raise ValueError(
            f"kernel_draws must be a positive integer, and 1 (or None) with "
            f"kernel_lora_a='trained' (there is one trained lora_A), got {kernel_draws!r}."
        )
    return kernel_draws


def _kernel_and_base(
    la: Any,
    batches: Iterable[Any],
    free: Tensor,
    kernel_lora_a: str = "redrawn",
    kernel_draws: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, list]:
    """``K`` ``(M(C-1), M(C-1))`` from the ``B = 0`` Jacobians of the ``free`` tensors (in
    the centred basis; ``lora_A`` as :data:`KERNEL_LORA_A` says; with ``"redrawn"`` the mean
    of the kernels of ``kernel_draws`` draws, seeded ``REDRAW_SEED + i``, by default
    :data:`KERNEL_DRAWS`; ``"trained"`` is one kernel), the base logits
    ``(M, C)`` and the batches used: the first ones whose Jacobian rows fit
    :data:`LOO_JACOBIAN_BYTES` (at least one batch).

    One pass over the batches forms every draw's rows whose memory fits
    :data:`LOO_DRAW_BYTES` (:func:`_centred_jacobian_rows`); the draws left over take
    further passes over the batches used, as many draws each as fit. ``progress``: a tqdm
    bar over the batches of the first pass."""
    n_draws = _checked_draws(kernel_lora_a, kernel_draws)
    draws: list[dict[str, Tensor] | None] = (
        [_draws_of_lora_a(la, REDRAW_SEED + i) for i in range(n_draws)]
        if kernel_lora_a == "redrawn"
        else [None]
    )
    rows: list[list[Tensor]] = [[] for _ in draws]
    bases, used, size = [], [], 0
    with guards.eval_mode(la.model):
        bar = tqdm.tqdm(batches, desc="[Leave-one-out kernel]", leave=False, disable=not progress)
        for batch in bar:
            X, _ = split_batch(batch, la.dict_key_y, la._device)
            J, nbytes = _centred_jacobian_rows(la, X, free, draws[: len(rows)])
            size += nbytes
            if used and size > LOO_JACOBIAN_BYTES:
                break
            with torch.no_grad(), lora_b_zeroed(la):
                bases.append(forward_logits(la.model, X, la.dict_key_y).double())
            for held, J_d in zip(rows, J, strict=True):
                held.append(J_d)
            used.append(batch)
            del rows[_draws_that_fit(rows[0]) :]
        bar.close()
        K = sum(_gram(held) for held in rows)
        done = len(rows)
        while done < n_draws:  # the draws that did not fit, on the same examples
            group = draws[done : done + _draws_that_fit(rows[0])]
            more: list[list[Tensor]] = [[] for _ in group]
            for batch in used:
                X, _ = split_batch(batch, la.dict_key_y, la._device)
                J, _ = _centred_jacobian_rows(la, X, free, group)
                for held, J_d in zip(more, J, strict=True):
                    held.append(J_d)
            K += sum(_gram(held) for held in more)
            done += len(group)
    return K / n_draws, torch.cat(bases), used


def _gram(rows: list[Tensor]) -> Tensor:
    """``J Jᵀ`` of the stacked rows ``J`` ``(M(C-1), P_B)``."""
    J = torch.cat(rows)
    return J @ J.T


def _grid_nll(
    la: Any,
    caches: list[LogitJacobianCache],
    prior_at: Any,
    log10_deltas: Tensor,
    n_samples: int | None,
    progress: bool = False,
) -> Tensor:
    """Summed NLL of the training labels ``(G,)`` per ``δ_B`` over ``caches`` (and over all
    ranks in a data-parallel fit); ``progress``: a tqdm bar over the grid."""
    sums = []
    grid = log10_deltas.tolist()
    for d in tqdm.tqdm(grid, desc="[Leave-one-out grid]", leave=False, disable=not progress):
        la.prior_precision = prior_at(10.0**d)
        total = torch.zeros((), dtype=torch.float64)
        for cache in caches:
            gen = torch.Generator(device=la._device).manual_seed(0)  # same draws per value
            probs = cache.probs(la, "mc", n_samples, gen)
            labels = cache.labels.long().reshape(-1, 1).to(probs.device)
            total += -probs.gather(1, labels).clamp_min(1e-12).log().sum().double().cpu()
        sums.append(total)
    total = torch.stack(sums).nan_to_num(float("inf"))
    if distributed.is_distributed():
        total = total.to(la._device)
        torch.distributed.all_reduce(total)
        total = total.cpu()
    return total


def loo_cache(
    la: Any,
    batches: Iterable[Any],
    kernel_lora_a: str = "redrawn",
    kernel_draws: int | None = None,
    progress: bool = False,
) -> LogitJacobianCache:
    """The training examples used (the first ones whose ``B = 0`` Jacobians fit
    :data:`LOO_JACOBIAN_BYTES`) with their MAP Jacobian blocks and labels, centred at the
    leave-one-out logits ``f_MAP(x_n) - Q (y_n - μ_-n)`` ``(M, C)`` (module docstring),
    the kernel's ``lora_A`` as ``kernel_lora_a`` says (:data:`KERNEL_LORA_A`; a redrawn
    kernel is the mean over ``kernel_draws`` draws, :data:`KERNEL_DRAWS` if ``None``).
    ``progress``: tqdm bars over the two passes over the batches.

    Raises:
        UnchangedLogitsError: the adapter has not changed the logits (``B = 0``).
        ValueError: fewer than two training examples.
    """
    is_a = lora_a_mask(la.lora_param_names)
    K, f_base, used = _kernel_and_base(
        la, batches, ~is_a, kernel_lora_a, kernel_draws, progress=progress
    )
    cache = LogitJacobianCache(
        la, used, max_bytes=LOO_CACHE_BYTES, in_eigenbasis=True, progress=progress
    )
    f_map = cache.logits.double().to(f_base.device)
    if len(f_map) < 2:
        raise RuleNotApplicableError("method='leave_one_out' needs at least two training examples.")
    Q = centred_basis(f_map.shape[-1]).to(f_map.device)
    y = (f_map - f_base) @ Q  # (M, C-1)
    if not float(y.square().sum()) > 0:
        raise UnchangedLogitsError(
            "The adapter does not change the logits on the training data (B = 0?), so "
            "the leave-one-out prior is undefined; use method='lora_marglik'."
        )
    return cache.with_logits(f_map - loo_residuals(y, K) @ Q.T)


def loo_precision(
    la: Any,
    batches: Iterable[Any],
    n_samples: int | None = None,
    kernel_lora_a: str = "redrawn",
    kernel_draws: int | None = None,
    progress: bool = False,
) -> Tensor:
    """``(L,)``: ``lora_A`` at :func:`spread_matched_precision`, every other tensor at the
    ``δ_B`` whose joint MC predictive (``n_samples`` draws, common random numbers; ``None``:
    :func:`laplace_lora_ext.links.default_draws`, as ``la(x)`` draws), centred at
    the leave-one-out logits of :func:`loo_cache`, has the lowest NLL on the training
    labels (:func:`best_loo_precision`). Leaves ``la.prior_precision`` set to it.
    ``progress``: tqdm bars over the passes over the batches and over the grid.

    Raises:
        UnchangedLogitsError, ValueError: as :func:`loo_cache`.
    """
    error, cache = None, None
    try:
        cache = loo_cache(la, batches, kernel_lora_a, kernel_draws, progress=progress)
    except Exception as e:  # this rank's shard; raised on every rank before the grid
        error = e
    agree_on_rule(error, "building the leave-one-out kernel")
    return best_loo_precision(la, [cache], n_samples, progress=progress)


def best_loo_precision(
    la: Any,
    caches: list[LogitJacobianCache],
    n_samples: int | None = None,
    progress: bool = False,
) -> Tensor:
    """The search of :func:`loo_precision` on leave-one-out caches (their NLLs summed, and
    all-reduced over ranks): a coarse grid over ``10^-4 … 10^6`` (half decades), then
    sixteenths of a decade around its best. Sets and returns ``la.prior_precision``.
    ``progress``: a tqdm bar over each grid."""
    is_a = lora_a_mask(la.lora_param_names)
    base = spread_matched_precision(la).to(la._device, la._dtype)

    def prior_at(delta: float) -> Tensor:
        return torch.where(is_a.to(base.device), base, torch.full_like(base, delta))

    coarse = COARSE_LOG10.double()
    nll = _grid_nll(la, caches, prior_at, coarse, n_samples, progress)
    best = float(coarse[int(nll.argmin())])
    fine = best + FINE_STEP * torch.arange(-8, 9, dtype=torch.float64)
    nll = _grid_nll(la, caches, prior_at, fine, n_samples, progress)
    best = float(fine[int(nll.argmin())])
    prior = prior_at(10.0**best)
    la.prior_precision = prior
    return prior
