"""Helpers of the entry points behind the ``hfweight`` command (``hfweight/commands/``; no weighting logic here):
model and data loading (the built-in pieces of :mod:`hfweight.builtin`, hub ids, local stand-ins), reward-function
resolution, the end-of-run summaries and the shared body of the GRPO/RLOO commands. Recipes (YAML) are parsed by TRL's
``TrlParser`` (:mod:`hfweight.cli`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BUILTIN = "builtin"
BUILTIN_PREFIX = "builtin:"
STANDINS_ENV = "HFWEIGHT_STANDINS"


def standin(name: str | None, config: str | None = None) -> tuple[str | None, str | None]:
    """``(name, config)`` to load for a hub model or dataset id, after the stand-in map.

    ``$HFWEIGHT_STANDINS`` may name a JSON file ``{hub id: local path}`` (a dataset key may also be ``"id:config"``,
    which wins over the bare id); a mapped dataset loses its hub config, a local folder has none. It is how a real
    recipe is rehearsed on small local stand-ins of the same architecture and format (``tests/standins.py``) with its
    entry script and YAML unchanged. Without the variable, which is how the real recipes run, names pass unchanged.
    """
    path = os.environ.get(STANDINS_ENV)
    if not path or name is None:
        return name, config
    with open(path) as f:
        mapping = json.load(f)
    for key in (f"{name}:{config}", name):
        if key in mapping:
            return mapping[key], None
    return name, config


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (what
    ``hfweight.reference.score_dataset`` writes), which ``load_dataset`` refuses."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json")
    )


def load_saved_dataset(path: str, config: str | None = None, streaming: bool = False):
    """A ``save_to_disk`` directory as ``load_dataset`` would give a data folder: a ``DatasetDict`` (a single saved
    ``Dataset`` becomes its ``train`` split, ``load_dataset``'s name for a folder's only split); with ``streaming``,
    an ``IterableDatasetDict`` of the same rows."""
    from datasets import Dataset, DatasetDict, IterableDatasetDict, load_from_disk

    if config is not None:
        raise ValueError(
            f"dataset {path!r} is a `save_to_disk` directory, which has no configurations; drop "
            f"`dataset_config={config!r}`."
        )
    saved = load_from_disk(path)
    splits = DatasetDict({"train": saved}) if isinstance(saved, Dataset) else saved
    if streaming:
        return IterableDatasetDict({name: split.to_iterable_dataset() for name, split in splits.items()})
    return splits


def load_hub_dataset(name: str, config: str | None = None, streaming: bool = False):
    """``datasets.load_dataset(name, config)`` after the stand-in map (:func:`standin`); a ``save_to_disk``
    directory (e.g. ``score_reference``'s output with ``ref_logps``) is opened with ``load_from_disk`` instead
    (:func:`load_saved_dataset`)."""
    from datasets import load_dataset

    name, config = standin(name, config)
    if is_saved_dataset(name):
        return load_saved_dataset(name, config, streaming)
    return load_dataset(name, config, streaming=streaming)


def load_causal_lm(name_or_path: str, tokenizer_name_or_path: str | None = None, vocab_size: int = 2048, seed: int = 0):
    """``(model, tokenizer)``: the embedded tiny Llama for ``builtin:<size>``, else ``from_pretrained`` (after the
    stand-in map, :func:`standin`)."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        from .builtin import build_corpus, build_model, build_tokenizer

        tokenizer = build_tokenizer(build_corpus(seed=seed), vocab_size=vocab_size)
        return build_model(tokenizer, size=name_or_path[len(BUILTIN_PREFIX) :], seed=seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name_or_path = standin(name_or_path)[0]
    tokenizer_name_or_path = standin(tokenizer_name_or_path)[0]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(name_or_path), tokenizer


def load_text_dataset(script_args: Any, seed: int = 0):
    """The embedded corpus (``DatasetDict`` with ``train``/``heldout``) or ``datasets.load_dataset(...)``."""
    if script_args.dataset_name == BUILTIN:
        from .builtin import build_corpus

        return build_corpus(seed=seed)
    return load_hub_dataset(
        script_args.dataset_name, script_args.dataset_config, streaming=getattr(script_args, "dataset_streaming", False)
    )


def tokenize_for_lm(dataset, tokenizer, script_args: Any, training_args: Any):
    """Tokenize ``text_column`` to ``input_ids`` (bos + text + eos, cut at ``max_length``); every other column
    (domain, weights) is kept, so the weighting columns travel with their rows.

    An already tokenized dataset (it has ``input_ids``, e.g. ``score_reference``'s output with ``ref_logps``
    aligned to them) is used as it is: re-tokenizing would need a text column it no longer has, and cutting its rows
    would cut them out of line with their per-token columns."""
    text_column, max_length = script_args.text_column, script_args.max_length
    columns = dataset.column_names  # None for some streams: then the rows are assumed to hold the text column
    if columns is not None and "input_ids" in columns:
        return dataset
    if columns is not None and text_column not in columns:
        raise ValueError(
            f"The training data has no text column {text_column!r} (columns: {columns}) and no `input_ids`. Set "
            "`text_column` to the column holding the raw text, or give an already tokenized dataset."
        )
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


def first_rows(dataset, max_rows: int | None):
    """At most ``max_rows`` rows of ``dataset``: ``select`` for a map-style dataset, ``take`` for a stream."""
    if max_rows is None:
        return dataset
    if hasattr(dataset, "num_rows"):
        return dataset.select(range(min(max_rows, len(dataset))))
    return dataset.take(max_rows)


def pretrain_data(script_args: Any, training_args: Any, tokenizer) -> tuple[Any, dict]:
    """The pretraining entry point's data: ``(train, eval_sets)``, the tokenized training rows (at most
    ``max_train_samples``, streamed or not) and the per-domain held-out sets (empty without an eval split).

    ``dataset_name`` is ``builtin``, a hub id, a local data folder, or a ``save_to_disk`` directory (such as
    ``score_reference``'s output: already tokenized, with ``ref_logps``, used as it is)."""
    raw = load_text_dataset(script_args, seed=training_args.seed)
    if script_args.dataset_train_split not in raw:
        raise ValueError(
            f"dataset {script_args.dataset_name!r} has no split {script_args.dataset_train_split!r} (splits: "
            f"{list(raw)}); set `dataset_train_split`."
        )
    train_raw = raw[script_args.dataset_train_split]
    if script_args.dataset_streaming and script_args.dataset_name == BUILTIN:
        train_raw = train_raw.to_iterable_dataset()  # the built-in corpus as a stream (the held-out split stays)
    train_raw = first_rows(train_raw, script_args.max_train_samples)  # before tokenizing: rows map 1:1
    train = tokenize_for_lm(train_raw, tokenizer, script_args, training_args)
    eval_sets = {}
    if script_args.dataset_eval_split and script_args.dataset_eval_split in raw:
        heldout = tokenize_for_lm(raw[script_args.dataset_eval_split], tokenizer, script_args, training_args)
        eval_sets = per_domain_eval_sets(heldout, training_args.domain_column, script_args.max_eval_samples_per_domain)
    return train, eval_sets


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


def train_and_summarize(trainer, checkpoint: str | None, summarize: Callable[[Any], dict]) -> dict:
    """The end of every entry point: train (resuming from ``checkpoint``), save the model to ``output_dir``, then
    ``summarize(trainer)``; the main process writes that summary to ``<output_dir>/run_summary.json`` and prints its
    table (:func:`print_summary`). Returns the summary."""
    output_dir = trainer.args.output_dir
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(output_dir)
    summary = summarize(trainer)
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "run_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print_summary([summary])
    return summary


def _describe(weighting) -> str:
    if not isinstance(weighting, dict):
        return str(weighting)
    parts = [f"{k}={weighting[k]}" for k in ("token_weighting", "sample_weighting", "mixture", "reward_weighting") if k in weighting]
    return ", ".join(parts) or "off"


def print_summary(summaries: list[dict]) -> None:
    """A short table per stage: weighting, held-out losses, where the files are."""
    print("\n" + "=" * 100)
    print(f"{'stage':<10} {'steps':>6}  {'weighting':<40} held-out loss by domain / mean reward by function")
    print("-" * 100)
    for s in summaries:
        if "heldout_reward" in s:
            results = "reward: " + ", ".join(f"{d} {v:.3f}" for d, v in s["heldout_reward"].items())
        else:
            results = "loss: " + ", ".join(f"{d} {v:.3f}" for d, v in s.get("heldout_loss", {}).items())
        print(f"{s['stage']:<10} {s['steps']:>6}  {_describe(s['weighting']):<40} {results}")
    print("-" * 100)
    for s in summaries:
        print(f"[{s['stage']}] model: {s['model_dir']}")
        print(f"[{s['stage']}] logs:  {s['log_history']}")
        print(f"[{s['stage']}] plot:  {s['plot']}")
    print("=" * 100)


# ---- GRPO / RLOO ---------------------------------------------------------------------------------------------------


@dataclass
class RLScriptArguments:
    """Where the prompts come from and how completions are scored (the model comes from `ModelConfig`)."""

    dataset_name: str = field(default=BUILTIN, metadata={"help": "'builtin' or a hub dataset id / local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(
        default="test", metadata={"help": "Held-out prompts (validation for hypervolume/Nelder–Mead, final rewards)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correctness", "brevity", "format"],
        metadata={
            "help": "Reward functions, in order: built-in names (correctness, brevity, format), functions of "
            "trl.rewards (e.g. accuracy_reward), or import paths 'package.module:function'."
        },
    )
    builtin_rows: int = field(default=1000, metadata={"help": "Prompts of the built-in task (1 in 10 held out)."})
    builtin_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the built-in tokenizer."})
    max_eval_samples_per_domain: int | None = field(default=32, metadata={"help": "Held-out prompts per domain."})
    max_length: int | None = field(
        default=None, metadata={"help": "Accepted for pipeline-wide flags; GRPO lengths are max_completion_length."}
    )

BUILTIN_REWARDS = {
    "correctness": "hfweight.builtin.tasks:correctness_reward",
    "brevity": "hfweight.builtin.tasks:brevity_reward",
    "format": "hfweight.builtin.tasks:format_reward",
}


def resolve_reward_functions(names: list[str]) -> list:
    """Reward functions from names: a built-in (``correctness``, ``brevity``, ``format``), a function of
    ``trl.rewards`` (e.g. ``accuracy_reward``), or an import path ``package.module:function``."""
    import importlib

    import trl.rewards

    if not names:
        raise ValueError("`reward_funcs` is empty: name at least one reward function.")
    functions = []
    for name in names:
        path = BUILTIN_REWARDS.get(name)
        if path is None and hasattr(trl.rewards, name):
            functions.append(getattr(trl.rewards, name))
            continue
        path = path or name
        module_name, _, attribute = path.partition(":")
        if not attribute:
            raise ValueError(
                f"reward function {name!r}: not a built-in ({sorted(BUILTIN_REWARDS)}), not in trl.rewards, and not an "
                "import path of the form 'package.module:function'."
            )
        try:
            functions.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward function {name!r} could not be imported: {err}") from err
    return functions


def load_prompt_data(script_args: Any, seed: int):
    """``DatasetDict`` with train and held-out prompt splits: the built-in arithmetic prompts or a hub dataset."""
    if script_args.dataset_name == BUILTIN:
        from .builtin import grpo_dataset

        return grpo_dataset(seed=seed, n=script_args.builtin_rows).train_test_split(test_size=0.1, seed=seed)
    return load_hub_dataset(script_args.dataset_name, script_args.dataset_config)


def heldout_prompts(dataset, domain_column: str, max_per_domain: int | None):
    """At most ``max_per_domain`` held-out prompts of each domain (all of them without a domain column)."""
    from datasets import concatenate_datasets

    sets = per_domain_eval_sets(dataset, domain_column, max_per_domain)
    return concatenate_datasets(list(sets.values()))


def rl_summary(trainer, eval_dataset, stage: str) -> dict:
    """Held-out reward means per reward function, the weighting used, and where the model, logs and plot are."""
    heldout = {}
    if eval_dataset is not None:
        metrics = trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix="heldout")
        for name in trainer.reward_func_names:
            key = f"heldout_rewards/{name}/mean"
            key = key if key in metrics else f"eval_rewards/{name}/mean"
            if key in metrics:
                heldout[name] = metrics[key]
    summary = final_summary(trainer, {}, stage)
    summary.pop("heldout_loss")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h and "loss" in h]
    summary.update(final_train_reward=rewards[-1] if rewards else None, heldout_reward=heldout)
    return summary


def run_rl(trainer_cls, script_args: Any, training_args: Any, model_args: Any, stage: str) -> dict:
    """Shared body of ``hfweight grpo`` and ``hfweight rloo`` (:mod:`hfweight.commands.grpo`, ``.rloo``)."""
    from trl import get_peft_config

    from .state import resolve_resume_checkpoint

    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    rewards = resolve_reward_functions(script_args.reward_funcs)
    model, tokenizer = load_causal_lm(
        model_args.model_name_or_path or "builtin:tiny", vocab_size=script_args.builtin_vocab_size, seed=training_args.seed
    )
    data = load_prompt_data(script_args, training_args.seed)
    eval_dataset = None
    if script_args.dataset_eval_split and script_args.dataset_eval_split in data:
        eval_dataset = heldout_prompts(
            data[script_args.dataset_eval_split], training_args.domain_column, script_args.max_eval_samples_per_domain
        )
    trainer = trainer_cls(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=data[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    return train_and_summarize(trainer, checkpoint, lambda trained: rl_summary(trained, eval_dataset, stage))
