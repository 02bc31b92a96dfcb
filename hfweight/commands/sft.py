"""Weighted SFT: argument parsing, model and data loading, and the trainer. No weighting logic here.

    hfweight sft --config tiny/sft_dft --max_steps 50
    hfweight sft --config real/sft_qwen2.5-0.5b_dft_zero3 --accelerate_config zero3

`model_name_or_path` may be `builtin:tiny` (random init), a directory written by `hfweight pretrain`, or a hub id.
`dataset_name: builtin` uses the embedded conversational prompt-completion pairs (domains arithmetic, code,
redundant); anything else goes to `datasets.load_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config

from .. import WeightedSFTConfig, WeightedSFTTrainer
from ..entrypoints import (
    BUILTIN,
    final_summary,
    load_causal_lm,
    load_hub_dataset,
    per_domain_eval_sets,
    train_and_summarize,
)
from ..state import resolve_resume_checkpoint


@dataclass
class SFTScriptArguments:
    """Where the data comes from (the model comes from TRL's `ModelConfig.model_name_or_path`)."""

    dataset_name: str = field(default=BUILTIN, metadata={"help": "'builtin' or a hub dataset id / local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(default="test", metadata={"help": "Held-out split (None to skip)."})
    builtin_rows: int = field(default=2000, metadata={"help": "Rows of the built-in SFT data (1 in 20 held out)."})
    builtin_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the built-in tokenizer."})
    reference_model_path: str | None = field(
        default=None, metadata={"help": "Alias of `reference_model`, kept for parity with TRL's scripts."}
    )
    max_eval_samples_per_domain: int | None = field(default=100, metadata={"help": "Held-out rows per domain."})


def load_sft_data(script_args: SFTScriptArguments, seed: int):
    if script_args.dataset_name == BUILTIN:
        from ..builtin import sft_dataset

        return sft_dataset(seed=seed, n=script_args.builtin_rows).train_test_split(test_size=0.05, seed=seed)
    return load_hub_dataset(script_args.dataset_name, script_args.dataset_config)


DATACLASSES = (SFTScriptArguments, WeightedSFTConfig, ModelConfig)
"""What the recipe YAML and the command line fill, in the order ``main`` takes them."""


def main(script_args: SFTScriptArguments, training_args: WeightedSFTConfig, model_args: ModelConfig) -> dict:
    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if script_args.reference_model_path and training_args.reference_model is None:
        training_args.reference_model = script_args.reference_model_path
    model, tokenizer = load_causal_lm(
        model_args.model_name_or_path or "builtin:tiny", vocab_size=script_args.builtin_vocab_size, seed=training_args.seed
    )
    data = load_sft_data(script_args, training_args.seed)
    trainer = WeightedSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data[script_args.dataset_train_split],
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    eval_sets = {}
    if script_args.dataset_eval_split and script_args.dataset_eval_split in data:
        eval_sets = per_domain_eval_sets(
            data[script_args.dataset_eval_split], training_args.domain_column, script_args.max_eval_samples_per_domain
        )
    return train_and_summarize(trainer, checkpoint, lambda trained: final_summary(trained, eval_sets, stage="sft"))
