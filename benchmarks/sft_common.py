"""Workloads shared by the SFT benchmarks: the built-in tokenizer and SFT data tokenized exactly as ``trl.SFTTrainer``
tokenizes it, per-token columns (``token_weights``, ``ref_logps``) added to it, and an independent held-out evaluation
(per-domain completion NLL, arithmetic exact match by greedy decoding).

Everything expensive is cached on disk under ``$HFWEIGHT_CACHE/bench_sft`` (default ``~/.cache/hfweight``), keyed by
its parameters, so spawned subprocesses (``--isolate``) and repeated runs reuse it.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile

import datasets
import numpy as np
import torch

from hfweight.builtin import build_corpus, build_model, build_tokenizer
from hfweight.builtin.corpus import atomic_build, cache_key, default_cache_dir, quiet_datasets
from hfweight.builtin.tasks import copy_score, first_integer


def cache_root() -> str:
    return os.path.join(default_cache_dir(), "bench_sft")


@functools.cache
def sft_tokenizer(seed: int = 0):
    """The built-in BPE tokenizer (with its chat template) of the corpus of ``seed``."""
    return build_tokenizer(build_corpus(seed=seed))


def tokenize_like_trl(raw: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
    """``raw`` (conversational prompt-completion rows) prepared by ``trl.SFTTrainer`` itself — chat template, prompt
    labels masked (-100), truncation to ``max_length`` — with only ``input_ids``, ``labels`` and ``domain`` kept.

    Running TRL's own preparation (instead of re-implementing it) guarantees the rows are what ``SFTTrainer`` would
    train on; a tokenized dataset is then passed unchanged by every trainer (TRL skips preparation when
    ``input_ids`` is present)."""
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, max_length=max_length, report_to="none", use_cpu=True, shuffle_dataset=False, bf16=False
        )
        trainer = SFTTrainer(model=build_model(tokenizer), args=config, train_dataset=raw, processing_class=tokenizer)
        prepared = trainer.train_dataset
    return prepared.select_columns(["input_ids", "labels", "domain"])


def cached_dataset(name: str, params: dict, build) -> datasets.Dataset:
    """``build()`` saved once under ``cache_root()/<name>-<hash of params>`` and loaded from there afterwards."""
    path = os.path.join(cache_root(), f"{name}-{cache_key(params)}")
    if not os.path.isdir(path):
        with quiet_datasets():
            atomic_build(path, lambda tmp: build().save_to_disk(tmp))
    return datasets.load_from_disk(path)


# ---- held-out evaluation ---------------------------------------------------------------------------------------------


@torch.no_grad()
def completion_token_nlls(model, dataset: datasets.Dataset, batch_size: int = 32):
    """``(domain, NLL of each completion token)`` for every row (labels != -100), from the logits in plain PyTorch —
    no trainer, no weighting — so every method is scored the same way."""
    model.eval()
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        width = max(len(ids) for ids in rows["input_ids"])
        ids = torch.zeros(len(rows["input_ids"]), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"])):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
        ).view(target.shape)
        valid = target != -100
        for i, domain in enumerate(rows["domain"]):
            yield domain, nll[i][valid[i]]


def mean_per_domain(model, dataset: datasets.Dataset, of_nll, batch_size: int = 32) -> dict[str, float]:
    """Mean of ``of_nll(token NLLs)`` over the completion tokens of each ``domain`` and of all rows (``"all"``)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for domain, nll in completion_token_nlls(model, dataset, batch_size):
        for key in (domain, "all"):
            sums[key] = sums.get(key, 0.0) + float(of_nll(nll).sum())
            counts[key] = counts.get(key, 0) + nll.numel()
    return {key: sums[key] / counts[key] for key in sorted(sums)}


def completion_nll(model, dataset: datasets.Dataset, batch_size: int = 32) -> dict[str, float]:
    """Mean NLL per completion token, per ``domain`` and over all rows (``"all"``)."""
    return mean_per_domain(model, dataset, lambda nll: nll, batch_size)


def completion_probability(model, dataset: datasets.Dataset, batch_size: int = 32) -> dict[str, float]:
    """Mean probability the model gives each completion token, per ``domain`` and over all rows: the ``p`` that DFT
    multiplies each token's loss by (Wu et al. 2025), so it says how "strong" a starting model is for DFT."""
    return mean_per_domain(model, dataset, lambda nll: torch.exp(-nll), batch_size)


@torch.no_grad()
def greedy_completion(model, tokenizer, prompt: list[dict], max_new_tokens: int) -> str:
    """The greedy completion of one conversational prompt (one prompt at a time, so no padding is involved)."""
    model.eval()
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(
        input_ids=ids["input_ids"],
        attention_mask=ids["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def arithmetic_exact_match(model, tokenizer, rows: datasets.Dataset, max_new_tokens: int = 6) -> float:
    """Share of arithmetic prompts whose greedy completion's first integer equals the answer."""
    correct = 0
    for prompt, completion in zip(rows["prompt"], rows["completion"]):
        text = greedy_completion(model, tokenizer, prompt, max_new_tokens)
        correct += first_integer(text) == int(completion[0]["content"])
    return correct / len(rows)


def echo_word_accuracy(model, tokenizer, rows: datasets.Dataset, max_new_tokens: int = 16) -> float:
    """Mean share of the phrase's words that the greedy completion of an echo prompt ("Repeat after me: <phrase>")
    has in place (:func:`hfweight.builtin.tasks.copy_score`: 1 for an exact copy, a missing or an extra word costs
    alike): the one task of the built-in SFT data a tiny model can partly solve, so it is graded rather than exact."""
    scores = [
        copy_score(greedy_completion(model, tokenizer, prompt, max_new_tokens), completion[0]["content"])
        for prompt, completion in zip(rows["prompt"], rows["completion"])
    ]
    return sum(scores) / len(scores)


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std if not math.isnan(std) else 0.0, "values": [float(v) for v in arr]}
