"""``WeightedSFTTrainer`` / ``WeightedSFTConfig``: TRL's SFT trainer with the weighting pipeline.

What this file adds to the shared mixin is only what SFT needs: the weight and domain columns must survive TRL's
dataset preparation (tokenization, chat templates, completion/assistant-only labels, truncation and packing).

TRL's preparation truncates only ``input_ids``/``labels`` and, when packing, keeps only those two columns. When the
training data carries weighting columns, this trainer therefore runs TRL's preparation without truncation and
packing, then applies the same truncation, filtering, shuffling and packing itself to the weighting columns too:

- per-token columns (``token_weights``, ``ref_logps``) are cut exactly like ``input_ids``;
- with packing, per-sample scalars (``sample_weight``, the domain index) are first expanded to one value per token,
  so TRL's ``pack_dataset`` moves them with their tokens and each packed sample keeps its own weight and domain
  (the loss identifies the samples of a packed row from ``position_ids``, see :func:`hfweight.loss.sample_segments`).

Without weighting columns the parent's preparation runs unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from trl import SFTConfig, SFTTrainer
from trl.data_utils import pack_dataset

from .columns import discover_domains
from .config import (
    REF_LOGPS_COLUMN,
    SAMPLE_WEIGHT_COLUMN,
    TOKEN_WEIGHTS_COLUMN,
    WeightingArguments,
    as_weighted_config,
)
from .glue import WeightingMixin
from .glue.data import check_declared_domains, is_map_dataset

TOKEN_COLUMNS = (TOKEN_WEIGHTS_COLUMN, REF_LOGPS_COLUMN)


@dataclass
class WeightedSFTConfig(WeightingArguments, SFTConfig):
    """``trl.SFTConfig`` plus the weighting fields of :class:`hfweight.WeightingArguments`."""

    def __post_init__(self):
        super().__post_init__()
        if self.reward_weighting is not None:
            raise ValueError("`reward_weighting` applies to GRPO/RLOO only; use WeightedGRPOConfig or WeightedRLOOConfig.")


class WeightedSFTTrainer(WeightingMixin, SFTTrainer):
    """Drop-in for ``trl.SFTTrainer``. With every weighting field off it is exactly the parent."""

    def __init__(self, model=None, args: WeightedSFTConfig | None = None, *posargs, reference_model=None, **kwargs):
        # Whatever the parent takes (None, a TrainingArguments, a plain SFTConfig) becomes a WeightedSFTConfig with
        # weighting off, built as the parent builds its own.
        args = as_weighted_config(WeightedSFTConfig, args, model, SFTConfig, "SFT")
        train_dataset = kwargs.get("train_dataset")
        self._weighting_args = args
        # Domains are discovered on the raw data, before packing merges rows; preparation maps them to indices.
        self._preset_domains = None
        if args.weighting_enabled and is_map_dataset(train_dataset):
            if args.domain_column in train_dataset.column_names:
                self._preset_domains = discover_domains(train_dataset, args.domain_column)
        super().__init__(model, args, *posargs, **kwargs)
        self._setup_weighting(reference_model)

    # ---- TRL's training metrics, from the weighted loss's own forward --------------------------------------------------

    def _log_forward_metrics(self, inputs: dict, fused_outputs) -> None:
        """Log what ``SFTTrainer.compute_loss`` logs from its forward — ``entropy`` and ``mean_token_accuracy`` over the
        valid label tokens of all ranks, and the running ``num_tokens`` — since the weighted loss replaces that
        forward. They come from the same fused LM head, which the SFT path uses on every device (TRL 1.16: per-position
        entropy and top-1 flag, computed tile by tile — at most 4096 positions × 32768 vocabulary entries at a time —
        instead of from a ``(batch, seq, vocab)`` logits tensor) and are reduced the same way, so with weighting on
        they are TRL's numbers for the same model and batch."""
        if fused_outputs is None:  # only without an LM head TRL can drive, where SFTTrainer itself cannot train
            return
        metrics = self._metrics["train" if self.model.training else "eval"]
        gather = self.accelerator.gather_for_metrics
        valid = gather(fused_outputs.label_mask.sum()).sum()
        entropy = gather(fused_outputs.entropy.detach().sum()).sum()
        correct = gather(fused_outputs.is_top1.sum()).sum()
        metrics["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if self.model.training:
            if "attention_mask" in inputs:
                seen = gather(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:  # padding-free batches: one row of packed positions
                positions = inputs["position_ids"]
                seen = gather(torch.tensor(positions.size(1), device=positions.device)).sum().item()
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in the batch to count the tokens seen.")
            self._total_train_tokens += seen // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]

    # ---- dataset preparation that carries the weighting columns ------------------------------------------------------

    def _weighting_columns_in(self, dataset) -> list[str]:
        args = self._weighting_args
        if args is None or not args.weighting_enabled:
            return []
        names = [SAMPLE_WEIGHT_COLUMN, TOKEN_WEIGHTS_COLUMN, REF_LOGPS_COLUMN, args.domain_column]
        columns = getattr(dataset, "column_names", None) or []
        return [name for name in names if name in columns]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        carried = self._weighting_columns_in(dataset)
        if not carried:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        domain_column = args.domain_column
        if domain_column in carried and self._preset_domains is not None:
            index = {value: i for i, value in enumerate(self._preset_domains[0])}

            def to_index(example):
                try:
                    return {domain_column: index[example[domain_column]]}
                except KeyError:
                    raise ValueError(
                        f"{dataset_name} dataset: domain {example[domain_column]!r} is not one of the training "
                        f"domains {list(index)}."
                    ) from None

            dataset = dataset.map(to_index)
        # TRL's preparation without the steps that would drop or misalign our columns.
        plain = copy.copy(args)
        plain.max_length, plain.shuffle_dataset = None, False
        dataset = super()._prepare_dataset(dataset, processing_class, plain, False, formatting_func, dataset_name)
        token_columns = [c for c in carried if c in TOKEN_COLUMNS]
        if args.max_length is not None and not packing:
            dataset = truncate_with_columns(dataset, args.max_length, args.truncation_mode, token_columns)
            dataset = dataset.filter(lambda example: any(label != -100 for label in example["labels"]))
        if packing:
            if args.max_length is None:
                raise ValueError("When packing is enabled, `max_length` can't be `None`.")
            scalar_columns = [c for c in carried if c not in TOKEN_COLUMNS]
            dataset = dataset.map(expand_to_tokens, fn_kwargs={"columns": scalar_columns})
            dataset = dataset.select_columns(["input_ids", "labels", *carried])
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = pack_dataset(dataset, args.max_length, args.packing_strategy)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _build_column_spec(self):
        spec = super()._build_column_spec()
        spec.sample_weight_per_token = bool(self.args.packing)  # expand_to_tokens gave each token its sample's weight
        return spec

    def _setup_domains(self) -> None:
        if self._preset_domains is not None:
            values, sizes = self._preset_domains
            check_declared_domains(self.args, values, f"the training dataset's column {self.args.domain_column!r}")
            self._domain_values = list(range(len(values)))  # preparation turned domains into their indices
            self._setup_domains_from(values, sizes)
        else:
            super()._setup_domains()


def truncate_with_columns(dataset, max_length: int, mode: str, token_columns: list[str]):
    """Cut ``input_ids``, ``labels`` and every per-token weighting column to ``max_length`` the way TRL does."""
    if mode == "keep_start":
        piece = slice(None, max_length)
    elif mode == "keep_end":
        piece = slice(-max_length, None)
    else:
        raise ValueError(f"Unsupported truncation mode: {mode}, expected 'keep_start' or 'keep_end'")
    columns = ["input_ids", "labels", *token_columns]
    return dataset.map(lambda example: {c: example[c][piece] for c in columns})


def expand_to_tokens(example: dict, columns: list[str]) -> dict:
    """Repeat each per-sample scalar once per token, so packing moves it with the sample's tokens."""
    length = len(example["input_ids"])
    return {c: [example[c]] * length for c in columns}
