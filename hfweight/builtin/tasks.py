"""Training tasks on the embedded data: language-modelling rows, SFT pairs, GRPO prompts and their reward functions.

- :func:`lm_dataset` tokenizes a corpus split for pretraining (``input_ids`` + ``domain``).
- :func:`sft_dataset` gives conversational prompt-completion pairs in three domains: ``arithmetic`` ("What is
  37 + 48?" → "85"), ``code`` (a standard-library docstring → the function's name and arguments) and ``redundant``
  (trivial echo tasks).
- :func:`grpo_dataset` gives arithmetic prompts with a verifiable ``answer``, one domain per operation (``add``,
  ``sub``, ``mul``), scored by :func:`correctness_reward`, :func:`brevity_reward` and :func:`format_reward` (TRL's
  reward-function signature; completions may be strings or lists of messages).
- :func:`copy_dataset` gives "Repeat after me: ..." prompts (2–5 words; the phrasing of the SFT echo rows, so a tiny
  SFT'd model starts with some skill and learns it within a few minutes of GRPO), scored by :func:`copy_reward`
  (words copied, in place), :func:`brevity_reward` and :func:`words_format_reward` (nothing but lowercase words):
  copying all of a long phrase costs brevity, and the shortest answers fail the format, so the three conflict.
"""

from __future__ import annotations

import random
import re
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from .corpus import ARITHMETIC_OPS, REDUNDANT_WORDS, StdlibFunction, domain_rng, make_problem, stdlib_index

SFT_DOMAIN_SHARES = {"arithmetic": 0.5, "code": 0.35, "redundant": 0.15}
DOCSTRING_MIN_CHARS = 40
DOCSTRING_MAX_CHARS = 400
BREVITY_SCALE = 64

_INTEGER = re.compile(r"-?\d+")
_JUST_AN_INTEGER = re.compile(r"\s*-?\d+\s*")
_LOWERCASE_WORDS = re.compile(r"[a-z]+( [a-z]+)*")
COPY_WORDS = (2, 5)  # words per copy prompt (inclusive range)


# ----------------------------------------------------------------------------------------------------------------------
# Language modelling


def lm_dataset(
    tokenizer: PreTrainedTokenizerBase, corpus_split: datasets.Dataset, max_length: int = 256
) -> datasets.Dataset:
    """``corpus_split`` with ``text`` replaced by ``input_ids`` = bos + tokens + eos, cut at ``max_length`` (no
    padding: rows have variable lengths; pad in the collator). ``domain`` and any other column are kept, so weighting
    columns travel with their rows."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # Truncating here (same result as cutting afterwards) keeps long documents cheap and warning-free.
        ids = tokenizer(batch["text"], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": [(bos + x + eos)[:max_length] for x in ids]}

    return corpus_split.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing")


# ----------------------------------------------------------------------------------------------------------------------
# SFT


def user(content: str) -> list[dict[str, str]]:
    """A conversational prompt: one user message."""
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict[str, str]]:
    """A conversational completion: one assistant message."""
    return [{"role": "assistant", "content": content}]


def arithmetic_question(a: int, symbol: str, b: int) -> str:
    """The chat phrasing of a problem: ``"What is 37 + 48?"``."""
    return f"What is {a} {symbol} {b}?"


def first_paragraph(docstring: str) -> str:
    """The first paragraph of a cleaned docstring, on one line."""
    return " ".join(docstring.strip().split("\n\n", 1)[0].split())


def docstring_tasks() -> list[tuple[str, str]]:
    """``(docstring summary, "name(args)")`` for public documented stdlib functions whose summary is 40–400
    characters and unique (a summary shared by two functions would make the answer ambiguous)."""
    by_summary: dict[str, list[StdlibFunction]] = {}
    for function in stdlib_index().functions:
        summary = first_paragraph(function.docstring)
        if DOCSTRING_MIN_CHARS <= len(summary) <= DOCSTRING_MAX_CHARS:
            by_summary.setdefault(summary, []).append(function)
    return [(summary, fs[0].signature) for summary, fs in by_summary.items() if len({f.signature for f in fs}) == 1]


def sft_arithmetic(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """``n`` arithmetic question → answer rows."""
    rows = []
    for _ in range(n):
        a, symbol, b, answer = make_problem(rng)
        rows.append({"prompt": user(arithmetic_question(a, symbol, b)), "completion": assistant(str(answer))})
    return rows


def sft_code(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """``n`` docstring → function-signature rows (distinct while the standard library has enough functions)."""
    tasks = docstring_tasks()
    rng.shuffle(tasks)
    picked = [tasks[i % len(tasks)] for i in range(n)]
    return [
        {
            "prompt": user(f"Which Python standard-library function is documented as follows?\n\n{summary}"),
            "completion": assistant(signature),
        }
        for summary, signature in picked
    ]


def sft_redundant(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """``n`` trivial echo rows: repeat a short phrase of a few fixed words."""
    rows = []
    for _ in range(n):
        phrase = " ".join(rng.choice(REDUNDANT_WORDS) for _ in range(rng.randint(2, 5)))
        rows.append({"prompt": user(f"Repeat after me: {phrase}"), "completion": assistant(phrase)})
    return rows


def domain_counts(n: int, shares: dict[str, float]) -> dict[str, int]:
    """``n`` split by ``shares`` (rounded down, the remainder going to the first domain)."""
    counts = {domain: int(n * share) for domain, share in shares.items()}
    first = next(iter(counts))
    counts[first] += n - sum(counts.values())
    return counts


def sft_dataset(seed: int = 0, n: int = 2000) -> datasets.Dataset:
    """``n`` conversational prompt-completion pairs for SFT, in a seeded random order: columns ``prompt`` (one user
    message), ``completion`` (one assistant message) and ``domain`` — ``arithmetic`` (half), ``code`` (docstring →
    ``name(args)``, ~35 %) and ``redundant`` (echo, ~15 %). Deterministic for a seed. It exists so SFT recipes have a
    multi-domain dataset without a download."""
    makers = {"arithmetic": sft_arithmetic, "code": sft_code, "redundant": sft_redundant}
    rows = []
    for domain, count in domain_counts(n, SFT_DOMAIN_SHARES).items():
        rows.extend({**row, "domain": domain} for row in makers[domain](domain_rng(seed, f"sft-{domain}"), count))
    domain_rng(seed, "sft-order").shuffle(rows)
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------------------------------
# GRPO


def grpo_dataset(seed: int = 0, n: int = 1000) -> datasets.Dataset:
    """``n`` arithmetic prompts with verifiable answers for GRPO: columns ``prompt`` (one user message, "What is
    37 + 48?"), ``answer`` (the integer as a string) and ``domain`` (the operation: ``add``, ``sub`` or ``mul``,
    equally likely). Deterministic for a seed. Score completions with the reward functions of this module."""
    rng = domain_rng(seed, "grpo")
    ops = sorted(ARITHMETIC_OPS)
    rows = []
    for _ in range(n):
        op = rng.choice(ops)
        a, symbol, b, answer = make_problem(rng, op)
        rows.append({"prompt": user(arithmetic_question(a, symbol, b)), "answer": str(answer), "domain": op})
    return datasets.Dataset.from_list(rows)


def completion_text(completion: Any) -> str:
    """The text of one completion as TRL passes it: a string, a message dict, or a list of messages (their contents
    joined; content may itself be a list of ``{"type": "text", "text": ...}`` blocks)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content", "")
        if isinstance(content, list):
            return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
        return "" if content is None else str(content)
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(message) for message in completion)
    return str(completion)


def first_integer(text: str) -> int | None:
    """The first (optionally negative) integer in ``text``, or ``None``."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def correctness_reward(completions: list, answer: list, **kwargs: Any) -> list[float | None]:
    """1.0 where the first integer of the completion equals the row's ``answer``, else 0.0 (``None`` when the row has
    no answer, which TRL treats as "not applicable")."""
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answer):
        if expected is None:
            rewards.append(None)
            continue
        rewards.append(1.0 if first_integer(completion_text(completion)) == int(expected) else 0.0)
    return rewards


def brevity_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float | None]:
    """``1 - min(len(text) / 64, 1)``: 1.0 for an empty completion, 0.0 from 64 characters on."""
    return [1.0 - min(len(completion_text(c)) / BREVITY_SCALE, 1.0) for c in completions]


def format_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 where the completion is just an integer (optionally surrounded by whitespace), else 0.0."""
    return [1.0 if _JUST_AN_INTEGER.fullmatch(completion_text(c)) else 0.0 for c in completions]


# ----------------------------------------------------------------------------------------------------------------------
# GRPO: copy a short phrase (a task the tiny model learns in minutes)


def copy_dataset(seed: int = 0, n: int = 1000) -> datasets.Dataset:
    """``n`` prompts "Repeat after me: <phrase>" with the phrase (2–5 words of ``REDUNDANT_WORDS``) as ``answer``
    and ``domain`` = ``"words<k>"`` (k words; equally likely). Deterministic for a seed. Score completions with
    :func:`copy_reward`, :func:`brevity_reward` and :func:`words_format_reward`."""
    rng = domain_rng(seed, "grpo-copy")
    rows = []
    for _ in range(n):
        k = rng.randint(*COPY_WORDS)
        phrase = " ".join(rng.choice(REDUNDANT_WORDS) for _ in range(k))
        rows.append({"prompt": user(f"Repeat after me: {phrase}"), "answer": phrase, "domain": f"words{k}"})
    return datasets.Dataset.from_list(rows)


def copy_score(text: str, expected: str) -> float:
    """Share of positions where the completion's word equals the phrase's, over the longer of the two (so a missing
    and an extra word cost alike): 1.0 for an exact copy, 0.0 for no word in place."""
    got, want = text.split(), expected.split()
    if not got and not want:
        return 1.0
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


def copy_reward(completions: list, answer: list, **kwargs: Any) -> list[float | None]:
    """:func:`copy_score` of each completion against its row's ``answer`` (``None`` where the row has none)."""
    return [
        None if expected is None else copy_score(completion_text(c), expected)
        for c, expected in zip(completions, answer)
    ]


def words_format_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 where the completion is one or more lowercase words separated by single spaces (surrounding whitespace
    allowed) and nothing else, else 0.0: an empty answer, punctuation or a second line fails."""
    return [1.0 if _LOWERCASE_WORDS.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]
