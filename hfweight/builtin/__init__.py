"""The built-in pieces: a tiny model, tokenizer, multi-domain corpus and SFT/GRPO tasks, built locally (no network).

Everything the demo, the tiny recipes, the tests and the benchmarks need, built from the Python standard library.
Not part of the weighting library: the Weighted* trainers and the strategies never import it; only
:mod:`hfweight.entrypoints` does, for the ``builtin`` model and dataset names of the recipes.

- :func:`build_corpus`: a five-domain corpus (``code``, ``prose``, ``arithmetic``, ``redundant``, ``noise``) with
  ``train`` and ``heldout`` splits, cached on disk;
- :func:`build_tokenizer`: a byte-level BPE trained on it in seconds, with a TRL-compatible chat template, cached;
- :func:`build_model`: a small Llama (``tiny`` ≈ 1.3M or ``small`` ≈ 20M parameters) with random weights;
- :func:`lm_dataset`, :func:`sft_dataset`, :func:`grpo_dataset`, :func:`copy_dataset` and the GRPO reward functions.

The cache lives in ``$HFWEIGHT_CACHE`` (default ``~/.cache/hfweight``) unless a ``cache_dir`` is passed.
"""

from __future__ import annotations

import datasets
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from .corpus import DOMAINS, build_corpus
from .model import SIZES, build_model
from .tasks import (
    brevity_reward,
    copy_dataset,
    copy_reward,
    correctness_reward,
    format_reward,
    grpo_dataset,
    lm_dataset,
    sft_dataset,
    words_format_reward,
)
from .tokenizer import build_tokenizer


def tiny_setup(
    seed: int = 0, size: str = "tiny", vocab_size: int = 2048, cache_dir: str | None = None
) -> tuple[datasets.DatasetDict, PreTrainedTokenizerFast, LlamaForCausalLM]:
    """``(corpus, tokenizer, model)`` for ``seed`` in one call: the embedded corpus, the tokenizer trained on it and a
    freshly initialised model of preset ``size``. A few seconds the first time, well under a second once cached."""
    corpus = build_corpus(seed=seed, cache_dir=cache_dir)
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size, seed=seed, cache_dir=cache_dir)
    return corpus, tokenizer, build_model(tokenizer, size=size, seed=seed)


__all__ = [
    "DOMAINS",
    "SIZES",
    "brevity_reward",
    "build_corpus",
    "build_model",
    "build_tokenizer",
    "copy_dataset",
    "copy_reward",
    "correctness_reward",
    "format_reward",
    "grpo_dataset",
    "lm_dataset",
    "sft_dataset",
    "tiny_setup",
    "words_format_reward",
]
