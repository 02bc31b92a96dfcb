"""Multi-domain corpora for the effectiveness benchmarks, built locally on any machine (no download).

``--corpus NAME`` of the benchmarks picks one; :func:`get_corpus` returns it in the shape of
:func:`hfweight.builtin.build_corpus` (a ``DatasetDict`` with ``train`` and ``heldout`` splits, columns ``text`` and
``domain``) and :data:`CORPORA` describes it (its clean domains — the target — and its harmful domain).

=============  ==============================================================  ========================================
name           clean domains (the target: their mean held-out loss)            harmful domain (its kind)
=============  ==============================================================  ========================================
``builtin``    ``code``, ``prose``, ``arithmetic`` (hfweight.builtin)          ``redundant`` (near-duplicate templates)
                                                                               and ``noise`` (random characters)
``pydocs``     ``reference`` (the language reference: ``pydoc_data.topics``),  ``boilerplate`` (licence headers and
               ``tests`` (source of the standard library's ``test`` package),  notices, a few texts with tiny changes)
               ``testcases`` (the ``math``/``cmath`` test-case tables and
               the e-mail messages of ``test_email``)
``records``    ``csv`` (tables with derived columns), ``json`` (orders whose    ``hexdump`` (random bytes as hex dump
               totals add up), ``sql`` (schemas, inserts and queries)           lines: random characters)
``ops``        ``logs`` (web-server access logs), ``config`` (INI files),       ``duplicates`` (six spam texts, each
               ``tracebacks`` (Python tracebacks of real stdlib names)          copied hundreds of times: exact copies)
``language``   ``stories`` (a small grammar), ``recipes`` (instructions with    ``foreign`` (the stories' grammar in
               quantities), ``markov`` (an order-2 word Markov chain fitted     another language and script: wrong-
               on the language reference)                                      language text)
=============  ==============================================================  ========================================

**Kept aside: ``language``.** Decided before any tuning (issue 23): no default was chosen or changed while looking at
it; it is run once, last, for the final table of ``docs/guidance.md``, and its results files say so. The four others
(``builtin``, ``pydocs``, ``records``, ``ops``) are the corpora the defaults may be tuned on.

Noisy-sample variant (the sample-weighting benchmark): the clean domains of a corpus with a fraction of their
fixed-length *blocks* replaced by uniformly random token ids (:func:`corrupt_blocks`); the oracle trains on the same
data with exactly those blocks dropped.

Every generator draws from a ``random.Random`` seeded by (corpus, seed, domain), so the same seed gives the same rows
and adding a domain never shifts another. Building a corpus takes about a second (``pydocs`` reads a few MB of
files); it is kept in memory per process (``functools.cache``), not on disk.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import sysconfig
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import datasets

DOCS_PER_DOMAIN = 1500
HELDOUT_DOCS = 100  # per domain: enough for two halves of 32 blocks of 128 tokens in every clean domain
MAX_CHARS = 1500  # longest document (characters), as in hfweight.builtin


@dataclass(frozen=True)
class CorpusSpec:
    """What a benchmark needs to know about a corpus: its domains, which are clean (the target), which harmful."""

    name: str
    clean: tuple[str, ...]
    harmful: tuple[str, ...]
    harm: str
    """The kind of harm of the harmful domain(s), in words."""
    kept_aside: bool = False

    @property
    def domains(self) -> tuple[str, ...]:
        return self.clean + self.harmful


CORPORA: dict[str, CorpusSpec] = {
    "builtin": CorpusSpec("builtin", ("arithmetic", "code", "prose"), ("redundant", "noise"),
                          "near-duplicate templates and random characters"),
    "pydocs": CorpusSpec("pydocs", ("reference", "tests", "testcases"), ("boilerplate",), "boilerplate"),
    "records": CorpusSpec("records", ("csv", "json", "sql"), ("hexdump",), "random bytes (hex dump)"),
    "ops": CorpusSpec("ops", ("config", "logs", "tracebacks"), ("duplicates",), "exact duplicates"),
    "language": CorpusSpec("language", ("markov", "recipes", "stories"), ("foreign",), "wrong-language text",
                           kept_aside=True),
}
KEPT_ASIDE = "language"
TUNING_CORPORA = tuple(name for name, spec in CORPORA.items() if not spec.kept_aside)


def corpus_spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {list(CORPORA)}")
    return CORPORA[name]


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def rng_for(corpus: str, seed: int, domain: str) -> random.Random:
    return random.Random(f"hfweight-corpora:{corpus}:{seed}:{domain}")


def paragraphs(text: str, max_chars: int = MAX_CHARS, min_chars: int = 80) -> list[str]:
    """``text`` cut at blank lines into documents of at most ``max_chars`` (paragraphs merged up to it; an overlong
    paragraph is cut); documents shorter than ``min_chars`` are dropped."""
    docs, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para[:max_chars]
    if current:
        docs.append(current)
    return [d for d in docs if len(d) >= min_chars]


def generated(make: Callable[[random.Random], str], rng: random.Random, n: int = DOCS_PER_DOMAIN) -> list[str]:
    return [make(rng)[:MAX_CHARS] for _ in range(n)]


def sampled(pool: list[str], rng: random.Random, n: int = DOCS_PER_DOMAIN) -> list[str]:
    pool = list(dict.fromkeys(pool))
    rng.shuffle(pool)
    return pool[:n]


def stdlib_path(*parts: str) -> str:
    return os.path.join(sysconfig.get_paths()["stdlib"], *parts)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------------------------------
# pydocs: the Python installation's documentation and tests (none of it is in the built-in corpus)


@functools.cache
def reference_pool() -> tuple[str, ...]:
    """Paragraph groups of the language reference shipped as ``pydoc_data.topics`` (``help()``'s text)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover (a Python without pydoc_data)
        topics = {}
    return tuple(doc for key in sorted(topics) for doc in paragraphs(topics[key]))


def test_code_pool(rng: random.Random, files: int = 120) -> list[str]:
    """Chunks of 20 lines of ``files`` test modules of the standard library's ``test`` package."""
    root = stdlib_path("test")
    names = sorted(n for n in os.listdir(root) if n.startswith("test_") and n.endswith(".py")) if os.path.isdir(root) else []
    chunks = []
    for name in rng.sample(names, min(files, len(names))):
        lines = read_text(os.path.join(root, name)).splitlines()
        for start in range(0, len(lines), 20):
            chunk = "\n".join(lines[start : start + 20]).strip()
            if len(chunk) >= 200:
                chunks.append(chunk[:MAX_CHARS])
    return chunks


def testcase_pool() -> list[str]:
    """The ``math``/``cmath``/float-formatting test-case tables (12-line chunks) and the e-mail test messages."""
    docs = []
    for name in ("cmath_testcases.txt", "math_testcases.txt", "formatfloat_testcases.txt", "floating_points.txt"):
        lines = [ln for ln in read_text(stdlib_path("test", name)).splitlines() if ln.strip()]
        docs += ["\n".join(lines[i : i + 12]) for i in range(0, len(lines), 12)]
    data = stdlib_path("test", "test_email", "data")
    if os.path.isdir(data):
        for name in sorted(os.listdir(data)):
            if name.endswith(".txt"):
                docs += paragraphs(read_text(os.path.join(data, name)), min_chars=40)
    return docs


LICENCE_NOTICES = (
    "Copyright (c) {year} {owner}. All rights reserved.\n\nRedistribution and use in source and binary forms, with or "
    "without modification, are permitted provided that the following conditions are met: redistributions of source "
    "code must retain the above copyright notice, this list of conditions and the following disclaimer.",
    "This file is part of {owner}'s toolkit, released {year}.\nTHIS SOFTWARE IS PROVIDED \"AS IS\" AND ANY EXPRESS OR "
    "IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A "
    "PARTICULAR PURPOSE ARE DISCLAIMED.",
    "Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file except in compliance "
    "with the License. Copyright {year} {owner}. Unless required by applicable law or agreed to in writing, software "
    "distributed under the License is distributed on an \"AS IS\" BASIS.",
    "-- Generated file, do not edit. --\n(c) {year} {owner}\nAll trademarks are the property of their respective "
    "owners. Subject to change without notice. Please consider the environment before printing this page.",
)
OWNERS = ("Acme Corp", "Initech", "the Python Software Foundation", "Globex Inc", "Hooli", "Umbrella Ltd")


def boilerplate_document(rng: random.Random) -> str:
    """One to three licence/legal notices with another year and owner: boilerplate, the same text again and again."""
    notices = [rng.choice(LICENCE_NOTICES).format(year=rng.randint(1995, 2025), owner=rng.choice(OWNERS))
               for _ in range(rng.randint(1, 3))]
    return "\n\n".join(notices)


def pydocs_domains(seed: int) -> dict[str, list[str]]:
    r = functools.partial(rng_for, "pydocs", seed)
    return {
        "reference": sampled(list(reference_pool()), r("reference")),
        "tests": sampled(test_code_pool(r("tests-files")), r("tests")),
        "testcases": sampled(testcase_pool(), r("testcases")),
        "boilerplate": generated(boilerplate_document, r("boilerplate")),
    }


# ----------------------------------------------------------------------------------------------------------------------
# records: generated structured data

FIRST = ("Ada", "Alan", "Grace", "Linus", "Guido", "Barbara", "Ken", "Dennis", "Margaret", "Edsger", "Donald", "Radia",
         "Frances", "John", "Katherine", "Tim", "Sophie", "Niklaus", "Leslie", "Shafi")
CITIES = ("Paris", "Lagos", "Lima", "Oslo", "Pune", "Kyoto", "Quito", "Perth", "Accra", "Turin", "Dakar", "Austin")
PRODUCTS = ("widget", "gadget", "sprocket", "gizmo", "flange", "bracket", "spindle", "valve", "rotor", "gasket")


def csv_document(rng: random.Random) -> str:
    """A CSV table with a header; ``total`` = ``qty`` × ``price`` on every row."""
    rows = ["id,name,city,product,qty,price,total"]
    start = rng.randint(1, 9000)
    for i in range(rng.randint(8, 30)):
        qty, price = rng.randint(1, 20), rng.randint(1, 99)
        rows.append(f"{start + i},{rng.choice(FIRST)},{rng.choice(CITIES)},{rng.choice(PRODUCTS)},{qty},{price},{qty * price}")
    return "\n".join(rows)


def json_document(rng: random.Random) -> str:
    """JSON-lines orders whose ``total`` is the sum of their items' ``qty × price``."""
    lines = []
    for _ in range(rng.randint(2, 6)):
        items = [{"sku": rng.choice(PRODUCTS), "qty": rng.randint(1, 9), "price": rng.randint(1, 50)}
                 for _ in range(rng.randint(1, 4))]
        order = {"order": rng.randint(1000, 99999), "customer": rng.choice(FIRST), "city": rng.choice(CITIES),
                 "items": items, "total": sum(i["qty"] * i["price"] for i in items)}
        lines.append(json.dumps(order))
    return "\n".join(lines)


def sql_document(rng: random.Random) -> str:
    """A table definition, inserts matching its columns, and a query or two."""
    table = rng.choice(("orders", "customers", "parts", "shipments", "invoices"))
    columns = rng.sample(("id", "name", "city", "qty", "price", "status", "created"), k=rng.randint(3, 6))
    types = {"id": "INTEGER PRIMARY KEY", "name": "TEXT", "city": "TEXT", "qty": "INTEGER", "price": "REAL",
             "status": "TEXT", "created": "DATE"}

    def value(column: str) -> str:
        return {"id": str(rng.randint(1, 999)), "name": f"'{rng.choice(FIRST)}'", "city": f"'{rng.choice(CITIES)}'",
                "qty": str(rng.randint(1, 50)), "price": f"{rng.randint(1, 999) / 10:.2f}",
                "status": f"'{rng.choice(('open', 'paid', 'shipped', 'void'))}'",
                "created": f"'2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}'"}[column]

    lines = [f"CREATE TABLE {table} (" + ", ".join(f"{c} {types[c]}" for c in columns) + ");"]
    lines += [f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(value(c) for c in columns)});"
              for _ in range(rng.randint(3, 10))]
    column = rng.choice(columns)
    lines.append(f"SELECT {column}, COUNT(*) FROM {table} GROUP BY {column} ORDER BY COUNT(*) DESC;")
    return "\n".join(lines)


def hexdump_document(rng: random.Random) -> str:
    """8–24 lines of a hex dump of random bytes (offsets count up; the bytes and their ASCII column are random)."""
    offset = rng.randrange(0, 1 << 20, 16)
    lines = []
    for i in range(rng.randint(8, 24)):
        data = bytes(rng.randrange(256) for _ in range(16))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in data)
        lines.append(f"{offset + 16 * i:08x}: {data.hex(' ')}  |{text}|")
    return "\n".join(lines)


def records_domains(seed: int) -> dict[str, list[str]]:
    r = functools.partial(rng_for, "records", seed)
    makers = {"csv": csv_document, "json": json_document, "sql": sql_document, "hexdump": hexdump_document}
    return {domain: generated(make, r(domain)) for domain, make in makers.items()}


# ----------------------------------------------------------------------------------------------------------------------
# ops: logs, configuration files, tracebacks

PATHS = ("/", "/login", "/api/items", "/api/items/{n}", "/static/app.js", "/search?q={w}", "/cart", "/api/users/{n}")
AGENTS = ("curl/8.1", "Mozilla/5.0 (X11; Linux x86_64)", "python-requests/2.31", "Googlebot/2.1")


def log_document(rng: random.Random) -> str:
    """Access-log lines of one server, time increasing; status and size follow the path."""
    second = rng.randint(0, 80000)
    lines = []
    for _ in range(rng.randint(6, 16)):
        second += rng.randint(0, 30)
        path = rng.choice(PATHS).format(n=rng.randint(1, 500), w=rng.choice(PRODUCTS))
        status = 404 if "users" in path and rng.random() < 0.3 else 200 if rng.random() < 0.9 else 500
        size = 0 if status != 200 else rng.randint(200, 9000)
        ip = f"10.{rng.randint(0, 9)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        stamp = f"12/Mar/2024:{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d} +0000"
        method = "POST" if path in ("/login", "/cart") else "GET"
        lines.append(f'{ip} - - [{stamp}] "{method} {path} HTTP/1.1" {status} {size} "-" "{rng.choice(AGENTS)}"')
    return "\n".join(lines)


SECTIONS = {
    "server": ("host", "port", "workers", "timeout"),
    "database": ("url", "pool_size", "echo", "timeout"),
    "logging": ("level", "file", "rotate", "format"),
    "cache": ("backend", "ttl", "max_entries"),
    "auth": ("provider", "client_id", "scopes"),
}


def config_document(rng: random.Random) -> str:
    """An INI file of two to four sections with typed values."""

    def value(key: str) -> str:
        if key in ("port",):
            return str(rng.choice((80, 443, 8000, 8080, 5432)))
        if key in ("workers", "pool_size", "ttl", "max_entries", "timeout", "rotate"):
            return str(rng.choice((1, 2, 4, 8, 16, 30, 60, 300, 1000)))
        if key in ("echo",):
            return rng.choice(("true", "false"))
        if key == "level":
            return rng.choice(("DEBUG", "INFO", "WARNING", "ERROR"))
        if key == "url":
            return f"postgresql://{rng.choice(FIRST).lower()}@db{rng.randint(1, 9)}/{rng.choice(PRODUCTS)}s"
        return rng.choice(("localhost", "redis", "memory", "oauth", "app.log", "%(asctime)s %(message)s", "read write"))

    parts = [f"# {rng.choice(PRODUCTS)} service configuration"]
    for section in rng.sample(sorted(SECTIONS), k=rng.randint(2, 4)):
        parts.append(f"[{section}]\n" + "\n".join(f"{key} = {value(key)}" for key in SECTIONS[section]))
    return "\n\n".join(parts)


@functools.cache
def stdlib_callables() -> tuple[tuple[str, str, str], ...]:
    """(module path, function, exception-free source-like line) triples from a few standard-library modules."""
    import importlib
    import inspect

    found = []
    for module_name in ("json.decoder", "email.parser", "argparse", "shutil", "csv", "pathlib", "textwrap", "tarfile"):
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if inspect.isfunction(obj) and not name.startswith("__"):
                found.append((module_name.replace(".", "/") + ".py", name, f"return {name}(*args)"))
    return tuple(found)


EXCEPTIONS = (("ValueError", "invalid literal for int() with base 10: '{w}'"), ("KeyError", "'{w}'"),
              ("FileNotFoundError", "[Errno 2] No such file or directory: '{w}.json'"),
              ("TypeError", "unsupported operand type(s) for +: 'int' and 'str'"),
              ("AttributeError", "'NoneType' object has no attribute '{w}'"))


def traceback_document(rng: random.Random) -> str:
    """A Python traceback: three to seven frames of real standard-library function names, then the exception."""
    frames = rng.sample(stdlib_callables(), k=rng.randint(3, 7))
    lines = ["Traceback (most recent call last):"]
    for path, function, source in frames:
        lines.append(f'  File "/usr/lib/python3/{path}", line {rng.randint(10, 2000)}, in {function}')
        lines.append(f"    {source}")
    name, message = rng.choice(EXCEPTIONS)
    lines.append(f"{name}: {message.format(w=rng.choice(PRODUCTS))}")
    return "\n".join(lines)


SPAM = (
    "CONGRATULATIONS!!! You have been selected to receive a FREE cruise. Click the link below to claim your prize "
    "before midnight. Reply STOP to unsubscribe.",
    "Dear valued customer, your account will be suspended unless you verify your details within 24 hours. Visit our "
    "secure portal and enter your password to continue.",
    "This website uses cookies to improve your experience. By continuing to browse you agree to our use of cookies. "
    "Accept all | Manage preferences | Reject non-essential",
    "Limited time offer: buy one get one free on all items. Use code SAVE50 at checkout. Terms and conditions apply. "
    "Offer valid while stocks last.",
    "You are receiving this newsletter because you signed up on our website. To stop receiving these emails, click "
    "here. Our mailing address is: 1 Main Street, Springfield.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore "
    "magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation.",
)


def duplicate_document(rng: random.Random) -> str:
    """One of six spam texts, exactly (massive exact duplication)."""
    return rng.choice(SPAM)


def ops_domains(seed: int) -> dict[str, list[str]]:
    r = functools.partial(rng_for, "ops", seed)
    makers = {"logs": log_document, "config": config_document, "tracebacks": traceback_document,
              "duplicates": duplicate_document}
    return {domain: generated(make, r(domain)) for domain, make in makers.items()}


# ----------------------------------------------------------------------------------------------------------------------
# language: natural-language-like generators (kept aside)

NOUNS = ("fox", "miller", "river", "lantern", "sailor", "garden", "clock", "raven", "village", "teacher", "bridge",
         "storm", "baker", "letter", "mountain", "child")
ADJECTIVES = ("old", "quiet", "bright", "tired", "clever", "small", "golden", "distant", "patient", "broken")
VERBS = ("found", "carried", "watched", "followed", "repaired", "painted", "forgot", "visited", "answered", "crossed")
PREPOSITIONS = ("near", "beyond", "under", "behind", "across", "beside")
NAMES = ("Mira", "Tomas", "Lena", "Odile", "Ravi", "Yusuf", "Ines", "Kofi")


def story_sentence(rng: random.Random) -> list[str]:
    """Words of one sentence of a small grammar: S → NP V NP [PP] | Name V NP [PP] (with 'and' joins)."""

    def noun_phrase() -> list[str]:
        return ["the"] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []) + [rng.choice(NOUNS)]

    subject = [rng.choice(NAMES)] if rng.random() < 0.4 else noun_phrase()
    words = subject + [rng.choice(VERBS)] + noun_phrase()
    if rng.random() < 0.5:
        words += [rng.choice(PREPOSITIONS)] + noun_phrase()
    if rng.random() < 0.3:
        words += ["and", rng.choice(VERBS)] + noun_phrase()
    return words


def render(sentences: list[list[str]]) -> str:
    return " ".join(" ".join(s)[0].upper() + " ".join(s)[1:] + "." for s in sentences)


def story_document(rng: random.Random) -> str:
    return "\n\n".join(render([story_sentence(rng) for _ in range(rng.randint(3, 6))]) for _ in range(rng.randint(1, 4)))


FOREIGN_ONSETS = "бвгдзклмнпрстхчш"
FOREIGN_VOWELS = "аеиоуыя"


@functools.cache
def foreign_lexicon() -> dict[str, str]:
    """A fixed word → pseudo-word map (Cyrillic syllables) for every word of the story grammar."""
    rng = random.Random("hfweight-corpora:foreign-lexicon")
    vocabulary = ("the", "and") + NOUNS + ADJECTIVES + VERBS + PREPOSITIONS + NAMES
    words = {}
    for word in vocabulary:
        syllables = max(1, len(word) // 3)
        words[word] = "".join(rng.choice(FOREIGN_ONSETS) + rng.choice(FOREIGN_VOWELS) for _ in range(syllables))
    return words


def foreign_document(rng: random.Random) -> str:
    """Stories of the same grammar in a made-up language in Cyrillic script, verb last: useless for an English target."""
    lexicon = foreign_lexicon()
    sentences = []
    for _ in range(rng.randint(4, 12)):
        words = [lexicon[w] for w in story_sentence(rng)]
        sentences.append(words[:1] + words[2:] + words[1:2])
    return render(sentences)


INGREDIENTS = ("flour", "sugar", "butter", "eggs", "milk", "salt", "rice", "onions", "garlic", "tomatoes", "lentils")
UNITS = ("cups", "grams", "tablespoons", "teaspoons", "pinches")
ACTIONS = ("Mix", "Stir", "Whisk", "Fold", "Simmer", "Bake", "Chop", "Season", "Rest", "Fry")


def recipe_document(rng: random.Random) -> str:
    """A recipe: a title, a numbered ingredient list with quantities, numbered steps that use those ingredients."""
    chosen = rng.sample(INGREDIENTS, k=rng.randint(3, 6))
    lines = [f"Recipe: {rng.choice(ADJECTIVES)} {rng.choice(chosen)} {rng.choice(('cake', 'soup', 'stew', 'bread'))}",
             f"Serves {rng.randint(2, 8)}.", "Ingredients:"]
    lines += [f"- {rng.randint(1, 500)} {rng.choice(UNITS)} of {item}" for item in chosen]
    lines.append("Steps:")
    for i in range(rng.randint(3, 7)):
        a, b = rng.sample(chosen, k=2)
        lines.append(f"{i + 1}. {rng.choice(ACTIONS)} the {a} with the {b} for {rng.randint(1, 60)} minutes.")
    return "\n".join(lines)


@functools.cache
def markov_table() -> tuple[dict[tuple[str, str], tuple[str, ...]], tuple[tuple[str, str], ...]]:
    """Order-2 word transitions of the language reference text (successor lists, in text order), and their sorted
    keys (the restart states)."""
    words = " ".join(reference_pool()).split()
    table: dict[tuple[str, str], list[str]] = defaultdict(list)
    for a, b, c in zip(words, words[1:], words[2:]):
        table[(a, b)].append(c)
    return {key: tuple(values) for key, values in table.items()}, tuple(sorted(table))


def markov_document(rng: random.Random) -> str:
    """60–250 words walked from the order-2 Markov chain of the language reference (a restart at a dead end)."""
    table, keys = markov_table()
    if not keys:  # pragma: no cover (a Python without pydoc_data)
        return story_document(rng)
    state = rng.choice(keys)
    words = list(state)
    for _ in range(rng.randint(60, 250)):
        successors = table.get(state)
        if not successors:
            state = rng.choice(keys)
            successors = table[state]
        word = rng.choice(successors)
        words.append(word)
        state = (state[1], word)
    return " ".join(words)


def language_domains(seed: int) -> dict[str, list[str]]:
    r = functools.partial(rng_for, "language", seed)
    makers = {"stories": story_document, "recipes": recipe_document, "markov": markov_document,
              "foreign": foreign_document}
    return {domain: generated(make, r(domain)) for domain, make in makers.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Assembly

BUILDERS: dict[str, Callable[[int], dict[str, list[str]]]] = {
    "pydocs": pydocs_domains,
    "records": records_domains,
    "ops": ops_domains,
    "language": language_domains,
}
FEATURES = datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string")})


def split(texts_by_domain: dict[str, list[str]], rng: random.Random, heldout_docs: int = HELDOUT_DOCS) -> dict:
    """Columns of ``train`` (shuffled across domains) and ``heldout`` (grouped by domain): the first ``heldout_docs``
    documents of each domain (at most a fifth of them) are held out. Duplicates stay duplicates (the ``duplicates``
    domain is made of them); held-out texts of the other domains are distinct documents."""
    train, heldout = [], []
    for domain, texts in texts_by_domain.items():
        k = min(heldout_docs, len(texts) // 5)
        heldout += [(t, domain) for t in texts[:k]]
        train += [(t, domain) for t in texts[k:]]
    rng.shuffle(train)
    return {name: {"text": [t for t, _ in rows], "domain": [d for _, d in rows]}
            for name, rows in (("train", train), ("heldout", heldout))}


@functools.cache
def get_corpus(name: str = "builtin", seed: int = 0) -> datasets.DatasetDict:
    """Corpus ``name`` for ``seed``: a ``DatasetDict`` with ``train`` and ``heldout`` splits and columns ``text``,
    ``domain`` (the shape of :func:`hfweight.builtin.build_corpus`, which ``builtin`` returns)."""
    spec = corpus_spec(name)
    if name == "builtin":
        from hfweight.builtin import build_corpus

        return build_corpus(seed=seed)
    texts = BUILDERS[name](seed)
    missing = set(spec.domains) - set(texts)
    if missing:  # pragma: no cover (a builder out of step with CORPORA)
        raise RuntimeError(f"corpus {name!r} built no {sorted(missing)}")
    columns = split({d: texts[d] for d in spec.domains}, rng_for(name, seed, "split"))
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(c, features=FEATURES) for s, c in columns.items()})


@functools.cache
def tokenizer_and_corpus(name: str = "builtin", seed: int = 0):
    """(the built-in BPE trained on corpus ``name``'s train split (cached on disk by content), the corpus)."""
    from hfweight.builtin import build_tokenizer

    corpus = get_corpus(name, seed)
    return build_tokenizer(corpus), corpus


def domain_blocks(tokenized, seq_len: int) -> dict[str, list[dict]]:
    """Each domain's tokenized documents concatenated and cut into ``seq_len``-token blocks (``input_ids``,
    ``domain``); the last partial block of a domain is dropped."""
    streams = defaultdict(list)
    for ids, domain in zip(tokenized["input_ids"], tokenized["domain"]):
        streams[domain].extend(ids)
    return {
        d: [{"input_ids": ids[i : i + seq_len], "domain": d} for i in range(0, len(ids) - seq_len + 1, seq_len)]
        for d, ids in streams.items()
    }


def lm_block_splits(tokenizer, corpus, seq_len: int, heldout_per_domain: int):
    """(train blocks with ``domain``, {domain: validation blocks}, {domain: test blocks}) of a corpus: the train
    split in ``seq_len`` blocks, the held-out split's blocks halved per domain (at most ``heldout_per_domain`` each)."""
    from hfweight.builtin.tasks import lm_dataset

    def blocks(split):
        return domain_blocks(lm_dataset(tokenizer, corpus[split], max_length=1 << 16), seq_len)

    train = datasets.Dataset.from_list([row for rows in blocks("train").values() for row in rows])
    validation, test = {}, {}
    for domain, held in blocks("heldout").items():
        half = min(heldout_per_domain, len(held) // 2)
        validation[domain] = datasets.Dataset.from_list(held[:half])
        test[domain] = datasets.Dataset.from_list(held[half : 2 * half])
    return train, validation, test


def corrupt_blocks(rows: list[dict], rate: float, vocab_size: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    """The noisy-sample variant: (``rows`` with ``round(rate · n)`` of them, chosen by ``seed``, given uniformly random
    token ids in ``[0, vocab_size)`` of the same length; the sorted indices of those rows). The oracle drops them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bad = sorted(rng.choice(len(rows), size=int(round(rate * len(rows))), replace=False).tolist())
    out = [dict(row) for row in rows]
    for i in bad:
        out[i]["input_ids"] = rng.integers(0, vocab_size, size=len(out[i]["input_ids"])).tolist()
    return out, bad

