"""LoRA fine-tuning (plain PyTorch) with a resumable checkpoint cache, and MAP evaluation.

* SmolLM2-135M-Instruct (``LlamaForCausalLM``) on ``strategyqa`` / ``social_iqa``: LoRA on
  ``q_proj, v_proj``; the class logits are the next-token logits of the choice tokens
  (" A", " B", ...) at the last prompt position (:class:`ChoiceHead`).
* all-MiniLM-L6-v2 on ``fine_foods``: LoRA on ``query, value``, ``task_type="SEQ_CLS"`` so
  the classifier head is trained in full via peft's ``modules_to_save``.

Cross-entropy on the class index, AdamW, linear schedule with warmup, gradient clipping.
Checkpoints hold only the trainable tensors (LoRA + head) plus optimizer / scheduler / RNG
state for exact resumption; they go to ``benchmarks/cache/runs/<model>-<task>-seed<s>/
step<k>.pt`` every ``save_every`` steps and at the end. Steps already cached are skipped.

CLI::

    python -m benchmarks.finetune --model smollm2 --task strategyqa --steps 200 \\
        --lr 3e-4 --save-every 50 --eval
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks import offline
from benchmarks.tasks import TASKS, TaskData, load_task, make_collate
from laplace_lora_ext.evaluation import classification_metrics  # re-exported for the benchmarks
from laplace_lora_ext.wrappers import LastTokenChoiceLM as ChoiceHead
from laplace_lora_ext.wrappers import SequenceClassifier as EncoderHead

__all__ = [
    "MODELS",
    "FinetuneConfig",
    "RunResult",
    "ChoiceHead",
    "EncoderHead",
    "build_model",
    "trainable_state_dict",
    "load_trainable_state_dict",
    "batch_indices",
    "train",
    "load_run",
    "predict_probs",
    "classification_metrics",
    "evaluate",
]

RUNS_DIR = offline.CACHE_DIR / "runs"

#: model name -> (kind, LoRA target modules, peft task type)
MODELS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "smollm2": ("causal", ("q_proj", "v_proj"), "CAUSAL_LM"),
    "minilm": ("encoder", ("query", "value"), "SEQ_CLS"),
}


# --------------------------------------------------------------------------- config


@dataclass
class FinetuneConfig:
    """Everything that determines a fine-tuning run (``save_every``/``run_name`` aside)."""

    model: str = "smollm2"
    task: str = "strategyqa"
    seed: int = 0  # LoRA / head init, dropout, batch order
    data_seed: int = 0  # train/validation/test split
    n_train: int | None = None  # None: the task's default sizes
    n_val: int | None = None
    n_test: int | None = None
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int | None = None  # None: the task's default
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    save_every: int = 50
    run_name: str | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}")
        if TASKS[self.task].kind != MODELS[self.model][0]:
            raise ValueError(f"task {self.task} ({TASKS[self.task].kind}) needs another model")

    @property
    def identity(self) -> dict:
        """Fields that must match for cached checkpoints to be reused."""
        d = dataclasses.asdict(self)
        d.pop("save_every")
        d.pop("run_name")
        return d

    @property
    def run_dir(self) -> Path:
        return RUNS_DIR / (self.run_name or f"{self.model}-{self.task}-seed{self.seed}")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_ratio * self.steps))

    @property
    def seq_len(self) -> int:
        return self.max_length or TASKS[self.task].max_length


@dataclass
class RunResult:
    config: FinetuneConfig
    checkpoints: dict[int, Path]  # step -> file
    losses: dict[int, float]  # step -> training loss (steps run in this call)
    step_seconds: list[float]  # wall time of each step run in this call


# --------------------------------------------------------------------------- model


def _load_base(model: str, n_classes: int, seed: int):
    if model == "smollm2":
        return offline.load_smollm2()
    return offline.load_minilm_classifier(n_classes, seed=seed)


def build_model(cfg: FinetuneConfig, data: TaskData, base=None):
    """``(peft_model, tokenizer, wrapper)``; ``wrapper(batch) -> (B, C)`` class logits.

    ``base`` may pass an already loaded ``(model, tokenizer)`` (it is wrapped in place).
    LoRA A matrices are initialised under ``torch.manual_seed(cfg.seed)``.
    """
    from peft import LoraConfig, get_peft_model

    kind, targets, task_type = MODELS[cfg.model]
    model, tokenizer = base if base is not None else _load_base(cfg.model, data.n_classes, cfg.seed)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(targets),
        task_type=task_type,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, lora)
    if kind == "causal":
        peft_model.config.use_cache = False  # no KV cache during training / scoring
        wrapper = ChoiceHead(peft_model, data.choice_token_ids(tokenizer))
    else:
        wrapper = EncoderHead(peft_model)
    return peft_model, tokenizer, wrapper


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters that require grad (LoRA + trained head)."""
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise KeyError(f"trainable state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of training step ``step`` (0-based): a pure function of its args.

    Each epoch is a fresh seeded permutation; the last incomplete batch is dropped, so
    every batch is full. This makes resumption from any checkpoint exact.
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"n_train={n} is smaller than batch_size={batch_size}")
    epoch, pos = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos * batch_size : (pos + 1) * batch_size]


def _linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- cache


def _cached_steps(run_dir: Path) -> dict[int, Path]:
    out = {}
    for p in run_dir.glob("step*.pt"):
        try:
            out[int(p.stem[4:])] = p
        except ValueError:
            continue
    return dict(sorted(out.items()))


def _check_run_dir(cfg: FinetuneConfig, overwrite: bool) -> None:
    run_dir = cfg.run_dir
    meta = run_dir / "config.json"
    if meta.is_file() and not overwrite:
        old = json.loads(meta.read_text())
        if old != cfg.identity:
            diff = {k: (old.get(k), v) for k, v in cfg.identity.items() if old.get(k) != v}
            raise ValueError(
                f"{run_dir} holds a run with another config (cached, requested): {diff}. "
                "Pass run_name=... for a separate cache or overwrite=True to discard it."
            )
    if overwrite:  # discard every cached step of this run directory
        for p in _cached_steps(run_dir).values():
            p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(cfg.identity, indent=1))


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------- training


def train(
    cfg: FinetuneConfig,
    data: TaskData | None = None,
    base=None,
    progress: bool = True,
    overwrite: bool = False,
    built=None,
    until: int | None = None,
) -> tuple[RunResult, Any]:
    """Fine-tune (or resume) a LoRA run; returns ``(RunResult, (peft_model, tok, wrapper))``.

    If ``step{cfg.steps}.pt`` is cached, no training happens: the final weights are loaded.
    Otherwise training resumes from the latest cached step (exactly: batch order is a
    function of the step, RNG and optimizer state are restored). ``built`` may pass a
    ``build_model`` result to reuse (its weights are overwritten by the checkpoint).
    ``until`` stops after that step of ``cfg``'s schedule (saved there; a later call
    resumes from it exactly), so an early checkpoint costs only its own steps.
    """
    stop = cfg.steps if until is None else until
    if not 0 < stop <= cfg.steps:
        raise ValueError(f"until={until} is outside the run's 1..{cfg.steps} steps")
    data = data if data is not None else _load_data(cfg)
    _check_run_dir(cfg, overwrite)
    peft_model, tokenizer, wrapper = built if built is not None else build_model(cfg, data, base)
    collate = make_collate(tokenizer, data.kind, cfg.seq_len)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _linear_schedule(optimizer, cfg.warmup_steps, cfg.steps)

    cached = _cached_steps(cfg.run_dir)
    start = max([s for s in cached if s <= stop], default=0)
    if start:
        ckpt = torch.load(cached[start], map_location="cpu", weights_only=False)
        load_trainable_state_dict(peft_model, ckpt["trainable"])
        if start < cfg.steps:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(cfg.seed)

    losses: dict[int, float] = {}
    step_seconds: list[float] = []
    wrapper.train()
    bar = tqdm(
        range(start, stop),
        initial=start,
        total=stop,
        desc=f"{cfg.model}/{cfg.task}",
        disable=not progress or start >= stop,
    )
    for step in bar:
        t0 = time.perf_counter()
        idx = batch_indices(len(data.train), cfg.batch_size, step, cfg.seed)
        batch = collate([data.train[i] for i in idx])
        logits = wrapper(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step_seconds.append(time.perf_counter() - t0)
        done = step + 1
        losses[done] = loss.item()
        bar.set_postfix(loss=f"{losses[done]:.3f}", s_per_step=f"{step_seconds[-1]:.2f}")
        if done % cfg.save_every == 0 or done == stop:
            _save(
                cfg.run_dir / f"step{done}.pt",
                {
                    "step": done,
                    "trainable": trainable_state_dict(peft_model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "config": cfg.identity,
                    "losses": losses,
                },
            )
    wrapper.eval()
    result = RunResult(cfg, _cached_steps(cfg.run_dir), losses, step_seconds)
    return result, (peft_model, tokenizer, wrapper)


def _load_data(cfg: FinetuneConfig) -> TaskData:
    return load_task(cfg.task, cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.data_seed)


def load_run(cfg: FinetuneConfig, step: int | None = None, data: TaskData | None = None, base=None):
    """``(peft_model, tokenizer, wrapper, data)`` with a cached checkpoint loaded (eval mode).

    ``step=None`` takes ``cfg.steps``; ``step=0`` gives the untrained LoRA init.

    Raises:
        FileNotFoundError: if that checkpoint is not cached (run :func:`train` first).
    """
    data = data if data is not None else _load_data(cfg)
    peft_model, tokenizer, wrapper = build_model(cfg, data, base)
    step = cfg.steps if step is None else step
    if step:
        path = cfg.run_dir / f"step{step}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not cached; run benchmarks.finetune.train first")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt["config"] != cfg.identity:
            raise ValueError(f"{path} was trained with another config")
        load_trainable_state_dict(peft_model, ckpt["trainable"])
    wrapper.eval()
    return peft_model, tokenizer, wrapper, data


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_probs(
    wrapper: nn.Module, examples: Sequence[dict], collate, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP class probabilities ``(N, C)`` and labels ``(N,)`` (wrapper in eval mode)."""
    was_training = wrapper.training
    wrapper.eval()
    probs, labels = [], []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size])
        probs.append(torch.softmax(wrapper(batch).float(), dim=-1))
        labels.append(batch["labels"])
    wrapper.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def evaluate(wrapper: nn.Module, examples: Sequence[dict], collate, batch_size: int = 16) -> dict:
    """:func:`classification_metrics` of the MAP predictions on ``examples``."""
    return classification_metrics(*predict_probs(wrapper, examples, collate, batch_size))


# --------------------------------------------------------------------------- CLI


@dataclass
class CliOptions:
    """CLI options that do not change the run (evaluation, caching, output)."""

    eval: bool = field(default=False, metadata={"help": "evaluate every checkpoint (MAP)"})
    eval_split: Literal["validation", "test"] = "test"
    eval_batch_size: int = 16
    eval_steps: list[int] | None = field(
        default=None, metadata={"help": "checkpoints to evaluate (all)"}
    )
    overwrite: bool = False
    quiet: bool = False
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads"})


def _parse(argv: list[str] | None) -> tuple[FinetuneConfig, CliOptions]:
    """``--model smollm2 --steps 200 --eval ...`` -> (run config, CLI options)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (FinetuneConfig, CliOptions), description="LoRA fine-tuning with a resumable cache."
    )
    cfg, args = parser.parse_args_into_dataclasses(argv)
    return cfg, args


def main(argv: list[str] | None = None) -> dict:
    cfg, args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _load_data(cfg)
    t0 = time.perf_counter()
    base = _load_base(cfg.model, data.n_classes, cfg.seed)
    load_s = time.perf_counter() - t0
    built = build_model(cfg, data, base)
    init_state = trainable_state_dict(built[0])  # step 0: LoRA init (B = 0), fresh head
    result, (peft_model, tokenizer, wrapper) = train(
        cfg, data, progress=not args.quiet, overwrite=args.overwrite, built=built
    )
    summary: dict[str, Any] = {"config": dataclasses.asdict(cfg), "load_s": load_s}
    if result.step_seconds:
        warm = sorted(result.step_seconds[1:] or result.step_seconds)
        summary["s_per_step_median"] = warm[len(warm) // 2]
        summary["s_per_step_min"] = warm[0]
        summary["s_per_step_mean"] = sum(warm) / len(warm)
        summary["threads"] = torch.get_num_threads()
        print(
            f"load {load_s:.1f} s; s/step (bs {cfg.batch_size}, {summary['threads']} threads): "
            f"median {summary['s_per_step_median']:.2f}, min {warm[0]:.2f}, "
            f"mean {summary['s_per_step_mean']:.2f}"
        )
    if args.eval:
        collate = make_collate(tokenizer, data.kind, cfg.seq_len)
        examples = getattr(data, args.eval_split)
        rows = {}
        steps = [0, *result.checkpoints] if args.eval_steps is None else args.eval_steps
        for step in steps:
            if step:
                ckpt = torch.load(result.checkpoints[step], map_location="cpu", weights_only=False)
                state = ckpt["trainable"]
            else:
                state = init_state
            load_trainable_state_dict(peft_model, state)
            t1 = time.perf_counter()
            m = evaluate(wrapper, examples, collate, args.eval_batch_size)
            m["eval_s"] = time.perf_counter() - t1
            rows[step] = m
            print(
                f"step {step:5d}  acc {m['acc']:.3f}  ece {100 * m['ece']:5.1f}  "
                f"nll {m['nll']:.3f}  conf {m['conf']:.3f}  ({m['eval_s']:.1f} s)",
                flush=True,
            )
        summary[f"map_{args.eval_split}"] = rows
        out = cfg.run_dir / f"map_{args.eval_split}.json"
        out.write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
