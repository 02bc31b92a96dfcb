"""``hfweight search-mixture`` (also ``python -m hfweight.search``): the mixture search from a recipe.

    python -m hfweight.search --config recipes/tiny/search_mixture.yaml
    python -m hfweight.search --config recipe.yaml --n_trials 64 --storage study.journal --study NAME \\
        --output mixture_weights.json
    python -m hfweight.search --config recipe.yaml --storage postgresql://... --study NAME --worker   # on any machine
    python -m hfweight.search --config recipe.yaml --storage ... --study NAME --import results.csv

The recipe holds one proxy run (the model, data and ``WeightedTrainingArguments`` fields of a pretraining recipe:
``trainers/pretrain.py``'s) plus the search's fields (:class:`SearchScriptArguments`). Without ``--worker`` the
command creates or resumes the study, enqueues the proposals, trains proxies until none is left (other workers may
help), fits and writes ``--output`` (default ``<output_dir>/mixture_weights.json``) and its report. With ``--worker``
it only trains proxies of an existing study. Train the final model with ``mixture: static`` and
``mixture_kwargs: {weights: <output>}``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

BUILTIN = "builtin"
BUILTIN_PREFIX = "builtin:"


@dataclass
class SearchScriptArguments:
    """Where the proxy model and data come from, and the search's settings."""

    model_name_or_path: str = field(default="builtin:tiny", metadata={
        "help": "'builtin:tiny', 'builtin:small' (embedded Llama, random init) or a hub id / local path (the proxy)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    builtin_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the built-in BPE tokenizer."})
    dataset_name: str = field(default=BUILTIN, metadata={"help": "'builtin' or a hub dataset id / local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str = field(default="heldout", metadata={"help": "Held-out split, evaluated per domain."})
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text."})
    max_length: int = field(default=256, metadata={"help": "Tokens per training sequence (longer texts are cut)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples_per_domain: int | None = field(default=200, metadata={"help": "Held-out rows per domain."})
    n_trials: int = field(default=32, metadata={"help": "Proxies (proposals) in the study; ≥ domains + 1."})
    target: list[str] | None = field(default=None, metadata={
        "help": "Domains (held-out sets) whose mean loss to minimize; default all."})
    storage: str | None = field(default=None, metadata={
        "help": "None (in memory), a journal file path (processes on one machine / shared FS) or a database URL."})
    study: str = field(default="mixture_search", metadata={"help": "Optuna study name (rerun to resume)."})
    output: str | None = field(default=None, metadata={
        "help": "Weights JSON to write (default <output_dir>/mixture_weights.json); the report goes beside it."})
    search_seed: int = field(default=0, metadata={"help": "Seed of the proposals, folds and simulated mixtures."})
    final_tokens: float | None = field(default=None, metadata={
        "help": "The final run's token budget, for the repetition caps (default 10 × one proxy's)."})
    max_repetition: float = field(default=4.0, metadata={"help": "Most epochs of a domain the final run may read."})
    top_k: int = field(default=128, metadata={"help": "Simulated mixtures averaged (RegMix)."})
    n_candidates: int = field(default=100_000, metadata={"help": "Simulated mixtures scored (RegMix)."})
    kl_weight: float = field(default=0.01, metadata={"help": "Weight of KL(mixture ‖ prior) in the choice."})
    worker: bool = field(default=False, metadata={"help": "Only train proxies of an existing study (no fit)."})
    enqueue_only: bool = field(default=False, metadata={"help": "Only create the study and enqueue the proposals."})
    import_results: str | None = field(default=None, metadata={
        "help": "(--import) CSV of proxies trained elsewhere: one share column per domain, one loss per target."})
    heartbeat_interval: int = field(default=30, metadata={"help": "Seconds between a running trial's heartbeats."})
    grace_period: int = field(default=120, metadata={"help": "Seconds without heartbeat before a trial is retried."})
    max_retry: int = field(default=3, metadata={"help": "Retries of a trial whose worker died."})


def recipe_dataclasses():
    """The dataclasses a search recipe fills (also how tests/test_recipes.py validates one)."""
    from ..config import WeightedTrainingArguments

    return (SearchScriptArguments, WeightedTrainingArguments)


def build_inputs(script: SearchScriptArguments, training_args) -> dict:
    """``model_init``, the tokenized train set, the per-domain held-out sets and the collator of a recipe."""
    from transformers import DataCollatorForLanguageModeling

    from ..entrypoints import load_causal_lm, load_text_dataset, per_domain_eval_sets, tokenize_for_lm

    def model_init():
        return load_causal_lm(script.model_name_or_path, script.tokenizer_name_or_path,
                              vocab_size=script.builtin_vocab_size, seed=training_args.seed)[0]

    model, tokenizer = load_causal_lm(script.model_name_or_path, script.tokenizer_name_or_path,
                                      vocab_size=script.builtin_vocab_size, seed=training_args.seed)
    del model
    raw = load_text_dataset(script, seed=training_args.seed)
    for split in (script.dataset_train_split, script.dataset_eval_split):
        if split not in raw:
            raise ValueError(f"dataset {script.dataset_name!r} has no split {split!r}; its splits are {list(raw)}.")
    train_raw = raw[script.dataset_train_split]
    if script.max_train_samples is not None:
        train_raw = train_raw.select(range(min(script.max_train_samples, len(train_raw))))
    train = tokenize_for_lm(train_raw, tokenizer, script, training_args)
    heldout = tokenize_for_lm(raw[script.dataset_eval_split], tokenizer, script, training_args)
    eval_sets = per_domain_eval_sets(heldout, training_args.domain_column, script.max_eval_samples_per_domain)
    return {"model_init": model_init, "train_dataset": train, "eval_dataset": eval_sets,
            "data_collator": DataCollatorForLanguageModeling(tokenizer, mlm=False), "processing_class": tokenizer}


def parse(argv: list[str]):
    """``(SearchScriptArguments, WeightedTrainingArguments)`` from ``--config`` and the command line."""
    from trl import TrlParser

    argv = ["--import_results" if a == "--import" else a for a in argv]
    return TrlParser(recipe_dataclasses()).parse_args_and_config(args=argv)


def main(argv: list[str] | None = None) -> int:
    """Run the search (or a worker); returns the process exit code (2 on a bad input, with the reason on stderr)."""
    from .api import run_worker, search_mixture

    script, training_args = parse(list(sys.argv[1:] if argv is None else argv))
    timing = {"heartbeat_interval": script.heartbeat_interval, "grace_period": script.grace_period,
              "max_retry": script.max_retry}
    try:
        inputs = build_inputs(script, training_args)
        if script.worker:
            trained = run_worker(inputs["model_init"], training_args, inputs["train_dataset"], inputs["eval_dataset"],
                                 script.storage, script.study, inputs["data_collator"], inputs["processing_class"],
                                 **timing)
            print(f"worker done: trained {trained} proxies of study {script.study!r}.")
            return 0
        result = search_mixture(
            inputs["model_init"], training_args, inputs["train_dataset"], inputs["eval_dataset"], target=script.target,
            n_trials=script.n_trials, storage=script.storage, seed=script.search_seed,
            data_collator=inputs["data_collator"], processing_class=inputs["processing_class"],
            study_name=script.study, final_tokens=script.final_tokens, max_repetition=script.max_repetition,
            top_k=script.top_k, n_candidates=script.n_candidates, kl_weight=script.kl_weight,
            import_from=script.import_results, run=not script.enqueue_only, **timing,
        )
    except ValueError as err:
        print(f"hfweight search-mixture: error: {err}", file=sys.stderr)
        return 2
    if result is None:
        print(f"study {script.study!r} ready: {script.n_trials} proposals enqueued; start workers with --worker.")
        return 0
    output = script.output or os.path.join(training_args.output_dir, "mixture_weights.json")
    written = result.save(output)
    fit = result.report["fit"]
    print(json.dumps({"weights": {d: round(v, 4) for d, v in result.weights.items()},
                      "fit": fit["chosen"], "out_of_fold_spearman": fit["spearman"],
                      "proxies": len(result.report["proxies"]), "written": written}, indent=1))
    print(f"Train the final model with: mixture: static, mixture_mode: resample, mixture_kwargs: {{weights: {output}}}")
    return 0
