"""Bayesian-LoRA baselines for the calibration benchmark, one module per method.

* :mod:`benchmarks.baselines.blob` — BLoB (variational ``lora_A``, Flipout, closed-form KL);
* :mod:`benchmarks.baselines.mc_dropout` — LoRA dropout on at test time;
* :mod:`benchmarks.baselines.ensembles` — deep ensembles and checkpoint ensembles.

Each module has ``predict_probs(model, loader, ...) -> (N, C)`` class probabilities
(softmax averaged over samples / members), with ``model`` taking dict batches as
laplace-torch does.
"""

from benchmarks.baselines import blob, ensembles, mc_dropout

__all__ = ["blob", "ensembles", "mc_dropout"]
