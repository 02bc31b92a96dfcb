"""Weighted causal-LM pretraining: argument parsing, model and data loading, and the trainer. No weighting logic here.

    hfweight pretrain --config tiny/pretrain_domain_weights
    hfweight pretrain --config tiny/pretrain --accelerate_config ddp_cpu --num_processes 2

`model_name_or_path: builtin:tiny` (or `builtin:small`) builds the embedded Llama and tokenizer; `dataset_name: builtin`
uses the embedded multi-domain corpus. Anything else is a hub id or a local path, loaded with `from_pretrained` /
`load_dataset` (those are the real-model recipes; they need the network or a local copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DataCollatorForLanguageModeling

from .. import WeightedTrainer, WeightedTrainingArguments
from ..entrypoints import (
    BUILTIN,
    final_summary,
    load_causal_lm,
    pretrain_data,
    train_and_summarize,
)
from ..state import resolve_resume_checkpoint


@dataclass
class PretrainScriptArguments:
    """Where the model and data come from."""

    model_name_or_path: str = field(
        default="builtin:tiny",
        metadata={"help": "'builtin:tiny', 'builtin:small' (embedded Llama, random init) or a hub id / local path."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer, if not the model's. Built in with a builtin model."}
    )
    builtin_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the built-in BPE tokenizer."})
    dataset_name: str = field(default=BUILTIN, metadata={"help": "'builtin' or a hub dataset id / local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(
        default="heldout", metadata={"help": "Held-out split evaluated per domain at the end (None to skip)."}
    )
    dataset_streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training data (IterableDataset; the built-in corpus too). With a mixture in resample "
            "mode, list the domains in mixture_kwargs['domains']."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text."})
    max_length: int = field(default=256, metadata={"help": "Tokens per training sequence (longer texts are cut)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples_per_domain: int | None = field(
        default=200, metadata={"help": "Held-out rows evaluated per domain at the end."}
    )


DATACLASSES = (PretrainScriptArguments, WeightedTrainingArguments)
"""What the recipe YAML and the command line fill, in the order ``main`` takes them."""


def main(script_args: PretrainScriptArguments, training_args: WeightedTrainingArguments) -> dict:
    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    model, tokenizer = load_causal_lm(
        script_args.model_name_or_path,
        script_args.tokenizer_name_or_path,
        vocab_size=script_args.builtin_vocab_size,
        seed=training_args.seed,
    )
    train, eval_sets = pretrain_data(script_args, training_args, tokenizer)
    trainer = WeightedTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        # Per-domain held-out sets: what aioli/skillit evaluate and where dga finds its target set.
        eval_dataset=eval_sets or None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    return train_and_summarize(trainer, checkpoint, lambda trained: final_summary(trained, eval_sets, stage="pretrain"))
