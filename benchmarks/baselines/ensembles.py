"""Deep ensembles and checkpoint ensembles of LoRA adapters, in one PEFT model.

An ensemble member is a *trainable state dict* (LoRA matrices plus, for sequence
classifiers, the trained head), as written by :func:`benchmarks.finetune.train` under
``"trainable"`` in every checkpoint. :func:`predict_probs` loads each member into the same
model in turn and averages the softmax probabilities, so the base model is held once.

* **Deep ensemble** (Lakshminarayanan et al. 2017; the Laplace-LoRA paper uses M = 3):
  ``M`` runs that differ only in their seed (LoRA init, dropout masks, batch order) on the
  same data split; :func:`deep_ensemble_configs` derives their fine-tuning configs.
* **Checkpoint ensemble** (as in the Laplace-LoRA paper): the last ``k`` checkpoints of one
  run; :func:`checkpoint_states` reads them from a run directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from benchmarks.baselines.common import mc_predict_probs
from benchmarks.finetune import FinetuneConfig, load_trainable_state_dict, trainable_state_dict

__all__ = ["deep_ensemble_configs", "checkpoint_states", "predict_probs"]

State = Mapping[str, torch.Tensor]

#: Seed offset between deep-ensemble members (member i uses ``cfg.seed + i * SEED_STRIDE``).
SEED_STRIDE = 1000


def deep_ensemble_configs(cfg: FinetuneConfig, m: int = 3) -> list[FinetuneConfig]:
    """Fine-tuning configs of ``m`` deep-ensemble members derived from ``cfg``.

    Member 0 is ``cfg`` itself (so the MAP run is reused); member ``i`` changes only
    ``seed`` to ``cfg.seed + i * SEED_STRIDE`` and its cache directory; ``data_seed`` (the
    split) and all hyper-parameters stay. Train each with :func:`benchmarks.finetune.train`
    on a freshly loaded base model.
    """
    if m < 1:
        raise ValueError(f"an ensemble needs m >= 1 members, got {m}")
    base_name = cfg.run_dir.name
    return [cfg] + [
        dataclasses.replace(cfg, seed=cfg.seed + i * SEED_STRIDE, run_name=f"{base_name}-ens{i}")
        for i in range(1, m)
    ]


def checkpoint_states(
    run_dir: str | Path, steps: Sequence[int] | None = None, last: int = 3
) -> list[dict[str, torch.Tensor]]:
    """Trainable state dicts of checkpoints ``step<k>.pt`` in ``run_dir``.

    ``steps`` picks checkpoints explicitly; otherwise the ``last`` highest steps are used.

    Raises:
        FileNotFoundError: if a requested checkpoint (or any, with ``steps=None``) is missing.
    """
    run_dir = Path(run_dir)
    if steps is None:
        cached = sorted(int(p.stem[4:]) for p in run_dir.glob("step*.pt") if p.stem[4:].isdigit())
        if not cached:
            raise FileNotFoundError(f"no step<k>.pt checkpoint in {run_dir}; train the run first")
        steps = cached[-last:]
    states = []
    for step in steps:
        path = run_dir / f"step{step}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not cached; train the run first")
        states.append(torch.load(path, map_location="cpu", weights_only=False)["trainable"])
    return states


@torch.no_grad()
def predict_probs(
    model: nn.Module, loader: Iterable, states: Sequence[State], owner: nn.Module | None = None
) -> torch.Tensor:
    """Ensemble predictive ``(N, C)``: the mean of each member's softmax probabilities.

    Each state is loaded with :func:`benchmarks.finetune.load_trainable_state_dict` into
    ``owner`` (default ``model``: the module whose ``trainable_state_dict`` the states are,
    e.g. the PEFT model inside a ``ChoiceHead`` wrapper) and ``model`` predicts (eval
    mode); the owner's own trainable weights are restored afterwards.

    Raises:
        ValueError: if ``states`` is empty.
        KeyError: if a state's names do not match the model's trainable parameters.
    """
    if not states:
        raise ValueError("an ensemble needs at least one state dict")
    owner = model if owner is None else owner
    saved = trainable_state_dict(owner)
    was_training = model.training
    model.eval()
    try:
        total = None
        for state in states:
            load_trainable_state_dict(owner, state)
            p = mc_predict_probs(model, loader, n_samples=1).double()
            total = p if total is None else total + p
    finally:
        load_trainable_state_dict(owner, saved)
        model.train(was_training)
    return (total / len(states)).float()
