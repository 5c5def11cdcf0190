"""Load times and LoRA training-step times of the offline benchmark models.

    python -m benchmarks.timing [--threads 1] [--steps 6] [--batch-size 8]

For each (model, task) pair: load time of the base model, then ``--steps`` full training
steps (forward, backward, AdamW) on real batches of the task at ``--batch-size``; the
first step is a warm-up and not counted. Prints median and min seconds per step and the
batch's sequence length. On a shared 2-core machine use ``--threads 1``: two OpenMP
threads competing with other processes can be 10x slower.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks import offline
from benchmarks.finetune import FinetuneConfig, build_model
from benchmarks.tasks import load_task, make_collate

PAIRS = (
    ("smollm2", "strategyqa"),
    ("smollm2", "social_iqa"),
    ("smollm2", "fine_foods_mc"),
    ("minilm", "fine_foods"),
)


def time_pair(model: str, task: str, steps: int, batch_size: int) -> dict:
    cfg = FinetuneConfig(model=model, task=task, batch_size=batch_size)
    data = load_task(task)
    t0 = time.perf_counter()
    peft_model, tokenizer, wrapper = build_model(cfg, data)
    load_s = time.perf_counter() - t0
    collate = make_collate(tokenizer, data.kind, cfg.seq_len)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    wrapper.train()
    times, seq = [], []
    for s in range(steps + 1):
        batch = collate(data.train[s * batch_size : (s + 1) * batch_size])
        t = time.perf_counter()
        loss = F.cross_entropy(wrapper(batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s:
            times.append(time.perf_counter() - t)
            seq.append(batch["input_ids"].shape[1])
    wrapper.eval()
    with torch.no_grad():
        batch = collate(data.test[:16])
        t = time.perf_counter()
        wrapper(batch)
        eval_s = time.perf_counter() - t
    times.sort()
    return {
        "model": model,
        "task": task,
        "load_s": load_s,
        "step_s_median": times[len(times) // 2],
        "step_s_min": times[0],
        "seq_len_mean": sum(seq) / len(seq),
        "eval16_s": eval_s,
        "trainable": sum(p.numel() for p in params),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="Benchmark model load / step times.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", nargs="*", default=None, help="model:task, e.g. minilm:fine_foods")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [tuple(x.split(":")) for x in args.pairs] if args.pairs else PAIRS
    rows = []
    for model, task in pairs:
        row = time_pair(model, task, args.steps, args.batch_size)
        row["threads"] = torch.get_num_threads()
        rows.append(row)
        print(
            f"{model:8s} {task:14s} load {row['load_s']:5.1f} s | step (bs {args.batch_size}, "
            f"T~{row['seq_len_mean']:.0f}) median {row['step_s_median']:.2f} s, "
            f"min {row['step_s_min']:.2f} s | eval 16 ex {row['eval16_s']:.2f} s",
            flush=True,
        )
    print(json.dumps({"load_seconds": offline.LOAD_SECONDS}))
    return rows


if __name__ == "__main__":
    main()
