"""Collective failures of the data-parallel fit (issue 14, section 2): 2 gloo ranks on CPU.

Different models, equal shapes with different weights, an empty shard, an error or NaN on
one rank, a validation loader that fails on one rank in the grid search: every rank must
raise the same clear ``DistributedFitError`` promptly (not abort
in gloo, not wait for the process-group timeout), and the group must stay usable.
"""

from __future__ import annotations

import re
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from laplace_lora_ext import distributed
from tests.models import DictDataset, lora_laplace, perturb_lora_B, random_batch, tiny_llama
from tests.test_distributed import _free_port

WORLD = 2
PROMPT_S = 30.0  # well below the group timeout (300 s here, 30 min by default)


def _dataset(n: int = 6) -> DictDataset:
    b = random_batch(n=n, T=5, seed=1)
    return DictDataset(b["input_ids"], b["attention_mask"], b["labels"])


def _sampled(rank: int) -> DataLoader:
    ds = _dataset()
    return DataLoader(ds, batch_size=1, sampler=DistributedSampler(ds, WORLD, rank, shuffle=False))


class _Broken:
    """A loader that raises at its second batch."""

    def __init__(self, inner: DataLoader) -> None:
        self.inner, self.dataset, self.sampler = inner, inner.dataset, inner.sampler

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == 1:
                raise RuntimeError("loader broke")
            yield batch


def _case(name: str, rank: int):
    """(model, loader) of ``rank`` for fault ``name``."""
    model = tiny_llama(seed=0)
    loader = _sampled(rank)
    if name == "other_model" and rank == 1:
        model = tiny_llama(lm_head=True, seed=0)
    elif name == "other_weights" and rank == 1:
        perturb_lora_B(model.model, seed=7)
    elif name == "empty_shard":
        shard = Subset(_dataset(), range(6) if rank == 0 else [])
        loader = distributed.mark_sharded(DataLoader(shard, batch_size=2))
    elif name == "error_on_one_rank" and rank == 1:
        loader = _Broken(loader)
    elif name == "grid_loader_error_on_one_rank" and rank == 1:  # the validation loader
        loader = _Broken(loader)
    elif name == "nan_on_one_rank" and rank == 1:
        with torch.no_grad():
            model.model.get_input_embeddings().weight.fill_(float("nan"))
    return model, loader


FAULTS = {
    "other_model": "differ in .*parameters",
    "other_weights": "differ in \\['weights'\\]",
    "empty_shard": "rank 1 failed with ValueError: train_loader's dataset is empty",
    "error_on_one_rank": "rank 1 failed with RuntimeError: loader broke",
    "nan_on_one_rank": "rank 1 failed with NonFiniteError: Batch 0",
    "grid_loader_error_on_one_rank": "reading the validation data .* rank 1 failed with "
    "RuntimeError: loader broke",
}


def _attempt(name: str, model: torch.nn.Module, loader, rank: int) -> None:
    """The fit, or for ``grid_*`` faults a healthy fit and then the validation grid."""
    if not name.startswith("grid_"):
        lora_laplace(model, "kron").fit(loader)
        return
    la = lora_laplace(model, "kron")
    la.fit(_sampled(rank))
    la.optimize_prior_precision(method="gridsearch", val_loader=loader, link_approx="probit")


def _run_rank(rank: int, port: int) -> dict[str, tuple[str, float]]:
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=300),  # generous for a loaded CI runner: start-up only
    )
    out: dict[str, tuple[str, float]] = {}
    try:
        for name in FAULTS:
            model, loader = _case(name, rank)
            start = time.monotonic()
            try:
                _attempt(name, model, loader, rank)
                out[name] = ("no error", 0.0)
            except distributed.DistributedFitError as e:
                out[name] = (str(e), time.monotonic() - start)
        # the group is still usable: a healthy fit afterwards works on both ranks
        la = lora_laplace(tiny_llama(seed=0), "diag")
        la.fit(_sampled(rank))
        out["healthy"] = (f"n_data={la.n_data}", 0.0)
        return out
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


def test_faults_raise_the_same_error_on_every_rank_promptly(tmp_path):
    port = _free_port()
    child = mp.get_context("spawn").Process(
        target=_child_main, args=(1, port, str(tmp_path)), daemon=True
    )
    child.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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
    errors = [f.read_text() for f in sorted(tmp_path.glob("rank*.err"))]
    assert failure is None and not errors, "\n".join([failure or "", *errors])
    assert child.exitcode == 0, child.exitcode
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for name, pattern in FAULTS.items():
        (msg0, t0), (msg1, t1) = rank0[name], rank1[name]
        assert msg0 == msg1, (name, msg0, msg1)  # the same error on every rank
        assert re.search(pattern, msg0), (name, msg0)
        assert max(t0, t1) < PROMPT_S, (name, t0, t1)
    assert rank0["healthy"] == rank1["healthy"] == ("n_data=6", 0.0)
