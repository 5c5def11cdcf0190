"""Re-score one ``llm_calibration`` result file after the default prior changed, without
re-running its other methods (MAP, temperature, marglik and the validation grid do not
depend on the default; the fine-tuning is cached).

For each run and checkpoint in the file: rebuild the fine-tuned model, fit the same KFAC
posterior, call ``optimize_prior_precision()`` (the current default) and score it with the
same joint MC predictive (``--n-samples`` of the file, generator seeded with the run's seed)
on the test split and, if the file has one, the shifted split (metrics and the entropy
AUROC), and so are ``la_probit`` and ``la_last``, which use the default's prior too.
The previous default's rows move to ``la_previous`` (and its prior to
``_prior["la_previous"]``); ``la`` becomes the current default. The markdown table and the
reliability plot are redrawn. Used for the memorised benchmark (:mod:`benchmarks.llm_memorised`)
when its default moved from the function-space rule to the leave-one-out rule::

    python -m benchmarks.llm_rescore_default benchmarks/results/llm_memorised_T_seedS.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from laplace import Laplace

import laplace_lora_ext  # noqa: F401
from benchmarks import llm_calibration as calib
from benchmarks.finetune import load_trainable_state_dict, train
from benchmarks.tasks import make_collate, make_loader
from laplace_lora_ext.evaluation import classification_metrics
from laplace_lora_ext.jacobian_cache import LogitJacobianCache


def rescore_checkpoint(wrapper, data, shifted, collate, args, seed: int, ckpt: dict) -> None:
    """Replace ``ckpt``'s ``la`` rows (test, shift, AUROC, prior) by the current default."""
    train_loader = make_loader(data.train, collate, args.la_batch_size)
    la = Laplace(wrapper, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    t0 = time.perf_counter()
    la.optimize_prior_precision()
    ckpt["_default_s"] = time.perf_counter() - t0
    splits = {"test": data.test} | ({"shift": shifted.test} if "shift" in ckpt else {})
    regex = calib.last_block_regex(wrapper)
    last = {i for i, n in enumerate(la.lora_param_names) if re.search(regex, n)}
    probs = {}
    for split, examples in splits.items():
        cache = LogitJacobianCache(la, make_loader(examples, collate, args.la_batch_size))
        rows = ckpt[split]
        if "la_previous" not in rows:
            rows["la_previous"] = rows["la"]
            rows["_entropy"]["la_previous"] = rows["_entropy"]["la"]
        probs[split] = calib.mc_probs(cache, la, args, seed)
        new = {
            "la": probs[split],
            "la_probit": cache.probs(la, "probit").float(),
            "la_last": calib.mc_probs(cache, la, args, seed, last),
        }
        for method, p in new.items():  # the rows that use the default prior
            if method in rows:
                rows[method] = classification_metrics(p, cache.labels)
                rows["_entropy"][method] = calib.entropy(p).tolist()
    ckpt["test"]["_probs"]["la"] = probs["test"].tolist()
    ckpt["_prior"].setdefault("la_previous", ckpt["_prior"]["la"])
    ckpt["_prior"]["la"] = la.prior_precision.tolist()
    if "shift_auroc" in ckpt:
        ent_in, ent_out = ckpt["test"]["_entropy"], ckpt["shift"]["_entropy"]
        ckpt["shift_auroc"] = {
            m: calib.auroc(torch.tensor(ent_in[m]), torch.tensor(ent_out[m])) for m in ent_in
        }


def main(path: str) -> None:
    out = Path(path).with_suffix("")
    payload = json.loads(out.with_suffix(".json").read_text())
    args = argparse.Namespace(**payload["args"])
    torch.set_num_threads(args.threads or 1)
    for task, per_seed in payload["runs"].items():
        for seed, run in per_seed.items():
            seed = int(seed)
            cfg = calib.finetune_config(task, seed, args)
            data, shifted = calib.load_splits(task, seed, args)
            _, (peft_model, tokenizer, wrapper) = train(cfg, data, progress=False)
            collate = make_collate(tokenizer, data.kind, cfg.seq_len)
            for step, ckpt in run["checkpoints"].items():
                state = torch.load(
                    cfg.run_dir / f"step{step}.pt", map_location="cpu", weights_only=False
                )
                load_trainable_state_dict(peft_model, state["trainable"])
                wrapper.eval()
                rescore_checkpoint(wrapper, data, shifted, collate, args, seed, ckpt)
                print(
                    f"{task} seed {seed} step {step}: " + calib.summary_line(ckpt["test"]),
                    flush=True,
                )
    payload["summary"] = calib.summarize(payload["runs"])
    payload["rescored"] = (
        "la, la_probit, la_last: the current default (optimize_prior_precision()); "
        "la_previous: the default this file was run with"
    )
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    out.with_suffix(".md").write_text(calib.render(payload["summary"], payload["args"]))
    calib.reliability_plot(payload["runs"], out.with_name(out.name + "_reliability.png"))
    print(f"rewrote {out}.json, {out}.md")


if __name__ == "__main__":
    main(sys.argv[1])
