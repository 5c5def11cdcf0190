"""Data-parallel fit (issue 8): 2 gloo ranks on CPU must reproduce the single-process fit.

One spawn of two ranks runs every scenario; each rank saves its results and the parent
(a plain, non-distributed process) compares them with single-process fits on the full data.
"""

from __future__ import annotations

import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from laplace import Laplace
from torch.utils.data import BatchSampler, DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from laplace_lora_ext import distributed, loo_prior
from laplace_lora_ext.lowrank import LowRankFactor
from laplace_lora_ext.testing import rel
from tests.models import DictDataset, random_batch, tiny_llama

WORLD = 2
N = 7  # odd: the DistributedSampler pads rank 1's shard with a repeated example
N_SECOND = 5
SHARDS = (range(0, 4), range(4, N))  # the "sharded" scenario's examples per rank
LONE = (range(0, N - 1), range(N - 1, N))  # "lone": rank 1 holds one example
N_VAL = 5
TOL = 1e-10
PRIOR = 0.5

CONFIGS = {
    "kron": dict(hessian_structure="kron"),
    # sides 8 > rank_threshold are LowRankFactors, kept at full rank (factor_rank = 8)
    "kron_lowrank": dict(hessian_structure="kron", factor_rank=8, rank_threshold=4),
    "diag": dict(hessian_structure="diag"),
    "full": dict(hessian_structure="full"),
}


# ---------------------------------------------------------------------- shared by both sides
def _dataset(n: int, seed: int) -> DictDataset:
    b = random_batch(n=n, T=6, seed=seed)
    return DictDataset(b["input_ids"], b["attention_mask"], b["labels"])


def _laplace(model: torch.nn.Module, config: str):
    return Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        prior_precision=PRIOR,
        **CONFIGS[config],
    )


def _summary(la) -> dict[str, torch.Tensor]:
    H = la.H_facs.to_matrix() if la._structure == "kron" else la.H
    probe = random_batch(n=4, T=6, seed=11)
    return {
        "H": H.detach().clone(),
        "loss": torch.as_tensor(la.loss).detach().clone(),
        "n_data": torch.tensor(float(la.n_data)),
        "lml": la.log_marginal_likelihood().detach().clone(),
        "probs": la(probe, link_approx="probit").detach().clone(),
    }


def _scenarios(model: torch.nn.Module, make_loader) -> dict[str, dict[str, torch.Tensor]]:
    """Fits on loaders from ``make_loader(kind)``; the parent passes single-process loaders
    with the same data, the ranks distributed ones."""
    out = {}
    for config in CONFIGS:
        la = _laplace(model, config)
        la.fit(make_loader("padded"))
        out[f"padded/{config}"] = _summary(la)
        if config == "kron_lowrank":
            assert any(isinstance(F, LowRankFactor) for Fs in la.H_facs.kfacs for F in Fs)
    for kind in ("drop_last", "sharded"):
        la = _laplace(model, "kron")
        la.fit(make_loader(kind))
        out[f"{kind}/kron"] = _summary(la)
    out.update(_prior_scenarios(model, make_loader))
    # adding data to a previous fit (override=False) must not re-sum the previous part
    for config in ("kron", "kron_lowrank", "diag"):
        la = _laplace(model, config)
        la.fit(make_loader("padded"))
        la.fit(make_loader("second"), override=False)
        out[f"incremental/{config}"] = _summary(la)
    # ... with a second loader whose N is not len(dataset) (kron rescales by the true N)
    la = _laplace(model, "kron")
    la.fit(make_loader("padded"))
    la.fit(make_loader("drop_last"), override=False)
    out["incremental_drop_last/kron"] = _summary(la)
    return out


def _prior_scenarios(model: torch.nn.Module, make_loader) -> dict[str, dict[str, torch.Tensor]]:
    """The prior searches of :func:`_scenarios`: the training-data rules and the grid."""
    out = {}
    # the function-space prior sums over the examples the fit counted (padding skipped)
    for kind in ("padded", "sharded"):
        la = _laplace(model, "kron")
        la.fit(make_loader(kind))
        la.optimize_prior_precision(method="function_space")
        prior = {"prior": la.prior_precision.detach().clone()}
        out[f"{kind}/function_space"] = {**_summary(la), **prior}
    # the leave-one-out prior: each rank leaves one out within its shard, NLLs all-reduced
    la = _laplace(model, "kron")
    la.fit(make_loader("sharded"))
    if distributed.is_distributed():
        la.optimize_prior_precision(method="leave_one_out")
    else:  # the reference: the same search over both shards' caches in one process
        shards = [DataLoader(Subset(_dataset(N, seed=1), r), batch_size=3) for r in SHARDS]
        loo_prior.best_loo_precision(la, [loo_prior.loo_cache(la, s) for s in shards])
    out["sharded/leave_one_out"] = {**_summary(la), "prior": la.prior_precision.clone()}
    # the default on memorised data where one rank holds a single example: leave-one-out
    # does not apply there, so every rank falls back to the evidence (it hung in the grid)
    la = _laplace(model, "kron")
    la.fit(make_loader("lone"))
    la.loss = 1e-3 * la.n_data  # memorised: the default would use leave-one-out
    if distributed.is_distributed():
        with pytest.warns(RuntimeWarning, match="On 1 of 2 ranks the rule does not apply"):
            la.optimize_prior_precision()
    else:
        la.optimize_prior_precision(method="lora_marglik")
    out["lone/default"] = {**_summary(la), "prior": la.prior_precision.clone()}
    # the validation grid sums its NLL over every rank's validation shard (each rank chose
    # from its own shard); probit, so that the draws do not depend on the sharding
    la = _laplace(model, "kron")
    la.fit(make_loader("padded"))
    la.optimize_prior_precision(
        method="gridsearch", val_loader=make_loader("val"), link_approx="probit"
    )
    out["padded/gridsearch"] = {**_summary(la), "prior": la.prior_precision.clone()}
    # ... also where one rank's validation shard is only the sampler's padding
    la.optimize_prior_precision(
        method="gridsearch", val_loader=make_loader("val1"), link_approx="probit"
    )
    out["padded/gridsearch_one_val"] = {**_summary(la), "prior": la.prior_precision.clone()}
    # the same error on every rank is raised as it is (not wrapped), as in one process
    try:
        loo_prior.loo_precision(la, make_loader("padded"), kernel_draws=0)
    except ValueError as e:
        assert "kernel_draws must be a positive integer" in str(e), e
    else:
        raise AssertionError("kernel_draws=0 was accepted")
    return out


# ---------------------------------------------------------------------- ranks
def _distributed_loader(kind: str, rank: int) -> DataLoader:
    ds = _dataset(N, seed=1)
    if kind == "padded":
        sampler = DistributedSampler(ds, WORLD, rank, shuffle=True, seed=3)
        return DataLoader(ds, batch_size=2, sampler=sampler)
    if kind == "drop_last":
        sampler = DistributedSampler(ds, WORLD, rank, shuffle=False, drop_last=True)
        return DataLoader(ds, batch_size=2, sampler=sampler)
    if kind in ("sharded", "lone"):
        shard = Subset(ds, (SHARDS if kind == "sharded" else LONE)[rank])
        return distributed.mark_sharded(DataLoader(shard, batch_size=3))
    if kind in ("val", "val1"):  # validation data sharded as training data is, rank 1 padded
        val = _dataset(N_VAL if kind == "val" else 1, seed=4)
        return DataLoader(val, batch_size=2, sampler=DistributedSampler(val, WORLD, rank))
    if kind == "second":  # DistributedSampler inside a batch_sampler, uneven again
        ds2 = _dataset(N_SECOND, seed=2)
        sampler = DistributedSampler(ds2, WORLD, rank, shuffle=False)
        return DataLoader(ds2, batch_sampler=BatchSampler(sampler, 2, drop_last=False))
    raise ValueError(kind)


def _run_rank(rank: int, port: int) -> dict[str, dict[str, torch.Tensor]]:
    """Join the 2-rank gloo group, run every scenario, leave the group (always)."""
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        assert distributed.is_distributed() and distributed.world_size() == WORLD
        model = tiny_llama(seed=0)
        results = _scenarios(model, lambda kind: _distributed_loader(kind, rank))
        # a plain loader over the full data on every rank is refused (it would count W times)
        full = DataLoader(_dataset(N, seed=1), batch_size=3)
        try:
            _laplace(model, "kron").fit(full)
            raise AssertionError("a plain loader was accepted in a distributed fit")
        except ValueError as e:
            assert "DistributedSampler" in str(e)
        # ... unless the fit is explicitly rank-local
        with distributed.disabled():
            assert not distributed.is_distributed()
            la = _laplace(model, "kron")
            la.fit(full)
            results["disabled/kron"] = _summary(la)
        return results
    finally:
        torch.distributed.destroy_process_group()


def _child_main(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    out = Path(outdir)
    try:
        torch.save(_run_rank(rank, port), out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- test
def _reference_loader(kind: str) -> DataLoader:
    ds = _dataset(N, seed=1)
    if kind in ("padded", "sharded", "plain", "lone"):
        return DataLoader(ds, batch_size=3)
    if kind in ("val", "val1"):
        return DataLoader(_dataset(N_VAL if kind == "val" else 1, seed=4), batch_size=2)
    if kind == "drop_last":  # shuffle=False, drop_last=True keeps the first 6 examples
        return DataLoader(Subset(ds, range(N - N % WORLD)), batch_size=3)
    if kind == "second":
        return DataLoader(_dataset(N_SECOND, seed=2), batch_size=2)
    raise ValueError(kind)


def test_two_rank_gloo_fit_equals_single_process(tmp_path):
    """Rank 0 is this (pytest) process, rank 1 a spawned one: one import of torch and
    transformers less than two spawned ranks."""
    port = _free_port()
    child = mp.get_context("spawn").Process(
        target=_child_main, args=(1, port, str(tmp_path)), daemon=True
    )
    child.start()
    # the single-process reference, computed (not distributed) while rank 1 starts up
    model = tiny_llama(seed=0)
    reference = _scenarios(model, _reference_loader)
    la = _laplace(model, "kron")
    la.fit(_reference_loader("plain"))
    reference["disabled/kron"] = _summary(la)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    rank0, failure = None, None
    try:
        rank0 = _run_rank(0, port)
    except Exception:
        failure = traceback.format_exc()
    finally:
        torch.set_num_threads(threads)
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
            child.join()
    assert not torch.distributed.is_initialized()
    errors = [f.read_text() for f in sorted(tmp_path.glob("rank*.err"))]
    assert failure is None and not errors, "\n".join([failure or "", *errors])
    assert child.exitcode == 0, child.exitcode

    ranks = [rank0, torch.load(tmp_path / "rank1.pt", weights_only=True)]
    assert set(ranks[0]) == set(ranks[1]) == set(reference)
    for key, ref in reference.items():
        expected_n = {
            "drop_last": N - 1,
            "incremental": N + N_SECOND,
            "incremental_drop_last": N + N - 1,
        }.get(key.split("/")[0], N)
        assert float(ref["n_data"]) == expected_n, key
        for field, value in ref.items():
            for r, res in enumerate(ranks):
                err = rel(res[key][field], value)
                assert err < TOL, f"{key} {field} rank {r}: relative error {err:.2e}"
            # every rank holds the same posterior
            assert torch.equal(ranks[0][key][field], ranks[1][key][field]), (key, field)


def test_not_distributed_is_pass_through():
    loader = DataLoader(_dataset(N, seed=1), batch_size=3)
    shard = distributed.FitShard(loader)
    assert not shard.active and shard.n_total == N and shard.batches() is loader
    H, loss = torch.ones(3), torch.tensor(2.0)
    assert shard.combine(H, loss) == (H, loss)
    assert distributed.all_reduce_curvature(H, loss, 4) == (H, loss, 4)
    assert distributed.data_size(loader) == N


@pytest.mark.parametrize("n", [3, 4, 5, 7])
@pytest.mark.parametrize("world", [2, 3])
def test_padding_positions_are_each_ranks_tail(n, world):
    """The examples each rank skips are exactly the sampler's padded duplicates."""
    ds = _dataset(n, seed=1)
    seen = []
    for r in range(world):
        sampler = DistributedSampler(ds, world, r, shuffle=True, seed=5)
        idx = list(sampler)
        k = distributed._real_count(n, world, r)
        assert len(idx) - k in (0, 1)
        seen += idx[:k]
    assert sorted(seen) == list(range(n))


def test_take_slices_dict_and_tuple_batches():
    b = random_batch(n=3, T=4, seed=0)
    cut = distributed._take(b, 2, 3, "labels")
    assert all(len(v) == 2 for v in cut.values())
    X, y = distributed._take((b["input_ids"], b["labels"]), 1, 3, "labels")
    assert X.shape == (1, 4) and y.shape == (1,)


def _fake_group(monkeypatch, world: int, r: int) -> None:
    monkeypatch.setattr(distributed, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(distributed, "world_size", lambda group=None: world)
    monkeypatch.setattr(distributed, "rank", lambda group=None: r)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_shards_cover_each_example_once(monkeypatch, drop_last, batch_size):
    """Simulated 3-rank shards (no process group): the batches each rank fits cover every
    example exactly once (drop_last=False) or the sampler's kept examples (True)."""
    world, n = 3, 7
    ds = _dataset(n, seed=1)
    ds.labels = torch.arange(n)  # label = example index
    seen, totals = [], set()
    for r in range(world):
        _fake_group(monkeypatch, world, r)
        sampler = DistributedSampler(ds, world, r, shuffle=True, seed=4, drop_last=drop_last)
        shard = distributed.FitShard(DataLoader(ds, batch_size=batch_size, sampler=sampler))
        assert shard.active
        totals.add(shard.n_total)
        for batch in shard.batches():
            assert len(batch["input_ids"]) == len(batch["labels"]) <= batch_size
            seen += batch["labels"].tolist()
        assert shard.n_seen == shard.n_local
    assert totals == {len(seen)}
    if drop_last:
        assert len(seen) == 6 and len(set(seen)) == 6
    else:
        assert sorted(seen) == list(range(n))


def test_shard_errors(monkeypatch):
    _fake_group(monkeypatch, 3, 0)
    ds = _dataset(2, seed=1)
    with pytest.raises(ValueError, match="too few"):
        distributed.FitShard(DataLoader(ds, sampler=DistributedSampler(ds, 3, 0)))
    with pytest.raises(ValueError, match="num_replicas=2"):
        distributed.FitShard(DataLoader(ds, sampler=DistributedSampler(ds, 2, 0)))
    with pytest.raises(ValueError, match="mark_sharded"):
        distributed.FitShard(DataLoader(ds))
