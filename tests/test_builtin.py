"""The built-in pieces (hfweight.builtin): corpus, tokenizer, model, tasks, reward functions (no network; tens of seconds).

The full-size corpus and tokenizer are built once per module in a temporary cache; determinism and caching are
checked on smaller corpora (``max_docs_per_domain``) so every cold build stays cheap.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import datasets
import pytest
import torch

from hfweight.builtin import (
    DOMAINS,
    SIZES,
    brevity_reward,
    build_corpus,
    build_model,
    build_tokenizer,
    copy_dataset,
    copy_reward,
    correctness_reward,
    format_reward,
    grpo_dataset,
    lm_dataset,
    sft_dataset,
    tiny_setup,
    words_format_reward,
)
from hfweight.builtin import corpus as corpus_module
from hfweight.builtin.corpus import ARITHMETIC_OPS, ARITHMETIC_PATTERN, REDUNDANT_WORDS, atomic_build, solve

SMALL = 120  # documents per domain in the cheap corpora


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hfweight-cache"))


@pytest.fixture(scope="module")
def corpus(cache) -> datasets.DatasetDict:
    return build_corpus(seed=0, cache_dir=cache)


@pytest.fixture(scope="module")
def tokenizer(corpus, cache):
    return build_tokenizer(corpus, vocab_size=2048, cache_dir=cache)


def rows_of(split: datasets.Dataset, domain: str) -> list[str]:
    return [t for t, d in zip(split["text"], split["domain"]) if d == domain]


def char_entropy(texts: list[str]) -> float:
    counts = Counter("".join(texts))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


# ----------------------------------------------------------------------------------------------------------------------
# Corpus


def test_corpus_splits_columns_and_domains(corpus):
    assert set(corpus) == {"train", "heldout"}
    for split in corpus.values():
        assert split.column_names == ["text", "domain"]
        assert set(split["domain"]) == set(DOMAINS)
    train, heldout = Counter(corpus["train"]["domain"]), Counter(corpus["heldout"]["domain"])
    for domain in DOMAINS:
        total = train[domain] + heldout[domain]
        assert heldout[domain] >= 20
        assert heldout[domain] == max(20, round(0.05 * total))
        assert total <= 2000


def test_train_rows_are_mixed_across_domains(corpus):
    # pretrain.py's `max_train_samples` keeps the first rows: they must not all come from one domain.
    assert set(corpus["train"].select(range(50))["domain"]) == set(DOMAINS)


def test_heldout_disjoint_from_train(corpus):
    train, heldout = set(corpus["train"]["text"]), set(corpus["heldout"]["text"])
    assert not train & heldout
    assert len(train) == len(corpus["train"])  # no duplicate texts either


def test_code_and_prose_shapes(corpus):
    code = rows_of(corpus["train"], "code")
    assert all(len(t) <= 1500 and t.count("\n") < 40 for t in code)
    assert sum("def " in t or "class " in t or "import " in t for t in code) > 0.5 * len(code)
    prose = rows_of(corpus["train"], "prose")
    assert all(len(t) >= 80 for t in prose)
    assert all(t == t.strip() for t in prose)


def test_arithmetic_answers_verify(corpus):
    docs = rows_of(corpus["train"], "arithmetic") + rows_of(corpus["heldout"], "arithmetic")
    seen_symbols = set()
    for doc in docs:
        problems = ARITHMETIC_PATTERN.findall(doc)
        assert problems and len(problems) == doc.count("Q:")  # every problem is in the verifiable format
        for a, symbol, b, answer in problems:
            seen_symbols.add(symbol)
            assert solve(int(a), symbol, int(b)) == int(answer)
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[symbol]
            assert int(answer) == expected
    assert seen_symbols == set(ARITHMETIC_OPS.values())


def test_noise_has_higher_entropy_than_redundant(corpus):
    noise = char_entropy(rows_of(corpus["train"], "noise")[:300])
    redundant = char_entropy(rows_of(corpus["train"], "redundant")[:300])
    assert noise > redundant + 2.0, (noise, redundant)


def test_corpus_deterministic_across_cold_builds(tmp_path):
    a = build_corpus(seed=3, cache_dir=str(tmp_path / "a"), max_docs_per_domain=SMALL)
    b = build_corpus(seed=3, cache_dir=str(tmp_path / "b"), max_docs_per_domain=SMALL)
    for split in ("train", "heldout"):
        assert a[split].to_dict() == b[split].to_dict()
    other = build_corpus(seed=4, cache_dir=str(tmp_path / "a"), max_docs_per_domain=SMALL)
    for domain in ("arithmetic", "redundant", "noise"):
        assert set(rows_of(a["train"], domain)) != set(rows_of(other["train"], domain)), domain


def test_corpus_cache_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("HFWEIGHT_CACHE", str(tmp_path))
    first = build_corpus(seed=1, max_docs_per_domain=SMALL)
    assert os.listdir(tmp_path / "corpus")  # honoured $HFWEIGHT_CACHE

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached corpus should have been reused")

    monkeypatch.setattr(corpus_module, "make_corpus", no_rebuild)
    start = time.perf_counter()
    second = build_corpus(seed=1, max_docs_per_domain=SMALL)
    assert time.perf_counter() - start < 2.0
    assert first["train"].to_dict() == second["train"].to_dict()
    assert first["heldout"].to_dict() == second["heldout"].to_dict()
    assert not [n for n in os.listdir(tmp_path / "corpus") if n.startswith(".tmp")]


def test_atomic_build_tolerates_losing_the_race(tmp_path):
    final = tmp_path / "cache" / "thing"

    def write(content):
        def _write(directory):
            with open(os.path.join(directory, "data.txt"), "w") as f:
                f.write(content)

        return _write

    atomic_build(str(final), write("winner"))
    atomic_build(str(final), write("loser"))  # published second: discarded without error
    assert (final / "data.txt").read_text() == "winner"
    assert os.listdir(tmp_path / "cache") == ["thing"]  # no temporary directory left behind


def test_concurrent_cold_builds_agree(tmp_path, monkeypatch):
    # Both builders pass the "is it cached?" check before either publishes: one rename wins, the other is discarded.
    barrier = threading.Barrier(2)
    real_make_corpus = corpus_module.make_corpus

    def make_corpus_in_lockstep(*args, **kwargs):
        barrier.wait(timeout=30)
        return real_make_corpus(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "make_corpus", make_corpus_in_lockstep)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(build_corpus, 2, str(tmp_path), SMALL) for _ in range(2)]
        results = [f.result(timeout=60) for f in futures]
    assert results[0]["train"].to_dict() == results[1]["train"].to_dict()
    assert len(os.listdir(tmp_path / "corpus")) == 1  # one published copy, no temporary directory left


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_special_tokens_and_size(tokenizer):
    assert len(tokenizer) == 2048
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    ids |= set(tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]))
    assert len(ids) == 5 and max(ids) < 5
    assert tokenizer("hello")["input_ids"][0] != tokenizer.bos_token_id  # plain text gets no special tokens


def test_tokenizer_round_trip(corpus, tokenizer):
    texts = rows_of(corpus["heldout"], "code")[:20] + rows_of(corpus["heldout"], "noise")[:5]
    texts += ["  leading spaces\ttabs\n\n\ttrailing  ", "unicode: é ß 中文 🙂", ""]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    code = "".join(rows_of(corpus["heldout"], "code"))
    assert len(code) / len(tokenizer(code)["input_ids"]) > 2.0  # BPE actually merges


def test_tokenizer_cache_reused(corpus, cache, tokenizer):
    start = time.perf_counter()
    again = build_tokenizer(corpus, vocab_size=2048, cache_dir=cache)
    assert time.perf_counter() - start < 2.0
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.chat_template == tokenizer.chat_template


def test_tokenizer_large_vocab(corpus, cache):
    large = build_tokenizer(corpus, vocab_size=32000, cache_dir=cache)
    assert len(large) == 32000
    text = rows_of(corpus["heldout"], "code")[0]
    assert large.decode(large(text)["input_ids"]) == text


def test_chat_template_renders_and_masks_assistant(tokenizer):
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    full = prompt + [{"role": "assistant", "content": "5"}]
    text = tokenizer.apply_chat_template(full, tokenize=False)
    assert text == "<|bos|><|user|>What is 2 + 3?\n<|assistant|>5<|eos|>"
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt_text) and prompt_text.endswith("<|assistant|>")

    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
    out = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[: len(prompt_ids["input_ids"])] == prompt_ids["input_ids"]  # prompt is a token-level prefix
    assert ids[0] == tokenizer.bos_token_id
    masked = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(masked) == "5<|eos|>"
    assert mask == [0] * len(prompt_ids["input_ids"]) + [1] * (len(ids) - len(prompt_ids["input_ids"]))


def test_chat_template_passes_trl_checks(tokenizer):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


# ----------------------------------------------------------------------------------------------------------------------
# Model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_sizes_and_config(tokenizer):
    assert set(SIZES) >= {"tiny", "small"}
    tiny = build_model(tokenizer, "tiny")
    assert 1_000_000 <= n_params(tiny) <= 3_000_000
    small = build_model(tokenizer, "small")
    assert 15_000_000 <= n_params(small) <= 25_000_000
    for model in (tiny, small):
        config = model.config
        assert config.vocab_size == len(tokenizer)
        assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
            tokenizer.pad_token_id,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        )
        assert not config.tie_word_embeddings
        assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert build_model(tokenizer, "tiny", num_hidden_layers=2).config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown model size"):
        build_model(tokenizer, "huge")


def test_model_seeded_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = build_model(tokenizer, seed=7), build_model(tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)
    c = build_model(tokenizer, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_forward_backward_on_lm_rows(corpus, tokenizer):
    rows = lm_dataset(tokenizer, corpus["heldout"].select(range(0, 500, 50)), max_length=64)
    model = build_model(tokenizer, "tiny")
    length = max(len(ids) for ids in rows["input_ids"])
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    attention = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows["input_ids"]):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads, which stall on a busy machine
    try:
        out = model(input_ids=input_ids, attention_mask=attention, labels=labels)
        assert torch.isfinite(out.loss) and abs(out.loss.item() - math.log(len(tokenizer))) < 1.0  # ~uniform at init
        out.loss.backward()
    finally:
        torch.set_num_threads(threads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


def test_lm_dataset(corpus, tokenizer):
    split = corpus["heldout"]
    rows = lm_dataset(tokenizer, split, max_length=32)
    assert rows.column_names == ["domain", "input_ids"]
    assert rows["domain"] == split["domain"]
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert max(lengths) == 32 and len(set(lengths)) > 1  # truncated, not padded
    assert all(ids[0] == tokenizer.bos_token_id for ids in rows["input_ids"])
    short = lm_dataset(tokenizer, split.select(range(3)), max_length=100_000)
    for ids, text in zip(short["input_ids"], split.select(range(3))["text"]):
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[1:-1]) == text


def test_sft_dataset(tokenizer):
    data = sft_dataset(seed=0, n=200)
    assert data.column_names == ["prompt", "completion", "domain"]
    assert len(data) == 200
    assert sft_dataset(seed=0, n=200).to_list() == data.to_list()
    assert sft_dataset(seed=1, n=200).to_list() != data.to_list()
    counts = Counter(data["domain"])
    assert set(counts) == {"arithmetic", "code", "redundant"}
    assert counts["arithmetic"] == 100 and counts["code"] == 70
    for row in data:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        question, answer = row["prompt"][0]["content"], row["completion"][0]["content"]
        assert answer
        if row["domain"] == "arithmetic":
            a, symbol, b = re.fullmatch(r"What is (\d+) ([+\-*]) (\d+)\?", question).groups()
            assert solve(int(a), symbol, int(b)) == int(answer)
        elif row["domain"] == "redundant":
            assert question.endswith(answer)
        else:
            assert re.match(r"[A-Za-z_]\w*", answer)
    rendered = tokenizer.apply_chat_template(data[0]["prompt"] + data[0]["completion"], tokenize=False)
    assert rendered.endswith("<|eos|>")


def test_grpo_dataset():
    data = grpo_dataset(seed=0, n=300)
    assert data.column_names == ["prompt", "answer", "domain"]
    assert grpo_dataset(seed=0, n=300).to_list() == data.to_list()
    assert grpo_dataset(seed=1, n=300).to_list() != data.to_list()
    assert set(data["domain"]) == set(ARITHMETIC_OPS)
    for row in data:
        a, symbol, b = re.fullmatch(r"What is (\d+) ([+\-*]) (\d+)\?", row["prompt"][0]["content"]).groups()
        assert ARITHMETIC_OPS[row["domain"]] == symbol
        assert row["answer"] == str(solve(int(a), symbol, int(b)))


def test_reward_functions_on_strings_and_messages():
    texts = ["85", " 85\n", "The answer is 85.", "84", "-3", "", "eighty-five", "85" + " and more" * 10]
    answers = ["85", "85", "85", "85", "-3", "85", "85", "85"]
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    for completions in (texts, conversational):
        assert correctness_reward(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
        assert format_reward(completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        brevity = brevity_reward(completions, answer=answers)
        assert brevity[0] == pytest.approx(1 - 2 / 64) and brevity[5] == 1.0 and brevity[-1] == 0.0
        assert all(0.0 <= r <= 1.0 for r in brevity)
    # extra TRL keyword arguments are accepted; a row without an answer is "not applicable"
    assert correctness_reward(["1"], answer=[None], prompts=[[]], trainer_state=None, domain=["add"]) == [None]
    blocks = [[{"role": "assistant", "content": [{"type": "text", "text": "42"}]}]]
    assert correctness_reward(blocks, answer=["42"]) == [1.0] and format_reward(blocks, answer=["42"]) == [1.0]


def test_copy_dataset():
    data = copy_dataset(seed=0, n=400)
    assert data.column_names == ["prompt", "answer", "domain"]
    assert copy_dataset(seed=0, n=400).to_list() == data.to_list()
    assert copy_dataset(seed=1, n=400).to_list() != data.to_list()
    assert set(data["domain"]) == {"words2", "words3", "words4", "words5"}
    for row in data:
        phrase = row["prompt"][0]["content"].removeprefix("Repeat after me: ")
        assert phrase == row["answer"] and row["domain"] == f"words{len(phrase.split())}"
        assert set(phrase.split()) <= set(REDUNDANT_WORDS)


def test_copy_rewards_hand_worked():
    """Words in place over the longer of the two; the format accepts nothing but lowercase words."""
    texts = ["red blue", " red blue\n", "red", "red blue blue", "blue red", "", "Red blue.", "red  blue", "a\nb"]
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    for completions in (texts, conversational):
        answers = ["red blue"] * len(texts)
        assert copy_reward(completions, answer=answers) == [1.0, 1.0, 0.5, 2 / 3, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert words_format_reward(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert copy_reward(["x"], answer=[None]) == [None]
    # the rewards conflict: the full copy of a long phrase is less brief than a partial one
    long = "alpha beta gamma delta north"
    full, partial = copy_reward([long, "alpha"], answer=[long, long]), brevity_reward([long, "alpha"])
    assert full[0] > full[1] and partial[0] < partial[1]


def test_tiny_setup(cache):
    corpus, tokenizer, model = tiny_setup(seed=0, cache_dir=cache)
    assert set(corpus) == {"train", "heldout"}
    assert model.config.vocab_size == len(tokenizer) == 2048
