"""Shared helpers of the scale / peer / predictive benchmarks.

Memory method (CPU): every configuration runs in a fresh Python subprocess
(:func:`run_worker`) started with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` and
``MALLOC_TRIM_THRESHOLD_=0`` so that freed tensor memory goes back to the OS instead of
staying in the heap. Inside the worker, :class:`PeakMeter` runs ``gc.collect()`` and
``malloc_trim(0)``, resets the kernel's peak-RSS counter (``echo 5 >
/proc/self/clear_refs``, which also resets ``getrusage(RUSAGE_SELF).ru_maxrss``) and
records the current RSS as the baseline; at the end it reads the peak (``VmHWM``). The
reported number is ``peak - baseline``: the extra resident memory the measured step
needed on top of everything that existed before it (model, data, fitted posterior).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

MiB = 2**20
GiB = 2**30


# ---------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak`."""
    return _status_kib("VmHWM") * 1024


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM, ru_maxrss) to the current RSS."""
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """``with PeakMeter() as m: ...`` then ``m.peak_delta`` (bytes), ``m.seconds`` (wall) and
    ``m.cpu_seconds`` (CPU time of this process, all threads: less sensitive than wall time
    to other processes competing for the cores)."""

    def __enter__(self) -> PeakMeter:
        self.reset_ok = reset_peak()
        self.baseline = rss_bytes()
        self._c0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0
        self.peak = peak_rss_bytes()
        self.peak_delta = max(0, self.peak - self.baseline)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}seconds": self.seconds,
            f"{prefix}cpu_seconds": self.cpu_seconds,
            f"{prefix}peak_delta_bytes": self.peak_delta,
            f"{prefix}baseline_rss_bytes": self.baseline,
        }


# ---------------------------------------------------------------------- subprocesses
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


def run_worker(
    module: str, worker: str, args: dict[str, Any], timeout: float = 1200
) -> dict[str, Any]:
    """Run ``python -m <module> --worker <worker> --worker-args <json>`` in a fresh process.

    The worker prints one line ``@@RESULT@@ <json>``; a failure (exception, crash, OOM
    kill, timeout) is returned as ``{"ok": False, "error": ...}``.
    """
    env = dict(os.environ)
    env.update(WORKER_ENV)
    cmd = [sys.executable, "-m", module, "--worker", worker, "--worker-args", json.dumps(args)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT@@ "):
            out = json.loads(line[len("@@RESULT@@ ") :])
            out.setdefault("ok", True)
            out["worker_wall_s"] = wall
            return out
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"ok": False, "error": f"exit code {proc.returncode}: {tail}", "worker_wall_s": wall}


def worker_main(workers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """If ``--worker`` is on the command line, run it, print its result and return True."""
    if "--worker" not in sys.argv:
        return False
    name = sys.argv[sys.argv.index("--worker") + 1]
    args = json.loads(sys.argv[sys.argv.index("--worker-args") + 1])
    torch.set_num_threads(int(args.get("threads", torch.get_num_threads())))
    try:
        result = workers[name](args)
        result["ok"] = True
    except Exception as exc:  # report, do not crash the parent
        import traceback

        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-3000:],
        }
    print("@@RESULT@@ " + json.dumps(result, default=_json_default), flush=True)
    return True


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


# ---------------------------------------------------------------------- models and data
def build_llama_lora(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    heads: int,
    r: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "lm_head"),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    lora_b_std: float = 0.02,
    max_positions: int = 512,
    attn: str = "sdpa",
    init_range: float = 0.02,
) -> torch.nn.Module:
    """Random ``LlamaForCausalLM`` + PEFT LoRA, ``lora_B`` moved off zero (a "trained"
    adapter), returned as the raw PEFT model (eval mode, LoRA dropout 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from laplace_lora_ext.testing import perturb_lora_B

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        attn_implementation=attn,
        initializer_range=init_range,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(base, lora)
    perturb_lora_B(model, seed=seed + 1, scale=lora_b_std, dtype=torch.get_default_dtype())
    return model.eval()


def choice_ids(n_classes: int, vocab: int) -> list[int]:
    """Fixed, distinct "answer token" ids spread over the vocabulary."""
    step = max(1, vocab // (n_classes + 1))
    return [min(vocab - 1, 7 + i * step) for i in range(n_classes)]


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def random_data(
    n: int, T: int, vocab: int, n_classes: int, seed: int = 123, padding: bool = False
) -> dict[str, torch.Tensor]:
    """Random token ids (``n``, ``T``), attention mask (left padding if asked) and labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, T), generator=gen)
    mask = torch.ones(n, T, dtype=torch.long)
    if padding:
        lengths = torch.randint(max(1, T // 2), T + 1, (n,), generator=gen)
        lengths[0] = T
        for i, L in enumerate(lengths.tolist()):
            mask[i, : T - L] = 0
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_loader(data: dict[str, torch.Tensor], batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(DictDataset(data), batch_size=batch_size, shuffle=False)


def batches(data: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    return list(make_loader(data, batch_size))


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """One plain training step's compute: forward + backward of the summed CE loss
    (gradients of the trainable LoRA parameters only; nothing is updated)."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss)


# ---------------------------------------------------------------------- factor storage
def factor_bytes(F: Any) -> int:
    """Bytes of one Kronecker factor: a dense tensor, or a LowRankFactor's U and s."""
    from laplace_lora_ext.lowrank import LowRankFactor

    if isinstance(F, LowRankFactor):
        return F.U.numel() * F.U.element_size() + F.s.numel() * F.s.element_size()
    return F.numel() * F.element_size()


def factor_numels(F: Any) -> list[int]:
    from laplace_lora_ext.lowrank import LowRankFactor

    if isinstance(F, LowRankFactor):
        return [F.U.numel(), F.s.numel()]
    return [F.numel()]


def kron_storage(kron: Any, names: list[str]) -> list[dict[str, Any]]:
    """Per parameter tensor: name, factor shapes/kinds and bytes."""
    from laplace_lora_ext.lowrank import LowRankFactor

    rows = []
    for name, F in zip(names, kron.kfacs, strict=True):
        rows.append(
            {
                "name": name,
                "factors": [
                    (
                        f"U{tuple(f.U.shape)}+s{tuple(f.s.shape)}"
                        if isinstance(f, LowRankFactor)
                        else f"dense{tuple(f.shape)}"
                    )
                    for f in F
                ],
                "bytes": sum(factor_bytes(f) for f in F),
                "max_numel": max(max(factor_numels(f)) for f in F),
            }
        )
    return rows


# ---------------------------------------------------------------------- tensor watch
class LargestTensorWatch:
    """Dispatch mode recording the largest *newly allocated* tensor produced by any ATen op
    (forward and backward included; outputs sharing storage with an input, i.e. views and
    in-place results, are skipped), and every such tensor with two dims > ``square_side``."""

    def __init__(self, square_side: int) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        watch = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                seen = {
                    _storage_ptr(t)
                    for t in tree_leaves((args, kwargs or {}))
                    if isinstance(t, torch.Tensor)
                }
                for t in _tensors(out):
                    if _storage_ptr(t) not in seen:  # views / in-place results: not new memory
                        watch._see(func, t)
                return out

        self.square_side = square_side
        self.max_numel = 0
        self.max_shape: tuple[int, ...] = ()
        self.max_op = ""
        self.square_hits: list[str] = []
        self._mode = _Mode()

    def _see(self, func: Any, t: torch.Tensor) -> None:
        n = t.numel()
        if n > self.max_numel:
            self.max_numel, self.max_shape, self.max_op = n, tuple(t.shape), str(func)
        big = [d for d in t.shape if d > self.square_side]
        if len(big) >= 2 and len(self.square_hits) < 200:
            self.square_hits.append(f"{func}: {tuple(t.shape)}")

    def __enter__(self) -> LargestTensorWatch:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)


# ---------------------------------------------------------------------- reporting
def fmt_bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "n/a"
    if b >= GiB:
        return f"{b / GiB:.2f} GiB"
    if b >= MiB:
        return f"{b / MiB:.1f} MiB"
    return f"{b / 1024:.1f} KiB"


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:.{max(1, digits - 2)}f}"
    return str(x)


def metric_cell(m: dict[str, float], percent_digits: int = 1) -> str:
    """One table cell "ACC / ECE / NLL / confidence" from a metrics dict (fractions; ACC, ECE
    and confidence printed ×100, ECE with one decimal, NLL with three); ``percent_digits``
    sets ACC's and confidence's decimals (0 where 1 test answer is 1 point)."""
    d = percent_digits
    return (
        f"{100 * m['acc']:.{d}f} / {100 * m['ece']:.1f} / {m['nll']:.3f} / {100 * m['conf']:.{d}f}"
    )


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS_DIR / f"{name}.json"
    mpath = RESULTS_DIR / f"{name}.md"
    jpath.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath


def publish(
    name: str, args: Any, summary: Any, runs: dict[str, Any], markdown: str
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (args, environment, summary, worker runs) and ``<name>.md``,
    then print the markdown and the paths."""
    payload = {
        "name": name,
        "args": vars(args),
        "environment": environment(),
        "summary": summary,
        "runs": runs,
    }
    jp, mp = write_results(name, payload, markdown)
    print(markdown)
    print(f"wrote {jp} and {mp}")
    return jp, mp


def environment() -> dict[str, Any]:
    import platform

    import laplace
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "laplace": getattr(laplace, "__version__", "0.3"),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def cpu_seconds(fn: Callable[[], Any], repeats: int = 1) -> float:
    """Median CPU seconds (``time.process_time``, less sensitive than wall time to other
    processes on a shared machine) of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def no_options(doc: str | None) -> None:
    """The command line of a script that takes no options: ``--help`` prints the first
    paragraph of ``doc`` and exits before anything is run or written; any argument is
    refused (argparse's usage error)."""
    argparse.ArgumentParser(description=(doc or "").split("\n\n")[0]).parse_args()
