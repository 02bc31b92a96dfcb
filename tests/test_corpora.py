"""The benchmark corpora (benchmarks/corpora.py): deterministic by seed, every declared domain present in both
splits, held-out texts distinct from train texts, and each harmful domain shaped like the harm it claims."""

from __future__ import annotations

import collections
import gzip
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import corpora  # noqa: E402

NEW = [name for name in corpora.CORPORA if name != "builtin"]


def by_domain(split) -> dict[str, list[str]]:
    out = collections.defaultdict(list)
    for text, domain in zip(split["text"], split["domain"]):
        out[domain].append(text)
    return out


def compression_ratio(texts: list[str]) -> float:
    """gzip size / raw size of the texts joined: low for repeated text, high for random characters."""
    raw = "\n".join(texts).encode()
    return len(gzip.compress(raw)) / len(raw)


@pytest.mark.parametrize("name", NEW)
def test_deterministic_by_seed_and_seeds_differ(name):
    first = corpora.get_corpus.__wrapped__(name, 0)
    again = corpora.get_corpus.__wrapped__(name, 0)
    other = corpora.get_corpus.__wrapped__(name, 1)
    assert first["train"].to_dict() == again["train"].to_dict()
    assert first["heldout"].to_dict() == again["heldout"].to_dict()
    assert first["train"]["text"][:50] != other["train"]["text"][:50]


@pytest.mark.parametrize("name", NEW)
def test_shape_domains_and_splits(name):
    spec = corpora.corpus_spec(name)
    corpus = corpora.get_corpus(name, 0)
    assert set(corpus) == {"train", "heldout"}
    for split in corpus.values():
        assert split.column_names == ["text", "domain"]
        counts = collections.Counter(split["domain"])
        assert set(counts) == set(spec.domains), counts
    train, heldout = by_domain(corpus["train"]), by_domain(corpus["heldout"])
    for domain in spec.clean:
        assert len(heldout[domain]) >= 60
        assert sum(map(len, train[domain])) >= 150_000, f"{name}/{domain} has too little training text"
        assert not set(heldout[domain]) & set(train[domain]), f"{name}/{domain}: held-out text also in train"
    # the train split is shuffled across domains: its first rows already mix them
    assert len(set(corpus["train"]["domain"][:40])) == len(spec.domains)


def test_exactly_one_kept_aside_and_it_is_named_in_the_docstring():
    assert [n for n, s in corpora.CORPORA.items() if s.kept_aside] == [corpora.KEPT_ASIDE]
    assert f"Kept aside: ``{corpora.KEPT_ASIDE}``" in corpora.__doc__
    assert corpora.KEPT_ASIDE not in corpora.TUNING_CORPORA
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        corpora.corpus_spec("nope")


def test_harmful_domains_have_their_shape():
    train = {name: by_domain(corpora.get_corpus(name, 0)["train"]) for name in NEW}
    clean_ratio = {name: min(compression_ratio(train[name][d]) for d in corpora.CORPORA[name].clean) for name in NEW}
    # boilerplate and exact duplicates: far more compressible (repeated text) than any clean domain of their corpus
    assert compression_ratio(train["pydocs"]["boilerplate"]) < 0.5 * clean_ratio["pydocs"]
    duplicates = train["ops"]["duplicates"]
    assert len(set(duplicates)) <= len(corpora.SPAM) and len(duplicates) > 100 * len(set(duplicates))
    # random bytes: the hex digits of a dump are uniformly spread (no byte value over 2x its expected count)
    digits = collections.Counter(
        pair for doc in train["records"]["hexdump"][:200] for line in doc.splitlines() for pair in line[10:57].split()
    )
    assert len(digits) == 256 and max(digits.values()) < 2 * sum(digits.values()) / 256
    assert compression_ratio(train["records"]["hexdump"]) > max(
        compression_ratio(train["records"][d]) for d in corpora.CORPORA["records"].clean
    )
    # wrong language: Cyrillic script, no word shared with the English stories
    foreign, stories = train["language"]["foreign"], train["language"]["stories"]
    letters = [c for doc in foreign[:100] for c in doc if c.isalpha()]
    assert sum("\u0400" <= c <= "\u04ff" for c in letters) / len(letters) > 0.99
    assert not {w.strip(".").lower() for d in foreign[:100] for w in d.split()} & {
        w.strip(".").lower() for d in stories[:100] for w in d.split()
    }


def test_corrupt_blocks_replaces_exactly_the_reported_rows():
    rows = [{"input_ids": [1000 + i] * 8, "domain": "csv"} for i in range(40)]
    noisy, bad = corpora.corrupt_blocks(rows, 0.3, vocab_size=50, seed=0)
    again, bad_again = corpora.corrupt_blocks(rows, 0.3, vocab_size=50, seed=0)
    assert noisy == again and bad == bad_again and len(bad) == 12 and bad == sorted(set(bad))
    for i, row in enumerate(noisy):
        if i in bad:
            assert len(row["input_ids"]) == 8 and all(0 <= t < 50 for t in row["input_ids"])
        else:
            assert row == rows[i]
    assert rows[bad[0]]["input_ids"] == [1000 + bad[0]] * 8  # the input is not modified
