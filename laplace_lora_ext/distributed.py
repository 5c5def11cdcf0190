"""Data-parallel ``fit`` with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

When a default process group with more than one rank is initialised, every rank fits the
curvature on its own shard of the data and the pieces are combined so that **every rank holds
the posterior of a single-process fit on the full data**:

* dense Kronecker factors, the diagonal (``"diag"``) and the full matrix (``"full"``): one
  ``all_reduce(SUM)`` (coalesced into a few flat buffers);
* the loss: ``all_reduce(SUM)``; the data count: ``all_gather`` of the per-rank counts, checked
  against the ``N`` used to normalise the input factors;
* low-rank factors (:class:`~laplace_lora_ext.lowrank.LowRankFactor`, ``U diag(s) Uᵀ``):
  ``all_gather`` of the roots ``U diag(√s)`` (``d x k`` each, zero-padded to the largest
  ``k``, the padding is dropped again), concatenated to ``(d, Σ k)`` and re-truncated to
  ``max_rank`` with :meth:`LowRankFactor.from_root`; no rank forms a ``d x d`` matrix unless
  ``Σ k > d`` (then ``d x d`` is smaller than the gathered root).

Which loaders are accepted (``len(loader.dataset)`` is N in single-process fits):

* a loader with a :class:`~torch.utils.data.distributed.DistributedSampler` (as ``sampler``
  or inside ``batch_sampler``), the usual case. ``len(loader.dataset)`` is the full N on every
  rank. With ``drop_last=False`` (the default) and N not divisible by the world size, the
  sampler pads the index list by *repeating* samples; the padded positions are
  ``N .. total_size - 1``, i.e. at most one example per rank and always the **last** example
  of that rank's shard. Each rank therefore stops after its first
  ``ceil((N - rank) / world_size)`` examples (slicing the last batch), so every example is
  counted exactly once and the result equals the single-process fit on all N examples
  (up to floating-point summation order). With ``drop_last=True`` the sampler removes the
  tail of the (possibly shuffled) index list instead; then the fit covers those
  ``num_samples * world_size`` examples and that is the N used for the input factors and
  ``n_data`` (equal to a single-process fit on the same subset).
* a loader marked with :func:`mark_sharded`: each rank's ``loader.dataset`` is its own,
  disjoint shard; N is the sum of their lengths.
* any other loader raises a ``ValueError``: a plain loader over the full data on every rank
  would count each example ``world_size`` times. Use ``with distributed.disabled():`` to fit
  rank-local posteriors without any communication.

Notes:
    * All ranks must call ``fit`` together (it runs collectives) with the same model
      parameters (e.g. after DDP training). Before any data collective, one
      ``all_gather_object`` compares a :func:`fingerprint` of every rank (posterior class,
      options, LoRA parameter names/shapes/dtypes, a SHA-256 of the weights): a mismatch
      raises the same :class:`DistributedFitError` on every rank. Failures are collective:
      an exception on one rank while setting up or during its batches (a bad batch, NaN, an
      empty shard, a failing loader) is exchanged at the next sync point and every rank
      raises :class:`DistributedFitError` quoting it, instead of waiting in a collective until
      the process-group timeout. (A rank that never calls ``fit`` still makes the others wait.)
    * ``fisher_type="mc"`` draws labels from the same seeded generator on every rank, so it
      is statistically but not bitwise equivalent to a single-process fit.
    * With ``factor_rank`` below a factor's true rank the result is the best rank-``k``
      approximation of the sum of the per-rank approximations, like the single-process fit
      is of its per-batch approximations; both depend on how the data is split.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .compat import Kron
from .lowrank import LowRankFactor

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "disabled",
    "mark_sharded",
    "data_size",
    "FitShard",
    "shard_batches",
    "DistributedFitError",
    "agree",
    "fingerprint",
    "check_consistent",
    "all_reduce_curvature",
    "all_reduce_dense",
    "all_gather_lowrank",
]

_state = threading.local()
_SHARDED_ATTR = "_laplace_lora_sharded"
_BUCKET_BYTES = 64 * 2**20
"""Dense tensors are all-reduced in flat buffers of about this size (fewer collectives)."""


# ---------------------------------------------------------------------- process group
def _dist() -> Any:
    return torch.distributed


def is_distributed(group: Any = None) -> bool:
    """``True`` when ``torch.distributed`` is initialised with more than one rank (and not
    inside :func:`disabled`)."""
    if getattr(_state, "disabled", 0):
        return False
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1)


def world_size(group: Any = None) -> int:
    """Number of ranks (1 when not distributed)."""
    return _dist().get_world_size(group) if is_distributed(group) else 1


def rank(group: Any = None) -> int:
    """This process's rank (0 when not distributed)."""
    return _dist().get_rank(group) if is_distributed(group) else 0


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Fit rank-local posteriors inside this block: no sharding logic, no collectives."""
    _state.disabled = getattr(_state, "disabled", 0) + 1
    try:
        yield
    finally:
        _state.disabled -= 1


def mark_sharded(loader: DataLoader) -> DataLoader:
    """Declare that ``loader.dataset`` is this rank's own shard (disjoint across ranks).

    The total N is then the sum of ``len(loader.dataset)`` over ranks. Returns ``loader``.
    """
    setattr(loader, _SHARDED_ATTR, True)
    return loader


def _comm_device(device: torch.device, group: Any = None) -> torch.device:
    """Device the collectives run on: CPU for gloo, CUDA for NCCL, else the data's device."""
    backend = str(_dist().get_backend(group)).lower()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return device  # mixed ("cpu:gloo,cuda:nccl"), mpi, ...: use the tensor's own device


# ---------------------------------------------------------------------- shards
def _find_distributed_sampler(loader: DataLoader) -> DistributedSampler | None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if isinstance(inner, DistributedSampler):
        return inner
    return None


def _local_length(loader: DataLoader) -> int:
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise TypeError("fit needs a DataLoader with a .dataset (its length is N).")
    return len(dataset)


def shard_batches(loader: Any, dict_key_y: str = "labels", group: Any = None) -> Any:
    """``loader``'s batches for a sum over ranks: in a data-parallel run, a loader over this
    rank's shard (a ``DistributedSampler``, or :func:`mark_sharded`) gives a list of its
    batches without the sampler's padded duplicates (:class:`FitShard`); any other loader
    (one process, or the same data on every rank) is returned as it is."""
    if not is_distributed(group):
        return loader
    if _find_distributed_sampler(loader) is None and not getattr(loader, _SHARDED_ATTR, False):
        return loader
    return list(FitShard(loader, dict_key_y, group, allow_empty=True).batches())


class FitShard:
    """How this rank iterates a fit loader, and the true data size N.

    Outside a multi-rank process group it is a pass-through: ``n_total`` is
    ``len(loader.dataset)`` (``None`` without one; the caller counts the examples),
    :meth:`batches` yields the loader's batches, ``active`` is False.

    Args:
        loader: the training loader (see the module docstring for what is accepted).
        dict_key_y: key of the labels in dict batches (used to count examples).
        group: process group (default: the world).
        allow_empty: accept a sampler that leaves some rank only padding (a sum over
            ranks, such as the validation grid's, can do without it; a fit cannot).

    Attributes:
        active: whether the fit is data-parallel.
        n_total: N over all ranks (normalisation of the input factors, ``n_data``).
        n_local: examples this rank must contribute (``None``: all it yields).
        n_seen: examples :meth:`batches` yielded (after iterating).
    """

    def __init__(
        self,
        loader: DataLoader,
        dict_key_y: str = "labels",
        group: Any = None,
        allow_empty: bool = False,
    ) -> None:
        self.loader = loader
        self.allow_empty = allow_empty
        self.dict_key_y = dict_key_y
        self.group = group
        self.active = is_distributed(group)
        self.n_local: int | None = None
        self.n_seen = 0
        if not self.active:
            dataset = getattr(loader, "dataset", None)
            has_len = dataset is not None and hasattr(type(dataset), "__len__")
            self.n_total = len(dataset) if has_len else None
            return
        W, r = world_size(group), rank(group)
        sampler = _find_distributed_sampler(loader)
        if sampler is not None:
            self._init_from_sampler(sampler, W, r)
        elif getattr(loader, _SHARDED_ATTR, False):
            self._init_sharded(_local_length(loader))
        else:
            raise ValueError(
                f"Distributed fit ({W} ranks) needs each rank to see its own shard: use a "
                "DataLoader with a torch.utils.data.distributed.DistributedSampler, or "
                "laplace_lora_ext.distributed.mark_sharded(loader) if each rank's dataset is "
                "already a disjoint shard. To fit rank-local posteriors, wrap fit in "
                "`with laplace_lora_ext.distributed.disabled():`."
            )

    def _init_from_sampler(self, sampler: DistributedSampler, W: int, r: int) -> None:
        if sampler.num_replicas != W or sampler.rank != r:
            raise ValueError(
                f"The DistributedSampler has num_replicas={sampler.num_replicas}, "
                f"rank={sampler.rank} but the process group has world size {W}, rank {r}."
            )
        N = len(sampler.dataset)
        if sampler.drop_last:
            # the sampler keeps the first total_size positions: no duplicates
            self.n_total = sampler.num_samples * W
            self.n_local = sampler.num_samples
            smallest = sampler.num_samples
        else:
            # positions rank, rank + W, ...; those >= N are repeated samples (padding)
            self.n_total = N
            self.n_local = _real_count(N, W, r)
            smallest = _real_count(N, W, W - 1)
        if (self.n_total == 0 or smallest <= 0) and not self.allow_empty:
            raise ValueError(
                f"The dataset has {N} examples, too few for {W} ranks "
                f"(drop_last={sampler.drop_last}): some rank would fit on no data."
            )

    def _init_sharded(self, n_local: int) -> None:
        # N is the sum over ranks: exchanged in the fit's first collective (see
        # start_fit), which also reports a failure on any rank to all of them
        self.shard_length: int | None = n_local
        self.n_total = None

    def set_shard_lengths(self, lengths: list[int]) -> None:
        """N from every rank's ``len(loader.dataset)`` (``mark_sharded`` loaders)."""
        if min(lengths) <= 0:
            raise ValueError(
                f"Some rank's dataset shard is empty (lengths per rank: {lengths}); every "
                "rank needs data in a distributed fit."
            )
        self.n_total = sum(lengths)

    def batches(self) -> Any:
        """This rank's batches, without the sampler's padded duplicates (an iterable; counted
        in ``n_seen``). Not distributed: the loader itself."""
        return self._trimmed() if self.active else self.loader

    def _trimmed(self) -> Iterator[Any]:
        self.n_seen = 0
        for batch in self.loader:
            b = _batch_len(batch, self.dict_key_y)
            if self.n_local is not None and self.n_seen + b > self.n_local:
                keep = self.n_local - self.n_seen
                if keep > 0:
                    self.n_seen += keep
                    yield _take(batch, keep, b, self.dict_key_y)
                break
            self.n_seen += b
            yield batch

    def combine(self, H: Any, loss: Tensor | float) -> tuple[Any, Tensor | float]:
        """Sum this rank's curvature and loss with the other ranks' (see
        :func:`all_reduce_curvature`) and check that every example was counted once."""
        if not self.active:
            return H, loss
        H, loss, n = all_reduce_curvature(H, loss, self.n_seen, self.group)
        if n != self.n_total:
            raise RuntimeError(
                f"The ranks fitted {n} examples in total but N = {self.n_total} (the loaders "
                "yielded fewer or more examples than their samplers/datasets announce, e.g. "
                "DataLoader(drop_last=True)); the combined posterior would be inconsistent."
            )
        return H, loss


def data_size(loader: DataLoader, group: Any = None) -> int:
    """N of ``loader`` over all ranks (``len(loader.dataset)`` when not distributed; a
    collective for ``mark_sharded`` loaders)."""
    shard = FitShard(loader, group=group)
    if shard.active and shard.n_total is None:
        dev = _comm_device(torch.device("cpu"), group)
        counts = _all_gather_ints([shard.shard_length or 0], dev, group)
        shard.set_shard_lengths([c[0] for c in counts])
    return shard.n_total


# ---------------------------------------------------------------------- collective failures
class DistributedFitError(RuntimeError):
    """Raised on **every** rank, with the same message, when a distributed fit cannot go on:
    a rank failed (its error is quoted), or the ranks' models, options or weights differ."""


def agree(
    error: BaseException | None, stage: str, payload: Any = None, group: Any = None
) -> list[Any]:
    """Exchange every rank's status (and a picklable ``payload``) in one ``all_gather_object``.

    Args:
        error: this rank's exception in ``stage``, or ``None``.
        stage: what the ranks were doing (for the message).

    Returns:
        The payloads of all ranks, in rank order (when no rank failed).

    Raises:
        DistributedFitError: on every rank if any rank failed; chained to the local error.
            When every rank failed with the same error, that error itself is raised.
    """
    status = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * world_size(group)
    _dist().all_gather_object(gathered, (status, payload), group=group)
    failed = [(r, msg) for r, (msg, _) in enumerate(gathered) if msg is not None]
    if error is not None and len(failed) == len(gathered) and len({m for _, m in failed}) == 1:
        raise error  # the same error on every rank (e.g. a plain loader): raise it as it is
    if failed:
        text = "; ".join(f"rank {r} failed with {msg}" for r, msg in failed)
        raise DistributedFitError(
            f"Distributed fit stopped {stage} on all {len(gathered)} ranks: {text}"
        ) from error
    return [p for _, p in gathered]


def _weights_digest(params: list[Tensor]) -> str:
    """SHA-256 of the parameters' bytes (detects different weights with equal shapes)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(la: Any, override: bool) -> dict[str, Any]:
    """What must agree across ranks before the data collectives: the posterior's class and
    options, the parameter names, shapes and dtypes, a digest of the weights and, for
    ``override=False``, the previous fit's data count."""
    backend = getattr(la, "backend", None)
    return {
        "class": type(la).__name__,
        "options": {
            k: str(getattr(backend, k, getattr(la, k, None)))
            for k in ("kfac_approx", "fisher_type", "mc_samples", "factor_rank", "rank_threshold")
        },
        "dtype": str(getattr(la, "_dtype", None)),
        "parameters": [
            (n, tuple(p.shape), str(p.dtype))
            for n, p in zip(la.lora_param_names, la.params, strict=True)
        ],
        "weights": _weights_digest(la.params),
        "override": bool(override),
        "previous_n_data": None if override else getattr(la, "n_data", None),
    }


def check_consistent(prints: list[dict[str, Any]]) -> None:
    """Raise the same :class:`DistributedFitError` on every rank when the ranks'
    :func:`fingerprint` differ (all ranks hold the same list, so all raise)."""
    for r, fp in enumerate(prints[1:], start=1):
        diff = [k for k in prints[0] if fp.get(k) != prints[0][k]]
        if not diff:
            continue
        detail = "; ".join(_difference(k, prints[0][k], fp.get(k), r) for k in diff)
        raise DistributedFitError(
            f"The ranks of the distributed fit differ in {diff} ({detail}). Every rank must fit "
            "the same model (same LoRA layers and weights, e.g. after DDP training or "
            "broadcasting the state dict) with the same Laplace options."
        )


def _difference(key: str, a: Any, b: Any, r: int) -> str:
    """One line on how fingerprint entry ``key`` of rank 0 (``a``) and rank ``r`` differ."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{key}: {len(a)} tensors on rank 0 vs {len(b)} on rank {r}"
        i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        return f"{key}: entry {i} is {a[i]} on rank 0 vs {b[i]} on rank {r}"
    return f"{key}: {a!r:.120} on rank 0 vs {b!r:.120} on rank {r}"


def _real_count(N: int, W: int, r: int) -> int:
    """Number of positions ``r, r + W, r + 2W, ...`` below ``N``."""
    return max(0, math.ceil((N - r) / W))


def _labels(batch: Any, dict_key_y: str) -> Any:
    if isinstance(batch, Mapping):
        return batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[1]
    raise TypeError(
        f"Unsupported batch type {type(batch).__name__}: the loader must yield dict batches "
        "(with labels) or (X, y) pairs."
    )


def _batch_len(batch: Any, dict_key_y: str) -> int:
    return len(_labels(batch, dict_key_y))


def _take(batch: Any, k: int, b: int, dict_key_y: str) -> Any:
    """The first ``k`` of ``b`` examples of a dict or ``(X, y)`` batch."""
    if isinstance(batch, Mapping):
        return {key: _take_value(v, k, b) for key, v in batch.items()}
    X, y = batch
    return type(batch)((_take_value(X, k, b), _take_value(y, k, b)))


def _take_value(v: Any, k: int, b: int) -> Any:
    if isinstance(v, Tensor):
        return v[:k] if v.ndim > 0 and v.shape[0] == b else v
    if isinstance(v, Mapping):
        return {key: _take_value(x, k, b) for key, x in v.items()}
    if isinstance(v, (list, tuple)) and len(v) == b:
        return v[:k]
    return v


# ---------------------------------------------------------------------- collectives
def _all_gather_ints(values: list[int], device: torch.device, group: Any) -> list[list[int]]:
    """Every rank's ``values`` (same length on every rank)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(world_size(group))]
    _dist().all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def _buckets(sizes: list[int], itemsize: int) -> list[list[int]]:
    """Consecutive index groups of total size about ``_BUCKET_BYTES`` (deterministic)."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i, n in enumerate(sizes):
        if cur and (total + n) * itemsize > _BUCKET_BYTES:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        out.append(cur)
    return out


def all_reduce_dense(tensors: list[Tensor], group: Any = None) -> list[Tensor]:
    """``all_reduce(SUM)`` of dense tensors, coalesced per dtype into flat buffers.

    Returns new tensors with the inputs' shapes, dtypes and devices (inputs are untouched).
    """
    if not is_distributed(group) or not tensors:
        return list(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    # iterate dtypes in a rank-independent order
    for dtype in sorted(by_dtype, key=str):
        idx = by_dtype[dtype]
        dev = _comm_device(tensors[idx[0]].device, group)
        sizes = [tensors[i].numel() for i in idx]
        for bucket in _buckets(sizes, torch.empty((), dtype=dtype).element_size()):
            members = [idx[j] for j in bucket]
            flat = torch.cat([tensors[i].detach().reshape(-1).to(dev) for i in members])
            _dist().all_reduce(flat, op=_dist().ReduceOp.SUM, group=group)
            offset = 0
            for i in members:
                t = tensors[i]
                n = t.numel()
                out[i] = flat[offset : offset + n].view(t.shape).to(t.device)
                offset += n
    return out  # type: ignore[return-value]


def all_gather_lowrank(
    factors: list[LowRankFactor], group: Any = None, counts: list[list[int]] | None = None
) -> list[LowRankFactor]:
    """Sum low-rank factors across ranks without forming ``d x d``.

    Each rank's roots ``U diag(√s)`` (``d x k_r``) are zero-padded to the largest ``k``,
    gathered (coalesced per dtype), the padding is dropped and the ``(d, Σ_r k_r)`` root is
    re-truncated to ``max_rank`` (:meth:`LowRankFactor.from_root`).

    Args:
        factors: this rank's factors (same sides, dtypes and order on every rank).
        counts: optional per-rank ranks ``[[k_1, ...], ...]`` already gathered.
    """
    if not is_distributed(group) or not factors:
        return list(factors)
    if counts is None:
        dev = _comm_device(factors[0].device, group)
        counts = _all_gather_ints([f.rank for f in factors], dev, group)
    k_max = [max(c[i] for c in counts) for i in range(len(factors))]
    out: list[LowRankFactor | None] = [None] * len(factors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, f in enumerate(factors):
        by_dtype.setdefault(f.dtype, []).append(i)
    for dtype in sorted(by_dtype, key=str):
        idx = [i for i in by_dtype[dtype] if k_max[i] > 0]
        for i in by_dtype[dtype]:
            if k_max[i] == 0:  # zero on every rank
                out[i] = factors[i].clone()
        if not idx:
            continue
        dev = _comm_device(factors[idx[0]].device, group)
        sizes = [factors[i].dim * k_max[i] for i in idx]
        for bucket in _buckets(sizes, torch.empty((), dtype=dtype).element_size()):
            members = [idx[j] for j in bucket]
            parts = []
            for i in members:
                f = factors[i]
                R = torch.zeros(f.dim, k_max[i], dtype=dtype, device=dev)
                R[:, : f.rank] = f.root().detach().to(dev)
                parts.append(R.reshape(-1))
            flat = torch.cat(parts)
            gathered = [torch.empty_like(flat) for _ in range(len(counts))]
            _dist().all_gather(gathered, flat, group=group)
            offset = 0
            for i in members:
                f = factors[i]
                n = f.dim * k_max[i]
                roots = [
                    g[offset : offset + n].view(f.dim, k_max[i])[:, : c[i]]
                    for g, c in zip(gathered, counts, strict=True)
                ]
                R = torch.cat(roots, dim=1).to(f.device)
                out[i] = LowRankFactor.from_root(R, f.max_rank, dtype=f.dtype)
                offset += n
    return out  # type: ignore[return-value]


def all_reduce_curvature(
    H: Any, loss: Tensor | float, n: int, group: Any = None
) -> tuple[Any, Tensor | float, int]:
    """Sum a rank-local fit over all ranks: ``(H, loss, n) -> (H_all, loss_all, n_all)``.

    Args:
        H: a dense tensor (diag / full), a laplace ``Kron`` or a ``LowRankKron`` (whose
            factors may be :class:`LowRankFactor`).
        loss: this rank's summed loss (tensor or float).
        n: this rank's number of examples.

    Returns the same types, identical on every rank. Outside a multi-rank group the inputs
    are returned unchanged.
    """
    if not is_distributed(group):
        return H, loss, n
    dense: list[Tensor] = []
    lowrank: list[LowRankFactor] = []
    if isinstance(H, Tensor):
        dense.append(H)
    elif isinstance(H, Kron):
        for F in H.kfacs:
            for M in F:
                if isinstance(M, LowRankFactor):
                    lowrank.append(M)
                elif isinstance(M, Tensor):
                    dense.append(M)
                else:
                    raise TypeError(f"Unsupported Kronecker factor type {type(M).__name__}.")
    else:
        raise TypeError(
            f"Cannot combine curvature of type {type(H).__name__} across ranks (expected a "
            "tensor or an undecomposed Kron)."
        )
    ref = dense[0] if dense else lowrank[0].U
    loss_is_tensor = isinstance(loss, Tensor)
    loss_t = (
        loss.detach().reshape(())
        if loss_is_tensor
        else torch.tensor(float(loss), dtype=torch.float64, device=ref.device)
    )
    # one small int gather: data counts and the ranks of the low-rank factors
    counts = _all_gather_ints(
        [int(n)] + [f.rank for f in lowrank], _comm_device(ref.device, group), group
    )
    n_all = sum(c[0] for c in counts)
    reduced = all_reduce_dense([*dense, loss_t], group)
    dense_all, loss_all = reduced[:-1], reduced[-1]
    lowrank_all = all_gather_lowrank(lowrank, group, counts=[c[1:] for c in counts])
    if isinstance(H, Tensor):
        H_all: Any = dense_all[0]
    else:
        it_dense, it_low = iter(dense_all), iter(lowrank_all)
        kfacs = [
            [next(it_low) if isinstance(M, LowRankFactor) else next(it_dense) for M in F]
            for F in H.kfacs
        ]
        H_all = type(H)(kfacs)
    return H_all, (loss_all if loss_is_tensor else float(loss_all)), n_all
