"""Run the code in ``docs/*.md`` so that the documentation cannot rot.

The rules (also described in ``docs/contributing.md``):

* Every fenced block whose info string is exactly ``python`` is executed, in file order.
  All blocks of one page share one namespace; every page starts afresh.
* A hidden setup block, an HTML comment starting with ``<!-- setup`` and ending with a line
  ``-->``, is executed at its position as well. It is invisible on the site and binds the
  names a snippet uses (``peft_model``, ``tokenizer``, ``train_loader``...) to tiny random
  stand-ins built by the helpers below (no downloads, no GPU).
* The only skip rule: a block fenced as ``python title="not run"`` (hub models, GPUs...) is
  compiled but not executed. Blocks in any other allowed language (``bash``, ``text``,
  ``yaml``, ``toml``) are never executed. Any other fence is an error, so that a typo such as
  ``py`` cannot silently skip a snippet.
* ``<!-- requires: pkg -->`` on a page skips the whole page when ``pkg`` cannot be imported
  (used for bitsandbytes, an optional extra).
"""

from __future__ import annotations

import ast
import importlib
import random
import re
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from laplace_lora_ext.testing import perturb_lora_B

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))

RUN = "python"
NOT_RUN = 'python title="not run"'
NEVER_RUN = {"bash", "text", "yaml", "toml"}

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)"
    r"^(?P=indent)(?P=ticks)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
SETUP = re.compile(r"^<!--[ \t]*setup[ \t]*\n(?P<body>.*?)^-->[ \t]*$", re.MULTILINE | re.DOTALL)
REQUIRES = re.compile(
    r"^<!--[ \t]*requires:[ \t]*(?P<names>[\w\-, ]+?)[ \t]*-->[ \t]*$", re.MULTILINE
)


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the first code line in the .md file
    info: str  # fence info string, or "setup"
    code: str


def parse_blocks(text: str, page: str = "<text>") -> list[Block]:
    """Fenced blocks and hidden setup blocks of a markdown text, in order."""
    found, spans = [], []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("body")) + 1
        found.append((m.start(), Block(page, line, m["info"].strip(), textwrap.dedent(m["body"]))))
        spans.append(m.span())
    for m in SETUP.finditer(text):
        if any(start <= m.start() < end for start, end in spans):
            continue  # an example of the syntax inside a fence, not a setup block
        line = text.count("\n", 0, m.start("body")) + 1
        found.append((m.start(), Block(page, line, "setup", m["body"])))
    return [b for _, b in sorted(found, key=lambda item: item[0])]


def blocks(page: str) -> list[Block]:
    """:func:`parse_blocks` of ``docs/<page>``."""
    return parse_blocks((DOCS / page).read_text(encoding="utf-8"), page)


def compile_block(block: Block):
    """Compile with the markdown file's name and line numbers (tracebacks point into docs)."""
    return compile("\n" * (block.line - 1) + block.code, str(DOCS / block.page), "exec")


# --------------------------------------------------------------------------- tiny stand-ins
# Helpers available to every snippet's namespace; hidden setup blocks call them.

WORDS = (
    "[PAD] [UNK] <s> </s> A B C D . , : ? ! yes no true false Question Answer Choices "
    "Select one of the choices that answers following question is are was the a an it "
    "sky blue green red cold hot ice fire water wet dry cat dog bird can fly swim bark "
    "review great terrible food tasty bland good bad not very this product love hate"
).split()


def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :data:`WORDS` (unknown words: [UNK])."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
    )


def _llama_config(vocab_size: int, hidden: int = 16, intermediate: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )


def tiny_causal_lm(vocab_size: int | None = None):
    """A random ``LlamaForCausalLM`` (hidden 16, 2 layers) in place of a hub checkpoint."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_config(vocab_size or len(tiny_tokenizer())))


def tiny_checkpoint(kind: str = "causal-lm", hidden: int = 16, num_labels: int = 2) -> str:
    """Save a random model and :func:`tiny_tokenizer` to a folder, in place of a hub name.

    ``kind`` is ``"causal-lm"`` (Llama) or ``"seq-cls"`` (BERT). ``from_pretrained(path)``
    then works offline. For bitsandbytes 4-bit on CPU use ``hidden=64`` (its sizes must be
    multiples of 64).
    """
    tokenizer = tiny_tokenizer()
    if kind == "causal-lm":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(_llama_config(len(tokenizer), hidden, 2 * hidden))
    elif kind == "seq-cls":
        model = tiny_sequence_classifier(num_labels, len(tokenizer), hidden)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    path = tempfile.mkdtemp(prefix=f"tiny-{kind}-", dir=".")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_sequence_classifier(num_labels: int = 2, vocab_size: int | None = None, hidden: int = 16):
    """A random ``BertForSequenceClassification`` (2 layers)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size or len(tiny_tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config)


def perturb_lora(peft_model, scale: float = 0.1, seed: int = 0) -> None:
    """Stand-in for fine-tuning: move every ``lora_B`` away from its zero init."""
    perturb_lora_B(peft_model, seed=seed, scale=scale)


_SUBJECTS = ["the sky", "ice", "fire", "water", "a cat", "a dog", "a bird"]
_PROPERTIES = ["blue", "green", "cold", "hot", "wet", "dry", "red"]


def multiple_choice_rows(n: int, seed: int = 0) -> list[dict]:
    """``{"question", "choices", "label"}`` rows, a stand-in for a dataset's split."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = f"Is {rng.choice(_SUBJECTS)} {rng.choice(_PROPERTIES)}?"
        rows.append({"question": q, "choices": ["yes", "no"], "label": rng.randrange(2)})
    return rows


def review_rows(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Texts and binary labels, a stand-in for a sentiment dataset."""
    rng = random.Random(seed)
    good, bad = ["great", "tasty", "good", "love"], ["terrible", "bland", "bad", "hate"]
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(good if label else bad) for _ in range(rng.randint(2, 6))]
        texts.append("this food is " + " ".join(words))
        labels.append(label)
    return texts, labels


def choice_loaders(tokenizer, n_train: int = 32, n_test: int = 16, batch_size: int = 8):
    """``(collate, train_loader, test_loader)`` of multiple-choice prompts ending in "Answer:"."""
    from torch.utils.data import DataLoader

    def collate(rows):
        prompts = [
            f"Question: {r['question']} Choices: A. {r['choices'][0]} B. {r['choices'][1]} Answer:"
            for r in rows
        ]
        batch = tokenizer(prompts, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(batch)

    train_loader = DataLoader(multiple_choice_rows(n_train, 0), batch_size, collate_fn=collate)
    test_loader = DataLoader(multiple_choice_rows(n_test, 1), batch_size, collate_fn=collate)
    return collate, train_loader, test_loader


def choice_task(n_train: int = 32, n_test: int = 16, batch_size: int = 8) -> dict:
    """Everything a post-fine-tuning snippet needs for the multiple-choice example.

    Returns a dict with ``peft_model`` (LoRA r=4 on q_proj/v_proj, B perturbed),
    ``tokenizer``, ``choice_ids`` (" A", " B"), ``collate``, ``train_loader``,
    ``test_loader`` and ``test_batch``.
    """
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_tokenizer()
    peft_model = get_peft_model(
        tiny_causal_lm(len(tokenizer)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    perturb_lora(peft_model)
    choice_ids = [tokenizer(s, add_special_tokens=False)["input_ids"][-1] for s in (" A", " B")]
    collate, train_loader, test_loader = choice_loaders(tokenizer, n_train, n_test, batch_size)
    return {
        "peft_model": peft_model,
        "tokenizer": tokenizer,
        "choice_ids": choice_ids,
        "collate": collate,
        "train_loader": train_loader,
        "test_loader": test_loader,
        "test_batch": next(iter(test_loader)),
    }


PREAMBLE = {
    f.__name__: f
    for f in (
        tiny_tokenizer,
        tiny_causal_lm,
        tiny_checkpoint,
        tiny_sequence_classifier,
        perturb_lora,
        multiple_choice_rows,
        review_rows,
        choice_loaders,
        choice_task,
    )
}


# --------------------------------------------------------------------------- tests


def test_parser():
    """The extraction rules on a synthetic page."""
    text = textwrap.dedent(
        """\
        Intro.

        <!-- setup
        x = 1
        -->

        ```python
        y = x + 1
        ```

        ```python title="not run"
        load_from_hub()
        ```

        !!! note
            ```python
            z = y
            ```

        ````text
        <!-- setup
        never = 1
        -->
        ```python
        never = 2
        ```
        ````

        ```bash
        pip install x
        ```
        """
    )
    got = [(b.info, b.line, b.code.strip()) for b in parse_blocks(text)]
    assert got == [
        ("setup", 4, "x = 1"),
        ("python", 8, "y = x + 1"),
        (NOT_RUN, 12, "load_from_hub()"),
        ("python", 17, "z = y"),
        ("text", 21, "<!-- setup\nnever = 1\n-->\n```python\nnever = 2\n```"),
        ("bash", 30, "pip install x"),
    ]


def test_docs_exist():
    expected = {"index", "guide", "options", "quantized", "benchmarks", "api", "contributing"}
    assert expected <= {p.removesuffix(".md") for p in PAGES}


@pytest.mark.parametrize("page", PAGES)
def test_fences_follow_the_rules(page):
    """Only known fence kinds: a typo (```py, title="not-run") must not silently skip code."""
    for block in blocks(page):
        where = f"{page}:{block.line}"
        assert block.info in {RUN, NOT_RUN, "setup"} | NEVER_RUN, (
            f"{where}: unknown fence {block.info!r}; use {RUN!r}, {NOT_RUN!r} "
            f"or one of {sorted(NEVER_RUN)}"
        )
        if block.info in {RUN, NOT_RUN, "setup"}:
            ast.parse(block.code, filename=where)  # not-run blocks must still be valid Python


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(b.info in (RUN, "setup") for b in blocks(p))]
)
def test_snippets_run(page, tmp_path, monkeypatch):
    """Execute a page's setup and ``python`` blocks in order, in one namespace."""
    text = (DOCS / page).read_text(encoding="utf-8")
    for m in REQUIRES.finditer(text):
        for name in m["names"].replace(",", " ").split():
            try:
                importlib.import_module(name)
            except Exception as exc:  # a broken native library counts as missing
                pytest.skip(f"{page} requires {name}: {exc}")
    runnable = [b for b in blocks(page) if b.info in (RUN, "setup")]
    monkeypatch.chdir(tmp_path)  # snippets may write files (saved posteriors, checkpoints)
    threads = torch.get_num_threads()
    # tiny models: thread start-up dominates (one thread is ~100x faster on 2 cores)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)  # what users run, whatever conftest sets
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__", **PREAMBLE}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for block in runnable:
                exec(compile_block(block), namespace)
    finally:
        torch.set_num_threads(threads)
