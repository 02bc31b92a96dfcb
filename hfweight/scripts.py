"""Loading and reporting helpers shared by the entry points in ``trainers/`` (no weighting logic here)."""

from __future__ import annotations

import json
import os
from typing import Any

BUILTIN = "builtin"
BUILTIN_PREFIX = "builtin:"


def load_causal_lm(name_or_path: str, tokenizer_name_or_path: str | None = None, vocab_size: int = 2048, seed: int = 0):
    """``(model, tokenizer)``: the embedded tiny Llama for ``builtin:<size>``, else ``from_pretrained``."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        from .defaults import build_corpus, build_model, build_tokenizer

        tokenizer = build_tokenizer(build_corpus(seed=seed), vocab_size=vocab_size)
        return build_model(tokenizer, size=name_or_path[len(BUILTIN_PREFIX) :], seed=seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(name_or_path), tokenizer


def load_text_dataset(script_args: Any, seed: int = 0):
    """The embedded corpus (``DatasetDict`` with ``train``/``heldout``) or ``datasets.load_dataset(...)``."""
    if script_args.dataset_name == BUILTIN:
        from .defaults import build_corpus

        return build_corpus(seed=seed)
    from datasets import load_dataset

    return load_dataset(
        script_args.dataset_name, script_args.dataset_config, streaming=getattr(script_args, "dataset_streaming", False)
    )


def tokenize_for_lm(dataset, tokenizer, script_args: Any, training_args: Any):
    """Tokenize ``text_column`` to ``input_ids`` (bos + text + eos, cut at ``max_length``); every other column
    (domain, weights) is kept, so the weighting columns travel with their rows."""
    text_column, max_length = script_args.text_column, script_args.max_length
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [(bos + x + eos)[:max_length] for x in ids]}

    kwargs = {"batched": True, "remove_columns": [text_column]}
    if hasattr(dataset, "num_rows"):  # map-style: cache and show progress
        kwargs["desc"] = "Tokenizing"
    with training_args.main_process_first(desc="tokenizing"):
        return dataset.map(tokenize, **kwargs)


def per_domain_eval_sets(dataset, domain_column: str, max_rows: int | None) -> dict:
    """``{domain: rows of that domain}`` (at most ``max_rows`` each), for per-domain held-out losses."""
    if domain_column not in dataset.column_names:
        return {"all": dataset if max_rows is None else dataset.select(range(min(max_rows, len(dataset))))}
    domains = dataset[domain_column]
    out = {}
    for domain in sorted(set(domains), key=str):
        rows = [i for i, d in enumerate(domains) if d == domain]
        out[str(domain)] = dataset.select(rows[:max_rows] if max_rows else rows)
    return out


def final_summary(trainer, eval_sets: dict, stage: str) -> dict:
    """Held-out loss per domain, the weighting used, and where the model, logs and plot are."""
    heldout = {}
    for domain, dataset in eval_sets.items():
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=f"heldout_{domain}")
        heldout[domain] = metrics[f"heldout_{domain}_loss"]
    output_dir = trainer.args.output_dir
    plot = os.path.join(output_dir, "weighting.png")
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    log_path = os.path.join(output_dir, "trainer_log_history.json")
    if trainer.is_world_process_zero():
        with open(log_path, "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
    return {
        "stage": stage,
        "weighting": trainer.args.weighting_summary() or "off",
        "steps": trainer.state.global_step,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "heldout_loss": heldout,
        "model_dir": os.path.abspath(output_dir),
        "plot": os.path.abspath(plot) if os.path.exists(plot) else None,
        "log_history": os.path.abspath(log_path),
    }


def _describe(weighting) -> str:
    if not isinstance(weighting, dict):
        return str(weighting)
    parts = [f"{k}={weighting[k]}" for k in ("token_weighting", "sample_weighting", "mixture", "reward_weighting") if k in weighting]
    return ", ".join(parts) or "off"


def print_summary(summaries: list[dict]) -> None:
    """A short table per stage: weighting, held-out losses, where the files are."""
    print("\n" + "=" * 100)
    print(f"{'stage':<10} {'steps':>6}  {'weighting':<40} held-out loss by domain")
    print("-" * 100)
    for s in summaries:
        losses = ", ".join(f"{d} {v:.3f}" for d, v in s.get("heldout_loss", {}).items())
        print(f"{s['stage']:<10} {s['steps']:>6}  {_describe(s['weighting']):<40} {losses}")
    print("-" * 100)
    for s in summaries:
        print(f"[{s['stage']}] model: {s['model_dir']}")
        print(f"[{s['stage']}] logs:  {s['log_history']}")
        print(f"[{s['stage']}] plot:  {s['plot']}")
    print("=" * 100)
