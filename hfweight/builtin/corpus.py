"""The embedded multi-domain corpus: built offline from the Python standard library plus generated text.

Five domains with known, contrasting properties, so weighting strategies have something to tell apart:

- ``code``: chunks of standard-library source (≤ 40 lines / ≤ 1500 characters each);
- ``prose``: docstrings of the same files (module, class and function docstrings of at least 80 characters);
- ``arithmetic``: generated problems with verifiable answers (``"Q: 37 + 48 = ?\\nA: 85"``);
- ``redundant``: a few templates repeated with tiny variations (low loss once learned);
- ``noise``: random characters (unlearnable; high loss forever).

:func:`build_corpus` returns a ``DatasetDict`` with ``train`` and ``heldout`` splits and caches it on disk, keyed by
the seed, the parameters and the Python installation (the standard library differs between Python versions).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import hashlib
import inspect
import itertools
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import tokenize
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import datasets

DOMAINS = ("code", "prose", "arithmetic", "redundant", "noise")

# Bump when the generated text changes, so stale caches are not reused.
CORPUS_FORMAT_VERSION = 2
HELDOUT_FRACTION = 0.05
MIN_HELDOUT = 20

CODE_MAX_LINES = 40
CODE_MAX_CHARS = 1500
CODE_MIN_CHARS = 64
PROSE_MIN_CHARS = 80
PROSE_MAX_CHARS = 1500

# Directories of the standard library left out: tests, third-party packages, and generated tables (the codec tables
# in `encodings` and the help texts in `pydoc_data` are huge and repetitive, which would blur the `code` domain).
SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
)

# Arithmetic operations: name (used as the GRPO domain) -> symbol in the text.
ARITHMETIC_OPS = {"add": "+", "sub": "-", "mul": "*"}
_SYMBOL_TO_OP = {symbol: name for name, symbol in ARITHMETIC_OPS.items()}
ARITHMETIC_PATTERN = re.compile(r"Q: (\d+) ([+\-*]) (\d+) = \?\nA: (-?\d+)")


# ----------------------------------------------------------------------------------------------------------------------
# Cache location


def default_cache_dir(cache_dir: str | None = None) -> str:
    """The root directory of hfweight's on-disk caches: ``cache_dir`` if given, else ``$HFWEIGHT_CACHE``, else
    ``~/.cache/hfweight``. One place for the corpus and the tokenizer, so a test can redirect both."""
    if cache_dir is not None:
        return os.path.abspath(os.path.expanduser(cache_dir))
    env = os.environ.get("HFWEIGHT_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "hfweight")


def cache_key(params: dict) -> str:
    """A short stable hash of ``params`` (JSON-serialisable), used in cache directory names."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_build(final_dir: str, write: Callable[[str], None]) -> None:
    """Create ``final_dir`` by calling ``write(tmp_dir)`` on a fresh temporary directory next to it and renaming
    that directory into place.

    The rename is atomic, so readers never see a half-written cache. If another process published ``final_dir``
    first, this one's copy is discarded and theirs is kept (both were built from the same inputs).
    """
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final_dir)}-", dir=parent)
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the published cache should read like any directory
        write(tmp_dir)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not os.path.isdir(final_dir):
                raise
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def quiet_datasets():
    """Hide ``datasets`` progress bars (saving a few MB of cache is not worth a bar), restoring the previous state."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# ----------------------------------------------------------------------------------------------------------------------
# Standard library: source chunks, docstrings and documented functions


@dataclass(frozen=True)
class StdlibFunction:
    """A public, documented standard-library function or method (used by the SFT docstring-to-name task)."""

    name: str
    signature: str
    docstring: str


@dataclass(frozen=True)
class StdlibIndex:
    """What the corpus and the SFT tasks take from the standard library, in a deterministic order."""

    code_chunks: tuple[str, ...]
    docstrings: tuple[str, ...]
    functions: tuple[StdlibFunction, ...]


def stdlib_root() -> str:
    """The directory of this interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted paths of the standard library's ``.py`` files, without tests, site-packages and generated tables."""
    root = root or stdlib_root()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith("config-"))
        files.extend(
            os.path.join(directory, name) for name in names if name.endswith(".py") and not name.startswith("test_")
        )
    return sorted(files)


def read_source(path: str) -> str | None:
    """The text of a Python file (honouring its coding cookie), or ``None`` if it cannot be decoded."""
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def chunk_source(text: str, max_lines: int = CODE_MAX_LINES, max_chars: int = CODE_MAX_CHARS) -> list[str]:
    """Consecutive chunks of ``text`` of at most ``max_lines`` lines and ``max_chars`` characters (an overlong line
    is cut), with blank lines trimmed at both ends; chunks with fewer than ``CODE_MIN_CHARS`` visible characters are
    dropped."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if len(line) > max_chars:
            line = line[: max_chars - 1] + "\n"
        if current and (len(current) >= max_lines or size + len(line) > max_chars):
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current))
    trimmed = (re.sub(r"\A(?:[ \t]*\n)+", "", c).rstrip() for c in chunks)
    return [c for c in trimmed if len("".join(c.split())) >= CODE_MIN_CHARS]


def clean_docstring(raw: str, max_chars: int = PROSE_MAX_CHARS) -> str:
    """``inspect.cleandoc(raw)`` stripped, cut to at most ``max_chars`` (at a paragraph break when there is one)."""
    text = inspect.cleandoc(raw).strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut >= PROSE_MIN_CHARS else max_chars].rstrip()


def _raw_docstring(node: ast.AST) -> str | None:
    return ast.get_docstring(node, clean=False)  # type: ignore[arg-type]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """``name(args)`` without a leading ``self``/``cls``; just ``name`` when the argument list is long."""
    args = re.sub(r"\A(?:self|cls)(?:, |\Z)", "", ast.unparse(node.args))
    return f"{node.name}({args})" if len(args) <= 60 else node.name


def extract_docs(tree: ast.Module) -> tuple[list[str], list[StdlibFunction]]:
    """The docstrings (cleaned, ≥ ``PROSE_MIN_CHARS``) of a module, its classes and their methods and its functions,
    in source order; and its public documented functions and methods."""
    docs: list[str] = []
    functions: list[StdlibFunction] = []
    raw = _raw_docstring(tree)
    if raw:
        docs.append(clean_docstring(raw))

    def visit(body: Sequence[ast.stmt]) -> None:
        for node in body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            raw = _raw_docstring(node)
            if raw:
                docs.append(clean_docstring(raw))
                if not isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    functions.append(StdlibFunction(node.name, _signature(node), inspect.cleandoc(raw)))
            if isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return [d for d in docs if len(d) >= PROSE_MIN_CHARS], functions


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector. Parsing allocates millions of short-lived (acyclic, refcount-freed) AST
    nodes; with torch and datasets imported, the collections they trigger would otherwise double the parse time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@functools.lru_cache(maxsize=2)
def stdlib_index(root: str | None = None) -> StdlibIndex:
    """Code chunks, docstrings and documented functions of the whole standard library (parsed once per process;
    about three seconds). The order is deterministic: sorted files, source order within a file."""
    code: list[str] = []
    docs: list[str] = []
    functions: list[StdlibFunction] = []
    with gc_paused():
        for path in stdlib_files(root):
            text = read_source(path)
            if text is None:
                continue
            code.extend(chunk_source(text))
            try:
                tree = ast.parse(text, filename=path)
            except (SyntaxError, ValueError):
                continue
            file_docs, file_functions = extract_docs(tree)
            docs.extend(file_docs)
            functions.extend(file_functions)
    return StdlibIndex(tuple(code), tuple(docs), tuple(functions))


# ----------------------------------------------------------------------------------------------------------------------
# Generated domains


def domain_rng(seed: int, name: str) -> random.Random:
    """An independent, reproducible random stream per (seed, purpose): adding a domain never shifts another one."""
    return random.Random(f"hfweight:{seed}:{name}")


def make_problem(rng: random.Random, op: str | None = None) -> tuple[int, str, int, int]:
    """``(a, symbol, b, answer)`` for a random small-integer problem: ``add`` and ``sub`` on 0–99 (``sub`` never goes
    negative), ``mul`` on 0–12. ``op`` picks the operation (a key of ``ARITHMETIC_OPS``), else it is random."""
    op = op or rng.choice(sorted(ARITHMETIC_OPS))
    if op == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return a, "+", b, a + b
    if op == "sub":
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        return a, "-", b, a - b
    if op == "mul":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return a, "*", b, a * b
    raise ValueError(f"unknown arithmetic operation {op!r}; expected one of {sorted(ARITHMETIC_OPS)}")


def solve(a: int, symbol: str, b: int) -> int:
    """The exact answer of ``a <symbol> b`` (used to verify generated text)."""
    op = _SYMBOL_TO_OP[symbol]
    return a + b if op == "add" else a - b if op == "sub" else a * b


def arithmetic_document(rng: random.Random) -> str:
    """Six to sixteen ``"Q: a + b = ?\\nA: c"`` problems separated by blank lines."""
    problems = (make_problem(rng) for _ in range(rng.randint(6, 16)))
    return "\n\n".join(f"Q: {a} {s} {b} = ?\nA: {c}" for a, s, b, c in problems)


REDUNDANT_TEMPLATES = (
    "INFO worker-{w}: heartbeat ok, queue empty (tick {i})\n",
    "The {w} cat sat on the mat. The {w} cat sat on the mat again.\n",
    "row {i}: status=OK value=0 owner={w}\n",
    "{w} {w} {w} {w} {w} {w} {w} {w}\n",
    "Thank you for your message. We will reply to {w} soon.\n",
)
REDUNDANT_WORDS = ("alpha", "beta", "gamma", "delta", "red", "green", "blue", "north", "south", "east", "west", "zero")


def redundant_document(rng: random.Random) -> str:
    """One template line repeated 8–30 times with a fixed word and a counter: near-duplicates, easy to learn."""
    template = rng.choice(REDUNDANT_TEMPLATES)
    word = rng.choice(REDUNDANT_WORDS)
    start = rng.randint(0, 999)
    return "".join(template.format(w=word, i=start + j) for j in range(rng.randint(8, 30))).rstrip("\n")


_ASCII = [chr(c) for c in range(32, 127)] + ["\n"]
_NON_ASCII = [chr(c) for c in range(0xA1, 0x180)] + [chr(c) for c in range(0x391, 0x3CA) if c != 0x3A2]
NOISE_ALPHABET = _ASCII + _NON_ASCII
# 85 % of the probability mass on printable ASCII, uniform within each group.
_NOISE_CUM_WEIGHTS = list(
    itertools.accumulate([0.85 / len(_ASCII)] * len(_ASCII) + [0.15 / len(_NON_ASCII)] * len(_NON_ASCII))
)


def noise_document(rng: random.Random) -> str:
    """200–1200 independent random characters (85 % printable ASCII, the rest Latin/Greek letters): unlearnable."""
    return "".join(rng.choices(NOISE_ALPHABET, cum_weights=_NOISE_CUM_WEIGHTS, k=rng.randint(200, 1200)))


# ----------------------------------------------------------------------------------------------------------------------
# Assembly


def unique(texts: Iterable[str]) -> list[str]:
    """``texts`` without repeats, first occurrence kept (so train and held-out can never share a text)."""
    return list(dict.fromkeys(texts))


def sample_texts(texts: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """At most ``n`` distinct texts drawn from ``texts`` in random order."""
    pool = unique(texts)
    rng.shuffle(pool)
    return pool[:n]


def generate_texts(make: Callable[[random.Random], str], n: int, rng: random.Random) -> list[str]:
    """``n`` distinct documents from ``make`` (fewer only if it keeps repeating itself)."""
    seen: dict[str, None] = {}
    for _ in range(20 * n):
        if len(seen) >= n:
            break
        seen.setdefault(make(rng), None)
    return list(seen)


def domain_texts(domain: str, seed: int, n: int) -> list[str]:
    """Up to ``n`` distinct documents of ``domain`` for ``seed``, in a seeded random order."""
    rng = domain_rng(seed, domain)
    if domain == "code":
        return sample_texts(stdlib_index().code_chunks, n, rng)
    if domain == "prose":
        return sample_texts(stdlib_index().docstrings, n, rng)
    makers = {"arithmetic": arithmetic_document, "redundant": redundant_document, "noise": noise_document}
    if domain not in makers:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return generate_texts(makers[domain], n, rng)


def heldout_size(n: int, fraction: float = HELDOUT_FRACTION, minimum: int = MIN_HELDOUT) -> int:
    """Rows of a domain with ``n`` documents kept for held-out: ``fraction`` of them, at least ``minimum``, never more
    than half."""
    return min(max(minimum, round(fraction * n)), n // 2)


def split_domains(texts_by_domain: dict[str, list[str]], seed: int) -> dict[str, dict[str, list]]:
    """Columns of the ``train`` and ``heldout`` splits: the first :func:`heldout_size` documents of each domain are
    held out; train rows are shuffled across domains (so taking the first rows still gives a mixture), held-out rows
    stay grouped by domain."""
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    for domain, texts in texts_by_domain.items():
        k = heldout_size(len(texts))
        heldout.extend((t, domain) for t in texts[:k])
        train.extend((t, domain) for t in texts[k:])
    domain_rng(seed, "train-order").shuffle(train)
    return {
        name: {"text": [t for t, _ in rows], "domain": [d for _, d in rows]}
        for name, rows in (("train", train), ("heldout", heldout))
    }


CORPUS_FEATURES = datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string")})


def make_corpus(seed: int = 0, max_docs_per_domain: int = 2000) -> datasets.DatasetDict:
    """The corpus built in memory, without the cache (see :func:`build_corpus`)."""
    texts = {domain: domain_texts(domain, seed, max_docs_per_domain) for domain in DOMAINS}
    splits = split_domains(texts, seed)
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(columns, features=CORPUS_FEATURES) for name, columns in splits.items()}
    )


def corpus_cache_path(seed: int, max_docs_per_domain: int, cache_dir: str | None = None) -> str:
    """Where :func:`build_corpus` stores the corpus for these parameters and this Python installation."""
    params = {
        "format": CORPUS_FORMAT_VERSION,
        "seed": seed,
        "max_docs_per_domain": max_docs_per_domain,
        "heldout": [HELDOUT_FRACTION, MIN_HELDOUT],
        "python": sys.version,
        "stdlib": stdlib_root(),
    }
    name = f"seed{seed}-n{max_docs_per_domain}-py{sys.version_info[0]}{sys.version_info[1]}-{cache_key(params)}"
    return os.path.join(default_cache_dir(cache_dir), "corpus", name)


def build_corpus(seed: int = 0, cache_dir: str | None = None, max_docs_per_domain: int = 2000) -> datasets.DatasetDict:
    """The embedded multi-domain corpus: a ``DatasetDict`` with ``train`` and ``heldout`` splits, columns ``text`` and
    ``domain`` (one of :data:`DOMAINS`).

    Each domain contributes up to ``max_docs_per_domain`` distinct documents, of which ~5 % (at least 20) are held
    out. The same ``seed`` gives the same rows. The first call builds it (a few seconds: it parses the standard
    library) and saves it under ``cache_dir`` (default ``$HFWEIGHT_CACHE`` or ``~/.cache/hfweight``); later calls,
    from any process, load it from there. It exists so the default runs and the tests need no network.
    """
    path = corpus_cache_path(seed, max_docs_per_domain, cache_dir)
    if not os.path.exists(os.path.join(path, "dataset_dict.json")):
        corpus = make_corpus(seed, max_docs_per_domain)
        with quiet_datasets():
            atomic_build(path, corpus.save_to_disk)
    return datasets.load_from_disk(path)
