"""The one piece of Trainer glue shared by every Weighted* trainer.

It owns everything a strategy must not know about: which dataset columns to keep and how to collate them, the
optimizer-step denominator of docs/methods.md#normalization (computed once per step over all micro-batches and ranks),
cross-rank reduction of statistics, logging through ``Trainer.log``, and checkpointing of strategy state.

How a training step runs with weighting on:

1. ``get_batch_samples`` (Trainer prefetches the step's micro-batches) → :meth:`_prepare_step`: per micro-batch,
   the sample weights ``v`` and the denominator token weights ``w'`` that are known before the forward pass; their
   sum is all-reduced into the step denominator ``Z``.
2. ``compute_loss`` per micro-batch → per-token log-probs (fused LM head, no full-vocab fp32 logits), loss weights
   ``w``, the local numerator ``Σ v w ℓ``; the returned loss is ``numerator / Z · W`` (``W`` cancels DDP's mean), and
   the Trainer is told not to divide by the accumulation steps again (``loss_is_scaled_for_ga``).
3. On the last micro-batch of the step, per-domain statistics are all-reduced once and handed to the mixture.
4. Loss-based sample weights (``loss``, ``truncation``, ``storm``) come in two exact modes
   (:data:`hfweight.strategies.sample.SAMPLE_MODES`): ``score`` weighs the global batch in step 1 after a no-grad
   scoring forward (:meth:`~WeightingMixin._loss_based_weights`); ``rescale`` (the default) weighs each micro-batch in
   step 2 from its own forward with unnormalized weights (:meth:`~WeightingMixin._rescale_micro_batch`), and after the
   last backward :meth:`~WeightingMixin.training_step` rescales the gradients by the global denominator before
   clipping (:meth:`~WeightingMixin._rescale_gradients`). STORM's meta step runs there too
   (:meth:`~WeightingMixin._storm_meta_step`). ``trainer.last_sample_weights`` holds this rank's weights and losses
   of the last step (``{"losses", "weights"}``, the strategy's weights up to a per-step factor, times the column).

With every weighting switch off, none of this runs: each override calls the parent unchanged (bit-for-bit parity).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from .card import write_weighting_section
from .columns import (
    BATCH_DOMAIN,
    BATCH_PREFIX,
    BATCH_REF_LOGPS,
    BATCH_SAMPLE_WEIGHT,
    BATCH_TOKEN_WEIGHTS,
    ColumnSpec,
    WeightingCollator,
    discover_domains,
    validate_dataset,
)
from .config import REF_LOGPS_COLUMN, SAMPLE_WEIGHT_COLUMN, TOKEN_WEIGHTS_COLUMN
from .loss import (
    chunked_forward_kl,
    enable_fused_log_probs,
    lm_head_of,
    per_sample_values,
    sample_segments,
    shift_token_column,
    shifted_labels,
    token_log_probs,
    token_log_probs_with,
    weighted_denominator,
    weighted_numerator,
)
from .reference import load_reference_model, reference_hidden_states, reference_log_probs
from .state import load_state, resolve_resume_checkpoint, save_state, state_file
from .stats import summarize_weights, weight_extremes, weight_moments
from .strategies.base import DomainStats, SampleContext, TokenContext
from .strategies.sample import lookahead_surrogate, meta_objective, scales_kl_to_uniform

logger = logging.getLogger(__name__)


class _MixtureCallback(TrainerCallback):
    """Step-boundary duties of a mixture controller: total steps, held-out evaluations it asks for."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        mixture = self.trainer.mixture
        if hasattr(mixture, "set_total_steps"):
            mixture.set_total_steps(state.max_steps)
        self.trainer._serve_eval_request()
        self.trainer._push_stream_probabilities()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._serve_eval_request()
        self.trainer._push_stream_probabilities()

class _RunLengthCallback(TrainerCallback):
    """Tells a sample strategy with a ``set_run_length`` hook (loss truncation) how many samples the run will see,
    before the first step: ``max_steps`` × the global batch (per-device batch × GA × data-parallel processes)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * trainer._data_parallel_size()
        trainer.sample_weighting.set_run_length(state.max_steps * global_batch)


# Keys the prepare phase adds to each micro-batch (stripped with the other hfw_* keys before the forward).
BATCH_V = "hfw_v"  # per-sample weights (S,)
BATCH_DEN_W = "hfw_den_w"  # denominator token weights (B, T-1)
BATCH_SEGMENTS = "hfw_segments"  # sample index of each shifted position (B, T-1)
BATCH_SAMPLE_DOMAIN = "hfw_sample_domain"  # domain index per sample (S,)


def _is_mixture_stream(dataset) -> bool:
    from .sampling import MixtureIterableDataset

    return isinstance(dataset, MixtureIterableDataset)


def _is_hf_stream(dataset) -> bool:
    try:
        import datasets

        return isinstance(dataset, datasets.IterableDataset)
    except ImportError:  # pragma: no cover
        return False


def _is_map_dataset(dataset) -> bool:
    try:
        import datasets

        return isinstance(dataset, datasets.Dataset)
    except ImportError:  # pragma: no cover
        return False


def check_labels(batch: dict) -> None:
    """Every weighted loss is a weighted next-token cross-entropy over ``labels``: say so when a batch has none (the
    parent Trainer would explain that the model returned no loss; a bare ``KeyError`` deep in the loss would not)."""
    if "labels" not in batch:
        keys = sorted(k for k in batch if not k.startswith(BATCH_PREFIX))
        raise ValueError(
            f"The weighted loss needs `labels` (next-token targets, -100 where ignored) in every batch; this batch has "
            f"only {keys}. Use a data collator that adds them, e.g. transformers.DataCollatorForLanguageModeling("
            "tokenizer, mlm=False) (labels = input_ids with padding ignored), or add a `labels` column."
        )


def check_declared_domains(args, found: list, source: str) -> None:
    """``mixture_kwargs['domains']`` is read only when the data cannot tell its domains (a ``datasets.IterableDataset``
    or no domain column). Where the domains come from ``source`` instead, a different list is an error (the user's
    list would be silently replaced) and the same list a warning (it has no effect)."""
    declared = (args.mixture_kwargs or {}).get("domains") if args.mixture is not None else None
    if not declared:
        return
    if sorted(map(str, declared)) != sorted(map(str, found)):
        raise ValueError(
            f"mixture_kwargs['domains']={list(declared)} differs from the domains {sorted(map(str, found))} read from "
            f"{source}, which is where this run takes its domains from (the declared list is only read for a "
            "`datasets.IterableDataset` or a dataset without a domain column). Fix the list or drop it."
        )
    logger.warning(
        "hfweight: mixture_kwargs['domains'] has no effect: the domains are read from %s (it is only read for a "
        "`datasets.IterableDataset` or a dataset without a domain column).", source,
    )


class _SamplerAtStep:
    """The domain sampler's state at the last consumed optimizer step (the DataLoader reads ahead of training)."""

    def __init__(self, sampler, state):
        self.sampler, self.state = sampler, state

    def state_dict(self) -> dict:
        return self.sampler.state_dict(batches_consumed=self.state.global_step)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class _StreamAtStep:
    """The streaming mixture's position at the last consumed optimizer step (the loader reads ahead of training)."""

    def __init__(self, stream, state, rows_per_step: int):
        self.stream, self.state, self.rows_per_step = stream, state, rows_per_step

    def state_dict(self) -> dict:
        return self.stream.state_dict(consumed_draws=self.state.global_step * self.rows_per_step)

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class _AlignmentPosition:
    """How many target batches DGA has taken (the next one continues the cycle through the target set)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        return {"calls": self.trainer._alignment_calls}

    def load_state_dict(self, state: dict) -> None:
        self.trainer._alignment_calls = int(state["calls"])


@dataclass
class _StepPlan:
    """What the prepare phase decided for the optimizer step in progress."""

    denominator: torch.Tensor
    """``Z``: the step's denominator summed over all micro-batches and ranks (float64 scalar)."""
    remaining: int
    """Micro-batches of this step not yet through ``compute_loss``."""
    domain_sums: torch.Tensor | None
    """Local ``[loss_sum; token_count; sample_count; excess_sum]`` per domain ``(4, k)``, over the micro-batches."""
    rescale: list | None = None
    """Rescale mode (docs/methods.md#exact-modes): one row per local sample, appended by each micro-batch (see
    ``_RESCALE_ROWS``)."""
    returned: torch.Tensor | float = 0.0
    """Rescale mode: sum of this rank's losses returned to the Trainer so far in this step (for the logged loss)."""
    batches: list | None = None
    """The step's micro-batches, kept for STORM's meta step (its finite-difference forwards)."""
    score: tuple | None = None
    """Score mode: ``(global SampleContext, this rank's offset)`` of the scoring pass."""
    closed: bool = False
    """Set once the step's end-of-step work (rescale, strategy update, meta step) has run."""
    exact_denominator: torch.Tensor | None = None
    """A token weighting whose normalizer needs the forward (``denominator_needs_logps``, e.g. Rho-1): this rank's
    exact share of ``Z``, summed over the micro-batches; ``denominator`` is then the planned estimate, corrected at the
    end of the step (:meth:`WeightingMixin._correct_denominator`)."""


# Columns of the per-sample rows a rescale-mode micro-batch records: its training-forward mean token loss, the
# strategy's unnormalized weight u, the static part of v (column × domain factor; 1 if none), u's share of the step
# denominator, the domain index (−1: none) and the `sample_weight` column (NaN: none).
_RESCALE_ROWS = ("loss", "u", "static", "den", "domain", "column")


def sample_counts(batch: dict) -> torch.Tensor:
    """Valid label tokens of each sample of a micro-batch ``(S,)`` (float64), samples as in :func:`sample_segments`."""
    segments, num_samples = sample_segments(batch)
    mask = (shifted_labels(batch) != -100).to(torch.float64)
    return torch.zeros(num_samples, dtype=torch.float64, device=mask.device).index_add_(0, segments.flatten(), mask.flatten())


class _MetaBatch:
    """STORM's meta batch: the previous optimizer step's micro-batches on this rank (model inputs only) with the
    features its weights were computed from (global, all ranks), so the meta step can run on it and a resumed run has
    it back. Per-rank state (each rank keeps its own micro-batches), saved in each rank's state file."""

    per_rank_state = True  # a checkpoint of it resumes only with the same number of processes

    def __init__(self):
        self.batches: list[dict] | None = None
        self.features: torch.Tensor | None = None  # (N_global, F) standardized features of the batch's samples
        self.valid: torch.Tensor | None = None  # (N_global,) bool: sample has a finite loss (a valid token)
        self.offset = 0  # where this rank's samples start in the global order
        self.count = 0  # this rank's samples

    def keep(self, batches: list[dict], features: torch.Tensor, valid: torch.Tensor, offset: int, count: int) -> None:
        self.batches = [{k: v.detach() for k, v in b.items() if not k.startswith(BATCH_PREFIX)} for b in batches]
        self.features, self.valid = features.detach(), valid.detach().cpu()
        self.offset, self.count = offset, count

    def state_dict(self) -> dict:
        if self.batches is None:
            return {"batches": None}
        return {
            "batches": [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in self.batches],
            "features": self.features.cpu(),
            "valid": self.valid.cpu(),
            "offset": self.offset,
            "count": self.count,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("batches") is None:
            self.batches = None
            return
        self.batches = state["batches"]  # moved to the device when used
        self.features, self.valid = state["features"], state["valid"].to(torch.bool)
        self.offset, self.count = int(state["offset"]), int(state["count"])


class WeightingMixin:
    """Mix in *before* the parent trainer: ``class WeightedTrainer(WeightingMixin, Trainer)``.

    Subclasses call :meth:`_setup_weighting` at the end of ``__init__``.
    """

    fused_min_logits: int | None = None
    """When to use TRL's fused LM head: ``None`` follows :func:`hfweight.loss.use_fused_head` (GPU and large logits,
    or wherever the parent trainer uses it); ``0`` forces it (benchmarks measure it that way)."""

    # ---- setup --------------------------------------------------------------------------------------------------

    def _setup_weighting(self, reference_model=None) -> None:
        """Build the strategies from ``self.args``; ``reference_model`` may be a model object (else the config's)."""
        args = self.args
        self._reference_override = reference_model
        # A reference no strategy reads would never be loaded: a wrong path or model would pass unnoticed. The config
        # checks its own field at construction; this covers the trainer argument and a field set afterwards.
        args.check_unused_reference("reference_model", args.reference_model)
        args.check_unused_reference("reference_model (the trainer argument)", reference_model)
        self.weighting_enabled = args.weighting_enabled
        self._weighting_metrics: dict[str, list[float]] = defaultdict(list)
        self._step_plan: _StepPlan | None = None
        self.token_weighting = self.sample_weighting = self.mixture = None
        self.domain_names: list[str] = []
        if not self.weighting_enabled:
            return
        if args.n_gpu > 1:
            raise ValueError(
                "Weighting does not support `nn.DataParallel` (several GPUs in one process); launch with "
                "`accelerate launch` or `torchrun` for one process per device."
            )
        self.token_weighting = args.build_token_weighting()
        self.sample_weighting = args.build_sample_weighting()
        self.mixture = args.build_mixture()
        self.reference = None
        reference = self._reference_override if self._reference_override is not None else args.reference_model
        needs_reference = any(getattr(s, "needs_reference", False) for s in (self.token_weighting, self.mixture))
        self._needs_reference_model = getattr(self.token_weighting, "needs_reference_model", False)
        if self._needs_reference_model and reference is None:
            # The authors' default (ASFT): the initial model, frozen; for a PEFT model its base with adapters off.
            reference = "base" if hasattr(self.model, "disable_adapter") else copy.deepcopy(self.model)
        if (needs_reference or self._needs_reference_model) and reference is not None:
            self.reference = load_reference_model(reference, self.model, self.processing_class)
            if isinstance(self.reference, torch.nn.Module):
                self.reference = self._place_reference(self.reference)
        self._setup_domains()
        self._setup_sample_mode()
        self._setup_mixture_protocols()
        self._column_spec = self._build_column_spec()
        if _is_map_dataset(self.train_dataset):
            validate_dataset(self.train_dataset, self._column_spec)
        domain_index = {value: i for i, value in enumerate(self._domain_values)}
        self.data_collator = WeightingCollator(self.data_collator, self._column_spec, domain_index)
        self._fused = enable_fused_log_probs(self.model)
        if not self._fused:
            logger.warning(
                "hfweight: the model has no LM head TRL's fused kernel can drive; per-token log-probs come from the "
                "model's logits (memory as in the parent Trainer)."
            )
        # Our loss is already normalized over the whole step: the Trainer must not divide it by GA again.
        self.loss_is_scaled_for_ga = True

    def _setup_domains(self) -> None:
        """Find the domains (sorted) and their sizes in the training data, then bind them."""
        column = self.args.domain_column
        self._domain_values: list = []
        sizes = None
        if _is_map_dataset(self.train_dataset) and column in self.train_dataset.column_names:
            self._domain_values, sizes = discover_domains(self.train_dataset, column)
            check_declared_domains(self.args, self._domain_values, f"the training dataset's column {column!r}")
        elif self.mixture is not None and _is_mixture_stream(self.train_dataset):
            self._domain_values = list(self.train_dataset.domain_names)
            check_declared_domains(self.args, self._domain_values, "the MixtureIterableDataset's streams")
        elif self.mixture is not None:
            declared = (self.args.mixture_kwargs or {}).get("domains")
            if not declared:
                raise ValueError(
                    f"mixture={self.args.mixture!r} needs the training dataset's domain column {column!r}; the dataset "
                    "has no such column. Add it, set `domain_column`, or list the domains in mixture_kwargs['domains']."
                )
            self._domain_values = sorted(declared)
        self._setup_domains_from(self._domain_values, sizes)

    def _setup_domains_from(self, values: list, sizes: torch.Tensor | None) -> None:
        """Name the domains, bind the mixture and compute the natural mixture ``q`` used by upweighting."""
        self.domain_names = [str(v) for v in values]
        if self.mixture is None:
            return
        self.mixture.bind(self.domain_names, sizes)
        if self.args.mixture_mode == "upweight":
            if sizes is None:
                raise ValueError(
                    "mixture_mode='upweight' needs the natural domain mixture q, read from a map-style dataset's "
                    "domain column; for a streaming dataset use mixture_mode='resample'."
                )
            self._natural_mixture = sizes / sizes.sum()

    def _setup_mixture_protocols(self) -> None:
        """Check what the controller needs (held-out sets, a target set) and hook its step-boundary duties."""
        self._domain_sampler = None
        self._mixture_stream = None
        self._alignment_target = None
        self._domain_eval_sets: dict = {}
        if self.mixture is None:
            return
        if getattr(self.mixture, "needs_target", False):
            self._setup_gradient_alignment()
        if getattr(self.mixture, "needs_eval", False):
            self._domain_eval_sets = self._split_eval_by_domain()
            missing = [d for d in self.domain_names if d not in self._domain_eval_sets]
            if len(missing) == len(self.domain_names):
                raise ValueError(
                    f"mixture={self.args.mixture!r} learns from per-domain held-out losses: pass `eval_dataset` as a "
                    "dict {domain: dataset} or a dataset with the domain column."
                )
        if self.args.mixture_mode == "resample":
            if not _is_map_dataset(self.train_dataset):
                self._setup_streaming_mixture()
            if getattr(self.args, "packing", False):
                raise ValueError(
                    "mixture_mode='resample' draws whole rows by domain, but packed rows mix domains; use "
                    "mixture_mode='upweight' with packing."
                )
            # The sampler restores its own position on resume; Trainer must not skip batches on top of it.
            self.args.ignore_data_skip = True
        self.add_callback(_MixtureCallback(self))

    def _split_eval_by_domain(self) -> dict:
        """``{domain name: held-out dataset}`` from a dict ``eval_dataset`` or from its domain column."""
        eval_dataset = self.eval_dataset
        if isinstance(eval_dataset, dict):
            return {str(k): v for k, v in eval_dataset.items() if str(k) in self.domain_names}
        if _is_map_dataset(eval_dataset) and self.args.domain_column in eval_dataset.column_names:
            values = eval_dataset[self.args.domain_column]
            out = {}
            for value, name in zip(self._domain_values, self.domain_names):
                rows = [i for i, v in enumerate(values) if v == value]
                if rows:
                    out[name] = eval_dataset.select(rows)
            return out
        return {}

    def _serve_eval_request(self) -> None:
        """Evaluate every domain's held-out set when the controller asks (Aioli, Skill-it), then feed it back."""
        requested = getattr(self.mixture, "eval_requested", None)
        if requested is None or not requested():
            return
        losses = torch.full((len(self.domain_names),), float("nan"), dtype=torch.float64)
        # evaluate() logs, and the callback handler's on_log/on_evaluate clear the step's pending should_log /
        # should_evaluate / should_save: keep them, or the step's own training log and save would be dropped.
        control = self.control
        pending = (control.should_log, control.should_evaluate, control.should_save)
        for i, name in enumerate(self.domain_names):
            if name in self._domain_eval_sets:
                # transformers.Trainer.evaluate directly: these sets are slices of the already prepared eval_dataset,
                # which TRL's SFTTrainer.evaluate would tokenize (and map domains) a second time.
                metrics = Trainer.evaluate(
                    self, eval_dataset=self._domain_eval_sets[name], metric_key_prefix=f"mixture_eval_{name}"
                )
                losses[i] = metrics[f"mixture_eval_{name}_loss"]
        control.should_log, control.should_evaluate, control.should_save = pending
        self.mixture.observe_eval(losses, self.state.global_step)

    # ---- streaming mixtures (resample mode over an IterableDataset) -----------------------------------------------

    def _setup_streaming_mixture(self) -> None:
        """Resample mode over a stream: interleave per-domain streams with the controller's ``α``.

        ``train_dataset`` may be an :class:`hfweight.sampling.MixtureIterableDataset` (one stream per domain: the
        efficient form, e.g. one hub config or data file per domain) or a ``datasets.IterableDataset`` with the domain
        column, whose domains must be listed in ``mixture_kwargs['domains']``; it is then split into one filtered
        stream per domain (each filter reads the whole stream, so rare domains cost reading). New weights are written
        into the stream at every optimizer-step boundary (``_MixtureCallback``); DataLoader workers see them through
        shared memory. The stream's position is checkpointed at the last consumed step and restored on resume, so
        Trainer does not skip batches on top of it; with ``dataloader_num_workers=0`` the resumed run yields the same
        rows in the same order as an uninterrupted one (see ``MixtureIterableDataset``).
        """
        from .sampling import MixtureIterableDataset

        dataset = self.train_dataset
        column = self.args.domain_column
        if _is_hf_stream(dataset):
            declared = (self.args.mixture_kwargs or {}).get("domains")
            by_name = {str(v): v for v in declared}
            sources = {name: dataset.filter(lambda row, v=value: row[column] == v) for name, value in by_name.items()}
            dataset = MixtureIterableDataset(
                sources, seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed
            )
            self._domain_values = [by_name[n] for n in dataset.domain_names]
            self.train_dataset = dataset
        elif not _is_mixture_stream(dataset):
            raise ValueError(
                "mixture_mode='resample' needs a map-style `datasets.Dataset`, an `hfweight.sampling."
                f"MixtureIterableDataset` or a `datasets.IterableDataset`; got {type(dataset).__name__}. Use "
                "mixture_mode='upweight' for other datasets."
            )
        if dataset.domain_column is None:
            dataset.domain_column = column  # rows carry their domain name: per-domain statistics need it
        if dataset.domain_column != column:
            raise ValueError(
                f"The MixtureIterableDataset labels rows with domain_column={dataset.domain_column!r} but the trainer "
                f"reads `domain_column={column!r}`; use the same name."
            )
        if list(dataset.domain_names) != self.domain_names:
            raise ValueError(f"The stream's domains {dataset.domain_names} differ from the mixture's {self.domain_names}.")
        if getattr(self.args, "packing", False):
            raise ValueError("mixture_mode='resample' over a stream cannot pack rows of several domains; drop packing.")
        # Every process that iterates the stream reads the whole global batch (accelerate dispatches it from rank 0
        # or shards it after reading), so one optimizer step consumes this many draws.
        self._stream_rows_per_step = (
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self._data_parallel_size()
        )
        dataset.track_steps(self._stream_rows_per_step)
        dataset.set_probabilities(self.mixture.probabilities())
        self._mixture_stream = dataset

    def _push_stream_probabilities(self) -> None:
        """At an optimizer-step boundary: hand the controller's current ``α`` to the stream (and its workers)."""
        if getattr(self, "_mixture_stream", None) is not None:
            self._mixture_stream.set_probabilities(self.mixture.probabilities())

    # ---- gradient alignment (DGA) ------------------------------------------------------------------------------------

    def _setup_gradient_alignment(self) -> None:
        """Resolve DGA's target set (``mixture_kwargs['target']``) from ``eval_dataset`` and check the setup."""
        name = self.args.mixture
        target = getattr(self.mixture, "target", None)
        how = (
            "set mixture_kwargs['target'] to a key of the `eval_dataset` dict, a domain of `eval_dataset`'s domain "
            "column (e.g. {'target': 'arithmetic'}), a list of those, or 'eval' for the whole `eval_dataset`"
        )
        if not target:
            raise ValueError(f"mixture={name!r} aligns each domain's gradient with a target set's and has none: {how}.")
        if getattr(self, "is_deepspeed_enabled", False) or self.get_tp_size() > 1:
            raise ValueError(
                f"mixture={name!r} computes per-domain gradients with extra backward passes, which DeepSpeed's engine "
                "and tensor parallelism do not allow outside its step; train with DDP or FSDP2 "
                "(accelerate_configs/ddp.yaml, fsdp2.yaml) or pick another mixture."
            )
        sets = self._named_eval_sets()
        if list(target) == ["eval"]:
            chosen = list(sets.values()) if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
            if not chosen or chosen[0] is None:
                raise ValueError(f"mixture={name!r} with target 'eval' needs an `eval_dataset`.")
        else:
            missing = [t for t in target if str(t) not in sets]
            if missing:
                raise ValueError(
                    f"mixture_kwargs['target'] names {missing}, not found in `eval_dataset` (it offers {sorted(sets)}): "
                    f"{how}."
                )
            chosen = [sets[str(t)] for t in target]
        import datasets

        if len(chosen) > 1:
            common = set.intersection(*(set(d.column_names) for d in chosen))
            chosen = [d.select_columns([c for c in d.column_names if c in common]) for d in chosen]
        target_set = datasets.concatenate_datasets(chosen) if len(chosen) > 1 else chosen[0]
        if len(target_set) == 0:
            raise ValueError(f"mixture={name!r}: the target set {target} has no rows.")
        self._alignment_target = target_set  # unused columns are dropped at first use (the signature is known then)
        self._alignment_target_ready = False
        self._alignment_calls = 0
        self.last_alignment: dict | None = None

    def _named_eval_sets(self) -> dict:
        """``{name: dataset}``: the keys of a dict ``eval_dataset``, else its split by domain value and name."""
        eval_dataset = self.eval_dataset
        if isinstance(eval_dataset, dict):
            return {str(k): v for k, v in eval_dataset.items()}
        out = {}
        if _is_map_dataset(eval_dataset) and self.args.domain_column in eval_dataset.column_names:
            values = eval_dataset[self.args.domain_column]
            names = dict(zip(self._domain_values, self.domain_names))
            for value in sorted(set(values), key=str):
                rows = [i for i, v in enumerate(values) if v == value]
                out[names.get(value, str(value))] = eval_dataset.select(rows)
        return out

    def _alignment_batch(self) -> dict | None:
        """This rank's slice of the next global target batch (rows taken in order from the target set, cycling)."""
        if not self._alignment_target_ready:
            if _is_map_dataset(self._alignment_target):
                self._alignment_target = self._remove_unused_columns(self._alignment_target, description="dga target")
            self._alignment_target_ready = True
        target = self._alignment_target
        world, rank = self._data_parallel_size(), self.args.process_index
        size = self.mixture.target_batch_size or self.args.per_device_train_batch_size * world
        start = self._alignment_calls * size
        self._alignment_calls += 1
        rows = [(start + i) % len(target) for i in range(size)]
        per_rank = -(-size // world)
        mine = rows[rank * per_rank : (rank + 1) * per_rank]
        if not mine:
            return None
        weighting_columns = set(self._column_spec.names)  # a plain token-mean loss: no weights, no domain lookup
        batch = self.data_collator([{c: v for c, v in target[i].items() if c not in weighting_columns} for i in mine])
        return {k: v.to(self.args.device) if hasattr(v, "to") else v for k, v in batch.items()}

    def _align_gradients(self, batch_samples: list[dict]) -> None:
        """DGA's signal for this step, from the step's prefetched micro-batches and a target batch.

        Runs at the start of the optimizer step, before any backward of it. Per domain ``d`` (and the target) the
        gradient of the token-mean loss over the *whole* step — all micro-batches, all ranks — is built by backward
        passes through the data-parallel wrapper (``no_sync`` until the last micro-batch), so DDP averages it and FSDP2
        reduce-scatters it exactly as for training (each loss is a local sum over the global count, times the
        data-parallel size that the wrapper's mean divides out). Inner products with the target gradient and squared
        norms come from per-shard partial sums and one all-reduce (:mod:`hfweight.gradalign`). Every rank runs the
        same number of forward/backward passes (a zero-weighted row where it has no row of a domain), because
        FSDP's all-gathers and DDP's buffer broadcasts are collective. The optimizer's gradients are set aside and put
        back untouched. Cost: one forward+backward of the step's rows plus one of the target batch, every
        ``update_every`` steps.
        """
        from .gradalign import complete_products, partial_products, snapshot_gradients

        model = self.model_wrapped if self.model_wrapped is not None else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        world = self._data_parallel_size()
        k = len(self.domain_names)
        pieces = []  # per micro-batch: (model inputs, per-position domain (B, T-1) or -1, label mask)
        counts = torch.zeros(k + 1, dtype=torch.float64, device=self.args.device)
        for batch in batch_samples:
            mask = shifted_labels(batch) != -100
            segments, num_samples = sample_segments(batch)
            domains = per_sample_values(batch.get(BATCH_DOMAIN), batch, segments, num_samples)
            where = torch.full_like(segments, -1) if domains is None else domains.to(segments.device)[segments]
            where = torch.where(mask, where, torch.full_like(where, -1))
            counts[:k] += torch.bincount(where[where >= 0].flatten(), minlength=k)[:k].to(counts)
            pieces.append(({key: v for key, v in batch.items() if not key.startswith(BATCH_PREFIX)}, where))
        target = self._alignment_batch()
        if target is not None:
            target = {key: v for key, v in target.items() if not key.startswith(BATCH_PREFIX)}
            counts[k] = (shifted_labels(target) != -100).sum()
        counts = self._all_reduce(counts)

        def backward(inputs: dict, select, total: float, sync: bool) -> None:
            """Backward of Σ_selected ℓ / total · W (W undoes the wrapper's mean over ranks)."""
            context = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
            with context, self.compute_loss_context_manager():
                logps, mask = token_log_probs(model, inputs, self._fused, self.fused_min_logits)
                keep = mask if select is None else mask & select
                loss = -(logps * keep).sum() / max(total, 1.0) * world
                if not bool(keep.any()):
                    loss = loss * 0.0
            loss.backward()

        def rows_of(inputs: dict, where: torch.Tensor, d: int):
            """The rows of ``inputs`` holding a token of domain ``d`` (one zero-weighted row if none)."""
            rows = (where == d).any(dim=1)
            if not bool(rows.any()):
                rows = torch.zeros_like(rows)
                rows[0] = True
            width = where.shape[0]
            sub = {key: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == width else v for key, v in inputs.items()}
            return sub, where[rows] == d

        saved = [p.grad for p in params]
        was_training = model.training
        model.train()
        try:
            for p in params:
                p.grad = None
            if target is None:  # this rank has no target row: a zero-weighted pass keeps the collectives in step
                backward(pieces[0][0], torch.zeros_like(pieces[0][1], dtype=torch.bool), 1.0, sync=True)
            else:
                backward(target, None, float(counts[k]), sync=True)
            target_grad = snapshot_gradients(params)
            sums = torch.full((2, k), float("nan"), dtype=torch.float64)
            partials = []
            for d in range(k):
                if float(counts[d]) == 0:  # absent from the whole step on every rank: no gradient, NaN signal
                    continue
                for p in params:
                    p.grad = None
                for j, (inputs, where) in enumerate(pieces):
                    sub, select = rows_of(inputs, where, d)
                    backward(sub, select, float(counts[d]), sync=j == len(pieces) - 1)
                partial, _ = partial_products(params, [target_grad], world)
                partials.append((d, partial))
            sharded = self._parameters_sharded()
            if partials:
                stacked = torch.stack([p for _, p in partials])
                reduced = complete_products(stacked, sharded, world, lambda t: self._all_reduce(t).cpu())
                for row, (d, _) in enumerate(partials):
                    sums[0, d], sums[1, d] = reduced[row, 0], reduced[row, 1]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            model.train(was_training)
        from .strategies.mixture import alignment_signal

        signal = alignment_signal(sums[0], sums[1])
        self.last_alignment = {"step": self.state.global_step, "inner_products": sums[0], "squared_norms": sums[1],
                               "signal": signal}
        for name, value in zip(self.domain_names, signal.tolist()):
            if not math.isnan(value):
                self._weighting_metrics[f"dga_alignment/{name}"].append(value)
        self.mixture.observe_gradients(signal, self.state.global_step)

    def _get_train_sampler(self, train_dataset=None):
        if getattr(self, "weighting_enabled", False) and self.mixture is not None and self.args.mixture_mode == "resample":
            from .sampling import DomainSampler

            dataset = train_dataset if train_dataset is not None else self.train_dataset
            self._domain_sampler = DomainSampler.from_column(
                dataset[self.args.domain_column],
                self.mixture,
                domain_order=self._domain_values,
                domain_names=self.domain_names,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                batch_size=self.args.per_device_train_batch_size
                * self.args.gradient_accumulation_steps
                * self._data_parallel_size(),
                num_samples=len(dataset),
            )
            return self._domain_sampler
        return super()._get_train_sampler(train_dataset)

    def _build_column_spec(self) -> ColumnSpec:
        spec = ColumnSpec(domain_column=self.args.domain_column, allow_negative=self.args.allow_negative_weights)
        spec.sample_weight = self.sample_weighting is not None
        spec.token_weights = self.token_weighting is not None
        spec.ref_logps = any(getattr(s, "needs_reference", False) for s in (self.token_weighting, self.mixture))
        spec.domain = bool(self._domain_values)
        if getattr(self.sample_weighting, "column_required", False):
            spec.required.add(SAMPLE_WEIGHT_COLUMN)
            spec.required_by[SAMPLE_WEIGHT_COLUMN] = f"sample_weighting={self.args.sample_weighting!r}"
        if getattr(self.token_weighting, "column_required", False):
            spec.required.add(TOKEN_WEIGHTS_COLUMN)
            spec.required_by[TOKEN_WEIGHTS_COLUMN] = f"token_weighting={self.args.token_weighting!r}"
        if spec.ref_logps and self.reference is None:
            spec.required.add(REF_LOGPS_COLUMN)
            spec.required_by[REF_LOGPS_COLUMN] = "a reference-based strategy without a `reference_model`"
        if self.mixture is not None:
            spec.required.add(self.args.domain_column)
            spec.required_by[self.args.domain_column] = f"mixture={self.args.mixture!r}"
        return spec

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if getattr(self, "weighting_enabled", False):
            for name in self._column_spec.names:
                if name not in self._signature_columns:
                    self._signature_columns.append(name)

    # ---- distributed helpers --------------------------------------------------------------------------------------

    def _data_parallel_size(self) -> int:
        """Processes whose gradients DDP/ZeRO/FSDP average (replicated TP ranks don't count, as in Trainer)."""
        return self.accelerator.num_processes // self.get_tp_size()

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        tensor = tensor.to(self.args.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

    # ---- step preparation (before any backward of the step) ---------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.weighting_enabled and batch_samples:
            self._prepare_step(batch_samples)
        return batch_samples, num_items_in_batch

    def _prepare_step(self, batch_samples: list[dict]) -> None:
        """Compute each micro-batch's pre-forward weights and the step denominator ``Z`` (docs/methods.md#normalization)."""
        for batch in batch_samples:
            check_labels(batch)
        if getattr(self, "_alignment_target", None) is not None and self.mixture.gradients_requested():
            self._align_gradients(batch_samples)
        normalization = self.args.loss_normalization
        local_den = torch.zeros((), dtype=torch.float64, device=self.args.device)
        moments = torch.zeros(4, dtype=torch.float64, device=self.args.device)
        extremes = []
        dynamic = getattr(self.sample_weighting, "needs_losses", False)
        rescale = dynamic and self._sample_mode == "rescale"
        if rescale:  # weights come per micro-batch from its own forward (see _rescale_micro_batch)
            self.sample_weighting.begin_step(self.state.global_step)
        step_weights = self._loss_based_weights(batch_samples) if dynamic and not rescale else None
        exact_denominator = None
        if getattr(self.token_weighting, "denominator_needs_logps", False) and not rescale:
            exact_denominator = self._exact_denominator_start(batch_samples)
        for index, batch in enumerate(batch_samples):
            if "shift_labels" in batch:
                raise ValueError(
                    "Weighted losses do not support pre-shifted labels (`shift_labels`, used by context/sequence "
                    "parallelism) yet."
                )
            mask = shifted_labels(batch) != -100
            if self.reference is not None and BATCH_REF_LOGPS not in batch:
                model_inputs = {k: v for k, v in batch.items() if not k.startswith(BATCH_PREFIX)}
                batch[BATCH_REF_LOGPS] = reference_log_probs(self.reference, self.model, model_inputs)
            segments, num_samples = sample_segments(batch)
            domains = per_sample_values(batch.get(BATCH_DOMAIN), batch, segments, num_samples)
            if rescale:  # the static part of v (column × domain factor); u_i joins it in compute_loss
                column = per_sample_values(batch.get(BATCH_SAMPLE_WEIGHT), batch, segments, num_samples)
                v = self._times_domain_factor(column, domains)
            elif step_weights is None:
                v = self._sample_weights(batch, segments, num_samples, domains)
            else:
                v = self._times_domain_factor(step_weights[index], domains)
            den_w = None
            if self.token_weighting is not None:
                ctx = self._token_context(batch, mask)
                den_w = self._checked(self.token_weighting.denominator_weights(ctx), "token denominator weights")
            batch[BATCH_V], batch[BATCH_DEN_W] = v, den_w
            batch[BATCH_SEGMENTS], batch[BATCH_SAMPLE_DOMAIN] = segments, domains
            den = weighted_denominator(mask, den_w, v, normalization, segments, num_samples)
            local_den = local_den + den.to(local_den.device)
            v_eff = torch.ones(num_samples, dtype=torch.float64) if v is None else v
            moments += weight_moments(v_eff).to(moments.device)
            extremes.append(weight_extremes(v_eff).to(moments.device))
        local = torch.cat([local_den.view(1) / self._replica_factor(), moments])
        reduced = self._all_reduce(local)
        extremes = self._all_reduce(torch.stack(extremes).amax(dim=0), op=dist.ReduceOp.MAX)
        k = len(self.domain_names)
        self._step_plan = _StepPlan(
            denominator=reduced[0],
            remaining=len(batch_samples),
            domain_sums=torch.zeros((4, k), dtype=torch.float64, device=self.args.device) if k else None,
            rescale=[] if rescale else None,
            batches=batch_samples if self._meta_batch is not None else None,
            score=self._score_step if dynamic and not rescale else None,
            exact_denominator=exact_denominator,
        )
        if not rescale:  # rescale mode logs the weights once they are known, at the end of the step
            for key, value in summarize_weights(reduced[1:], extremes).items():
                self._weighting_metrics[f"weights/{key}"].append(value)
        if float(reduced[0]) == 0.0:
            logger.warning(
                "hfweight: every weight of optimizer step %d is zero; the step contributes a zero gradient.",
                self.state.global_step + 1,
            )

    def _parameters_sharded(self) -> bool:
        """ZeRO-3 or FSDP: each rank holds a shard of every parameter outside the forward."""
        if getattr(self, "is_fsdp_enabled", False):
            return True
        if getattr(self, "is_deepspeed_enabled", False):
            plugin = self.accelerator.state.deepspeed_plugin
            return plugin is not None and plugin.zero_stage == 3
        return False

    def _place_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        """Put a separate frozen reference model where the policy's forward can use it.

        ZeRO-3: sharded like the policy, inside an inference-only DeepSpeed engine (TRL's ``prepare_deepspeed``), as
        a reference loaded under ``zero3_init_flag`` is already partitioned and can only run inside an engine.
        ZeRO-1/2: replicated on every rank (a stage-0 engine). FSDP: sharded like the policy (TRL's
        ``prepare_fsdp``). Otherwise (single process, DDP): a full replica moved to the device. Its parameters
        never receive gradients in any case.
        """
        if getattr(self, "is_deepspeed_enabled", False):
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(reference, self.accelerator)
        if getattr(self, "is_fsdp_enabled", False):
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(reference, self.accelerator)
        return reference.to(self.args.device)

    def _replica_factor(self) -> int:
        """Ranks that see the same batch (tensor/context/sequence parallel), as in ``Trainer._get_num_items_in_batch``."""
        return self.get_tp_size() * self.get_cp_size() * self.get_sp_size()

    def _sample_weights(self, batch: dict, segments, num_samples: int, domains) -> torch.Tensor | None:
        """``v_i`` (one per sample) known before the forward: the sample strategy's weights times the domain
        upweight factor ``α_d / q_d``."""
        v = None
        if self.sample_weighting is not None:
            column = per_sample_values(batch.get(BATCH_SAMPLE_WEIGHT), batch, segments, num_samples)
            ctx = SampleContext(column=column, domains=domains, step=self.state.global_step)
            v = self._checked(self.sample_weighting.weights(ctx), "sample weights")
        return self._times_domain_factor(v, domains)

    def _times_domain_factor(self, v: torch.Tensor | None, domains) -> torch.Tensor | None:
        """Multiply by the upweight factor ``α_d / q_d`` when a mixture is applied by loss upweighting."""
        if self.mixture is None or self.args.mixture_mode != "upweight":
            return v
        factor = (self.mixture.probabilities() / self._natural_mixture).to(torch.float32)
        domain_v = factor.to(domains.device)[domains]
        return domain_v if v is None else v.to(domain_v.dtype) * domain_v

    def _loss_based_weights(self, batch_samples: list[dict]) -> list[torch.Tensor]:
        """Sample weights that depend on this step's losses (Sow et al., loss truncation, STORM), exactly.

        docs/methods.md#exact-modes, score mode: a no-grad scoring forward of the current model over the step's
        prefetched micro-batches gives every sample's mean token loss; the losses of all micro-batches of all ranks are
        gathered in a fixed order (micro-batch, then rank), the strategy weighs that global batch once, and each rank
        keeps its own slice by *global* rank. The weights are then known before the first backward, so the step
        denominator is exact and the gradient is invariant to GA and the number of ranks. Cost: one extra forward per
        micro-batch (~+33% FLOPs).
        """
        local = []
        model = self.model
        was_training = model.training
        model.eval()  # no dropout in the scoring pass: the same losses the training forward will see
        try:
            with torch.no_grad():
                for batch in batch_samples:
                    inputs = {k: v for k, v in batch.items() if not k.startswith(BATCH_PREFIX)}
                    logps, mask = token_log_probs(model, inputs, self._fused, self.fused_min_logits)
                    segments, num_samples = sample_segments(batch)
                    _, losses = weighted_numerator(-logps, mask, None, None, None, "sample", segments, num_samples)
                    column = per_sample_values(batch.get(BATCH_SAMPLE_WEIGHT), batch, segments, num_samples)
                    domains = per_sample_values(batch.get(BATCH_DOMAIN), batch, segments, num_samples)
                    local.append(
                        torch.stack(
                            [
                                losses.double(),
                                torch.full_like(losses, float("nan")).double() if column is None else column.double(),
                                torch.full_like(losses, -1).double() if domains is None else domains.double(),
                            ],
                            dim=1,
                        )
                    )
        finally:
            model.train(was_training)
        sizes = [len(x) for x in local]
        table, offset = self._all_gather_rows(torch.cat(local).to(self.args.device))
        has_column = not torch.isnan(table[:, 1]).all()
        ctx = SampleContext(
            column=table[:, 1].float() if has_column else None,
            losses=table[:, 0].float(),
            domains=table[:, 2].long() if bool((table[:, 2] >= 0).all()) else None,
            step=self.state.global_step,
        )
        weights = self._checked(self.sample_weighting.weights(ctx), "sample weights")
        mine = weights[offset : offset + sum(sizes)]
        self._score_step = (ctx, offset)
        self.last_sample_weights = {"losses": ctx.losses[offset : offset + sum(sizes)].detach().cpu(), "weights": mine.detach().cpu()}
        return list(torch.split(mine.to(self.args.device), sizes))

    def _all_gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Concatenate every rank's rows in rank order; return the table and where this rank's rows start."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return rows, 0
        world, rank = dist.get_world_size(), dist.get_rank()
        count = torch.tensor([rows.shape[0]], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        counts = [int(c) for c in counts]
        padded = rows.new_zeros((max(counts), rows.shape[1]))
        padded[: rows.shape[0]] = rows
        gathered = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        table = torch.cat([g[:c] for g, c in zip(gathered, counts)])
        return table, sum(counts[:rank])

    # ---- loss-based sample weights: the two exact modes and STORM's meta step ---------------------------------------

    def _setup_sample_mode(self) -> None:
        """Resolve the ``mode`` of a loss-based sample strategy (:data:`hfweight.strategies.sample.SAMPLE_MODES`):
        ``"score"`` (:meth:`_loss_based_weights`) or ``"rescale"`` (:meth:`_rescale_micro_batch`
        and :meth:`_rescale_gradients`); ``"auto"`` is rescale unless DeepSpeed owns the gradients. STORM also gets
        its meta batch (:meth:`_storm_meta_step`)."""
        self._sample_mode = None
        self._meta_batch = None
        self._score_step = None
        self.last_sample_weights = None
        strategy = self.sample_weighting
        if hasattr(strategy, "set_run_length"):
            self.add_callback(_RunLengthCallback(self))
        if not getattr(strategy, "needs_losses", False):
            return
        name = self.args.sample_weighting if isinstance(self.args.sample_weighting, str) else type(strategy).__name__
        deepspeed = getattr(self, "is_deepspeed_enabled", False)
        mode = getattr(strategy, "mode", "score")
        supports = getattr(strategy, "supports_rescale", False)
        if mode == "auto":
            mode = "rescale" if supports and not deepspeed else "score"
        if mode == "rescale" and not supports:
            raise ValueError(
                f"sample_weighting={name!r} does not implement the rescale protocol (begin_step/local_weights/"
                "end_step); set sample_weighting_kwargs['mode'] = 'score'."
            )
        if mode == "rescale" and deepspeed:
            raise ValueError(
                f"sample_weighting={name!r} with mode='rescale' rescales `param.grad` before clipping, but DeepSpeed "
                "keeps the gradients in its engine; set sample_weighting_kwargs['mode'] = 'score' (or 'auto')."
            )
        if hasattr(strategy, "mode"):
            strategy.mode = mode
        self._sample_mode = mode
        if getattr(strategy, "needs_meta_step", False):
            if deepspeed:
                raise ValueError(
                    f"sample_weighting={name!r}: the meta step moves the parameters along their gradients in "
                    "`param.grad` and back, which DeepSpeed keeps in its engine (partitioned under ZeRO-2/3); train it "
                    "on one process, with DDP or with FSDP2 (accelerate_configs/ddp.yaml, fsdp2.yaml), not with "
                    "DeepSpeed."
                )
            self._meta_batch = _MetaBatch()

    def _per_sample_losses(self, token_loss, mask, segments, num_samples: int) -> torch.Tensor:
        """Each sample's plain mean token loss (no token weights), as the scoring pass computes it; NaN if empty."""
        return weighted_numerator(token_loss, mask, None, None, None, "sample", segments, num_samples)[1]

    def _rescale_micro_batch(self, plan, extras, token_loss, mask, v, den_w, segments, num_samples: int):
        """Rescale mode, one micro-batch after its forward: the strategy's unnormalized weights ``u`` from this
        micro-batch's own losses; record what the end of the step needs; return ``v · u``. The step denominator in
        ``plan`` stays the static one (``u = 1``) until :meth:`_rescale_gradients` corrects it."""
        losses = self._per_sample_losses(token_loss, mask, segments, num_samples)
        domains = extras.get(BATCH_SAMPLE_DOMAIN)
        ctx = SampleContext(losses=losses.float(), domains=domains, step=self.state.global_step)
        u = self._checked(self.sample_weighting.local_weights(ctx), "sample weights").to(token_loss.device)
        u = u.to(torch.float64)
        static = torch.ones_like(u) if v is None else v.to(torch.float64)
        den = torch.zeros_like(u).index_add_(
            0,
            segments.flatten(),
            (mask.to(torch.float64) * (1.0 if den_w is None else den_w.to(torch.float64))).flatten(),
        )
        if self.args.loss_normalization == "sample":
            den = (den != 0).to(torch.float64)
        column = per_sample_values(extras.get(BATCH_SAMPLE_WEIGHT), extras, segments, num_samples)
        plan.rescale.append(
            torch.stack(
                [
                    losses.to(torch.float64),
                    u,
                    static,
                    u * static * den,
                    torch.full_like(u, -1) if domains is None else domains.to(u),
                    torch.full_like(u, float("nan")) if column is None else column.to(u),
                ],
                dim=1,
            )
        )
        return (u * static).to(torch.float32)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        plan = self._step_plan if getattr(self, "weighting_enabled", False) else None
        if plan is None or plan.closed:
            return loss
        if plan.rescale is not None or plan.exact_denominator is not None:
            plan.returned = loss.detach().to(torch.float64) + plan.returned
        if plan.remaining == 0:  # the step's last backward is done (and DDP has synced); clipping comes next
            plan.closed = True
            loss = self._close_step(plan, loss)
        return loss

    def _close_step(self, plan: _StepPlan, loss: torch.Tensor) -> torch.Tensor:
        """After the step's last backward, before clipping and the optimizer step: rescale the gradients (rescale
        mode), update the strategy with the global batch, and run STORM's meta step."""
        if plan.exact_denominator is not None:
            loss = self._correct_denominator(plan, loss)
        if plan.rescale is None and self._meta_batch is None:
            return loss
        if plan.rescale is not None:
            loss, ctx, offset, count = self._rescale_gradients(plan, loss)
        else:
            ctx, offset = plan.score
            count = sum(sample_counts(b).numel() for b in plan.batches)
        storm = self.sample_weighting if self._meta_batch is not None else None
        features = storm.step_features(ctx, self._sample_mode) if storm is not None else None
        if plan.rescale is not None:
            self.sample_weighting.end_step(ctx)
        if storm is not None:
            if self._meta_batch.batches is not None and storm.should_meta_step(self.state.global_step):
                self._storm_meta_step(plan, features, offset, count)
            self._meta_batch.keep(plan.batches, features, torch.isfinite(ctx.losses), offset, count)
        return loss


    def _rescale_gradients(self, plan: _StepPlan, loss: torch.Tensor):
        """Rescale mode, end of step: gather every sample's row (all ranks, rank-major: the order of the score
        mode), compute the true denominator ``Z = Σ u · static · den``, multiply every gradient by ``Z_static / Z``
        (the micro-batches divided by the static ``Z_static``), and correct the loss handed to the Trainer so the
        logged loss is the weighted one. Returns ``(loss, global ctx, this rank's offset, its sample count)``."""
        rows = torch.cat(plan.rescale) if plan.rescale else torch.zeros((0, len(_RESCALE_ROWS)), dtype=torch.float64)
        count = rows.shape[0]
        table, offset = self._all_gather_rows(rows.to(self.args.device, torch.float64))
        table = table.cpu()
        loss = self._rescale_step(plan, loss, float(table[:, 3].sum()))
        losses, u, static = table[:, 0], table[:, 1], table[:, 2]
        valid = torch.isfinite(losses)
        mean_u = float(u[valid].mean()) if bool(valid.any()) else 0.0
        normalized = u / mean_u if mean_u > 0 else torch.zeros_like(u)
        column = torch.where(torch.isnan(table[:, 5]), torch.ones_like(u), table[:, 5])
        strategy_weights = normalized * column  # what the score mode's strategy returns: mean 1, times the column
        logged = normalized * static
        for key, value in summarize_weights(weight_moments(logged), weight_extremes(logged)).items():
            self._weighting_metrics[f"weights/{key}"].append(value)
        self.last_sample_weights = {
            "losses": losses[offset : offset + count].float(),
            "weights": strategy_weights[offset : offset + count].float(),
        }
        domains = table[:, 4]
        ctx = SampleContext(
            losses=losses.float(),
            domains=domains.long() if bool((domains >= 0).all()) and domains.numel() else None,
            step=self.state.global_step,
        )
        return loss, ctx, offset, count

    def _rescale_step(self, plan: _StepPlan, loss: torch.Tensor, z: float) -> torch.Tensor:
        """The micro-batches divided their numerators by the planned ``plan.denominator``; the step's true
        denominator is ``z``: multiply every gradient by ``planned / z`` (before clipping) and correct the loss handed to
        the Trainer (the last micro-batch's carries the difference, so the logged loss is the true one)."""
        planned = float(plan.denominator)
        factor = planned / z if z > 0 else 0.0
        if factor != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
        if z == 0.0 and planned > 0.0:
            logger.warning(
                "hfweight: every weight of optimizer step %d is zero; the step contributes a zero gradient.",
                self.state.global_step + 1,
            )
        return (loss + plan.returned * (factor - 1.0)).to(loss.dtype)

    def _exact_denominator_start(self, batch_samples: list[dict]) -> torch.Tensor | None:
        """Start accumulating the exact denominator of a ``denominator_needs_logps`` token weighting, or None where the
        planned one is already exact and no correction is possible (DeepSpeed steps inside its backward)."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return torch.zeros((), dtype=torch.float64, device=self.args.device)
        if self.args.loss_normalization == "sample" or any(BATCH_TOKEN_WEIGHTS in b for b in batch_samples):
            raise ValueError(
                f"token_weighting={self.args.token_weighting!r} with a `token_weights` column or "
                "loss_normalization='sample' normalizes over tokens chosen in the forward, which needs a gradient "
                "correction before the optimizer step that DeepSpeed's engine does not allow; train it with DDP or FSDP "
                "(accelerate_configs/ddp.yaml, fsdp2.yaml), or use token normalization without the column."
            )
        return None  # token mode without a column: the planned count ceil(k% · n_valid) is the exact one

    def _correct_denominator(self, plan: _StepPlan, loss: torch.Tensor) -> torch.Tensor:
        """End of step for a ``denominator_needs_logps`` token weighting: all-reduce the exact ``Z`` and rescale."""
        z = float(self._all_reduce(plan.exact_denominator.view(1) / self._replica_factor())[0])
        return self._rescale_step(plan, loss, z)

    def _meta_forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward of one micro-batch through the (unwrapped) model: each sample's token-loss sum (with graph) and
        its number of valid tokens, plain cross-entropy (no token weights)."""
        inputs = {
            k: v.to(self.args.device) if torch.is_tensor(v) else v
            for k, v in batch.items()
            if not k.startswith(BATCH_PREFIX)
        }
        logps, mask = token_log_probs(self.model, inputs, self._fused, self.fused_min_logits)
        segments, num_samples = sample_segments(inputs)
        sums = torch.zeros(num_samples, dtype=logps.dtype, device=logps.device)
        sums = sums.index_add(0, segments.flatten(), (-logps * mask).flatten())
        counts = torch.zeros(num_samples, dtype=torch.float64, device=logps.device)
        counts = counts.index_add(0, segments.flatten(), mask.flatten().to(torch.float64))
        return sums + 0.0 * logps.sum(), counts

    def _storm_meta_step(self, plan: _StepPlan, features: torch.Tensor, offset: int, count: int) -> None:
        """One STORM meta step (:class:`hfweight.strategies.sample.MetaRescaler`, steps 1-5 of its docstring): an SGD
        look-ahead ``θ' = θ − η g``, the meta batch V (the previous step's batch) forward + backward at θ', central
        differences of this step's per-sample numerators along ``g_val``, one Adam step of the rescaler. Leaves θ and
        ``.grad`` exactly as it found them. Every tensor handed to the rescaler is global (all-gathered).

        The meta term is exact (up to the finite difference) for the step's real loss, including the static weights
        (``sample_weight`` column, domain upweighting) and both normalizations; token weights are not part of it
        (the differences use plain per-sample cross-entropy), an approximation when a token weighting is also on."""
        from .gradalign import complete_products, local_piece, partial_gram, register_sharded_parameters

        storm, meta, model = self.sample_weighting, self._meta_batch, self.model
        token_mode = self.args.loss_normalization == "token"
        # FSDP2: every update below is elementwise, so it runs on each rank's shards of θ and .grad as is; only the
        # norm of g_val needs the shards' partial sums. The root module's real (sharded) parameters are registered
        # again after each forward/backward, which leaves its temporary unsharded ones in place.
        fsdp = getattr(self, "is_fsdp_enabled", False)
        if fsdp:
            register_sharded_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = float(self.optimizer.param_groups[0]["lr"])
        theta = [p.detach().clone() for p in params]
        g_train = [None if p.grad is None else p.grad.detach().clone() for p in params]
        device = self.args.device
        with torch.no_grad():
            s_val = storm.scales(meta.features).detach().to(device, torch.float64)
            s_train = storm.scales(features).detach().to(device, torch.float64)
        total = float(s_val[meta.valid.to(s_val.device)].sum())
        local_s = s_val[meta.offset : meta.offset + meta.count]
        was_training = model.training
        model.train()
        val_losses, plus, minus = [], [], []
        delta = 0.0
        try:
            with torch.no_grad():  # 2. look-ahead
                for p, g in zip(params, g_train):
                    if g is not None:
                        p.sub_(g, alpha=lr)
            for p in params:
                p.grad = None
            start = 0  # 3. meta batch at θ': g_val = ∇ Σ_global s ℓ(θ') / Σ_global s
            for batch in meta.batches:
                with self.compute_loss_context_manager():
                    sums, counts = self._meta_forward(batch)
                n = counts.numel()
                valid = counts > 0
                means = sums / counts.clamp(min=1).to(sums.dtype)
                weights = torch.where(valid, local_s[start : start + n], torch.zeros_like(local_s[start : start + n]))
                start += n
                numerator = (weights.to(means.dtype) * torch.where(valid, means, torch.zeros_like(means))).sum()
                numerator = numerator + 0.0 * sums.sum()
                (numerator / total if total > 0 else numerator * 0.0).backward()
                nan = torch.full_like(means, float("nan"))
                val_losses.append(torch.where(valid, means, nan).detach().to(torch.float64))
            if fsdp:
                register_sharded_parameters(model)
            g_val = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
            world = self._data_parallel_size()
            if fsdp:  # FSDP reduce-scattered the mean over ranks; the step's gradient is their sum
                g_val = [g * world for g in g_val]
            elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for g in g_val:
                    dist.all_reduce(g)
            partial, sharded = partial_gram([[local_piece(g) for g in g_val]], world)
            norm = float(complete_products(partial, sharded, world, lambda t: self._all_reduce(t).cpu())[0, 0].sqrt())
            delta = 0.01 / norm if norm > 0 and math.isfinite(norm) else 0.0
            with torch.no_grad():  # 4. central differences of this step's numerators along g_val
                for sign, out in ((1.0, plus), (-1.0, minus)):
                    if fsdp:  # drop the root's gathered copy of the previous θ, or the forward would reuse it
                        register_sharded_parameters(model)
                    for p, t, g in zip(params, theta, g_val):
                        p.copy_(t).add_(g, alpha=sign * delta)
                    for batch in plan.batches:
                        sums, counts = self._meta_forward(batch)
                        sums = sums.to(torch.float64)
                        out.append(sums if token_mode else sums / counts.clamp(min=1))
        finally:
            if fsdp:
                register_sharded_parameters(model)
            with torch.no_grad():
                for p, t, g in zip(params, theta, g_train):
                    p.copy_(t)
                    p.grad = g
            model.train(was_training)
        # Per local sample of B: [d_i, D_i, c_i] (D: denominator share; c: static part of the weight).
        counts = torch.cat([sample_counts(b) for b in plan.batches]).to(device, torch.float64)
        d_local = (torch.cat(plus) - torch.cat(minus)) / (2.0 * delta) if delta > 0 else torch.zeros_like(counts)
        d_local = torch.where(counts > 0, d_local, torch.full_like(d_local, float("nan")))
        den_local = counts if token_mode else torch.ones_like(counts)
        v_local = torch.cat(
            [
                torch.ones(c, dtype=torch.float64, device=device) if b.get(BATCH_V) is None else b[BATCH_V].to(device, torch.float64)
                for b, c in zip(plan.batches, (sample_counts(b).numel() for b in plan.batches))
            ]
        )
        if self._sample_mode == "score":  # BATCH_V = s/mean(s) × static there: divide the strategy's part out
            s_mine = s_train[offset : offset + count]
            valid = torch.isfinite(torch.as_tensor(plan.score[0].losses[offset : offset + count], device=device))
            mean_s = s_train[torch.isfinite(plan.score[0].losses.to(device))].mean()
            v_local = torch.where(valid, v_local * mean_s / s_mine, torch.zeros_like(v_local))
        rows = torch.stack([d_local, den_local, v_local], dim=1)
        table = self._all_gather_rows(rows)[0].cpu()
        ell_v = torch.cat(val_losses) if val_losses else torch.zeros(0, dtype=torch.float64, device=device)
        ell_v = self._all_gather_rows(ell_v.view(-1, 1).to(device, torch.float64))[0][:, 0].cpu()
        # 5. ω ← Adam(∇_ω [outer term + look-ahead term])
        train_scales = storm.scales(features)
        objective = meta_objective(storm.scales(meta.features), ell_v) + lookahead_surrogate(
            train_scales, table[:, 0], lr, static=table[:, 2], denominators=table[:, 1]
        )
        if storm.kl_weight > 0:
            objective = objective + storm.kl_weight * scales_kl_to_uniform(train_scales)
        grad_norm = storm.meta_update(objective)
        self._weighting_metrics["storm/meta_objective"].append(float(objective.detach()))
        self._weighting_metrics["storm/meta_grad_norm"].append(grad_norm)

    def _token_context(self, batch: dict, mask: torch.Tensor, logps: torch.Tensor | None = None) -> TokenContext:
        return TokenContext(
            mask=mask,
            column=shift_token_column(batch.get(BATCH_TOKEN_WEIGHTS)),
            ref_logps=shift_token_column(batch.get(BATCH_REF_LOGPS)),
            logps=logps,
        )

    @staticmethod
    def _checked(weights: torch.Tensor | None, what: str) -> torch.Tensor | None:
        """Strategies must never hand NaN/inf weights to the loss: fail loudly instead of training on garbage."""
        if weights is not None and not torch.isfinite(weights).all():
            raise FloatingPointError(f"hfweight: the {what} contain NaN or inf; refusing to train on them.")
        return weights

    # ---- loss ---------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.weighting_enabled:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        extras = {k: inputs[k] for k in list(inputs) if k.startswith(BATCH_PREFIX)}
        model_inputs = {k: v for k, v in inputs.items() if not k.startswith(BATCH_PREFIX)}
        if BATCH_V not in extras or not model.training or self._step_plan is None:
            # Evaluation and prediction: the plain, unweighted loss of the parent, so held-out numbers compare.
            return super().compute_loss(
                model, model_inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss = self._weighted_loss(model, model_inputs, extras)
        return (loss, None) if return_outputs else loss

    def _weighted_loss(self, model, inputs: dict, extras: dict) -> torch.Tensor:
        plan = self._step_plan
        kl = None
        outputs = {}
        if self._needs_reference_model:
            ref_hidden = reference_hidden_states(self.reference, self.model, inputs)
            policy_head, ref_head = lm_head_of(model), lm_head_of(self._reference_module())
            # Inside the policy's forward: under ZeRO-3/FSDP2 the LM head is gathered there (token_log_probs_with).
            logps, mask, kl = token_log_probs_with(
                model, inputs, self._fused, self.fused_min_logits,
                lambda hidden: chunked_forward_kl(hidden, policy_head, ref_hidden, ref_head), outputs,
            )
        else:
            logps, mask = token_log_probs(model, inputs, self._fused, self.fused_min_logits, outputs)
        self._log_forward_metrics(inputs, outputs.get("fused"))
        token_loss = -logps
        den_w = extras.get(BATCH_DEN_W)
        loss_w = extra = None
        if self.token_weighting is not None:
            ctx = self._token_context(extras, mask, logps.detach())
            ctx.kl = kl
            loss_w = self._checked(self.token_weighting.loss_weights(ctx), "token loss weights")
            extra = self.token_weighting.extra_token_loss(ctx)
        v, segments = extras.get(BATCH_V), extras[BATCH_SEGMENTS]
        num_samples = int(segments.max()) + 1 if segments.numel() else 0
        if getattr(self.token_weighting, "denominator_needs_logps", False):
            # The exact normalizer weights (e.g. Rho-1: the kept tokens times the column), also for the per-sample
            # means of the sample normalization; the step's Z is corrected at the end of the step.
            den_w = self._checked(self.token_weighting.denominator_weights_after(ctx), "token denominator weights")
            if plan.exact_denominator is not None:
                plan.exact_denominator += weighted_denominator(
                    mask, den_w, v, self.args.loss_normalization, segments, num_samples
                ).to(plan.exact_denominator.device)
        if plan.rescale is not None:
            v = self._rescale_micro_batch(plan, extras, token_loss.detach(), mask, v, den_w, segments, num_samples)
        numerator, _ = weighted_numerator(
            token_loss, mask, loss_w, den_w, v, self.args.loss_normalization, segments, num_samples, extra
        )
        z = plan.denominator.to(numerator.device, numerator.dtype)
        if float(z) == 0.0:
            loss = numerator * 0.0
        else:
            loss = numerator / z * self._data_parallel_size()
        self._accumulate_domain_stats(plan, extras, token_loss.detach(), mask, num_samples)
        plan.remaining -= 1
        if plan.remaining == 0:
            self._finish_step(plan)
        return loss

    def _log_forward_metrics(self, inputs: dict, fused_outputs) -> None:
        """Hook: metrics the parent trainer logs from its own forward, which the weighted loss replaces (TRL's SFT:
        entropy, token accuracy, tokens seen). ``fused_outputs`` is the fused head's output, or None."""

    def _reference_module(self) -> torch.nn.Module:
        """The module whose LM head scores the reference (the policy itself for a PEFT 'base' reference)."""
        return self.model if self.reference == "base" else self.reference

    # ---- per-step statistics ---------------------------------------------------------------------------------------

    def _accumulate_domain_stats(self, plan: _StepPlan, extras: dict, token_loss, mask, num_samples: int) -> None:
        domains = extras.get(BATCH_SAMPLE_DOMAIN)
        if plan.domain_sums is None or domains is None:
            return
        segments = extras[BATCH_SEGMENTS].flatten()
        per_sample = torch.zeros((4, num_samples), dtype=torch.float64, device=token_loss.device)
        per_sample[0].index_add_(0, segments, (token_loss * mask).flatten().to(torch.float64))
        per_sample[1].index_add_(0, segments, mask.flatten().to(torch.float64))
        per_sample[2] = 1.0
        ref_logps = shift_token_column(extras.get(BATCH_REF_LOGPS))
        if ref_logps is not None:  # DoReMi's excess loss max(ℓ − ℓ_ref, 0), summed over tokens
            excess = (token_loss + ref_logps.to(token_loss.dtype)).clamp(min=0) * mask
            per_sample[3].index_add_(0, segments, excess.flatten().to(torch.float64))
        plan.domain_sums.index_add_(1, domains.to(plan.domain_sums.device), per_sample.to(plan.domain_sums))

    def _finish_step(self, plan: _StepPlan) -> None:
        """Once per optimizer step, on every rank: all-reduce the per-domain sums, log them, feed the mixture."""
        if plan.domain_sums is None:
            return
        sums = self._all_reduce(plan.domain_sums)
        has_reference = self._column_spec.ref_logps
        stats = DomainStats(
            loss_sum=sums[0],
            token_count=sums[1],
            sample_count=sums[2],
            step=self.state.global_step,
            excess_sum=sums[3] if has_reference else None,
        )
        for name, value in zip(self.domain_names, stats.mean_loss.tolist()):
            if not math.isnan(value):
                self._weighting_metrics[f"domain_loss/{name}"].append(value)
        observe = getattr(self.mixture, "observe", None)
        if observe is not None:
            observe(stats)

    # ---- logging ----------------------------------------------------------------------------------------------------

    def _has_weighting_state(self) -> bool:
        """Whether this run has weighting metrics, checkpointed state and artifacts (a subclass with other switches,
        such as the GRPO/RLOO reward weighting, answers for itself)."""
        return getattr(self, "weighting_enabled", False)

    def _add_weighting_logs(self, logs: dict[str, float]) -> None:
        """Add the metrics gathered since the last log (min/max/mean over the window) and the mixture to ``logs``."""
        for key, values in self._weighting_metrics.items():
            if key.endswith("/min"):
                logs[key] = min(values)
            elif key.endswith("/max"):
                logs[key] = max(values)
            else:
                logs[key] = sum(values) / len(values)
        self._weighting_metrics.clear()
        if self.mixture is not None:
            for name, p in zip(self.domain_names, self.mixture.probabilities().tolist()):
                logs[f"mixture/{name}"] = p

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._has_weighting_state() and self._weighting_metrics and "loss" in logs:
            self._add_weighting_logs(logs)
        super().log(logs, *args, **kwargs)

    # ---- checkpointing ----------------------------------------------------------------------------------------------

    def _stateful_parts(self) -> dict:
        parts = {"token_weighting": self.token_weighting, "sample_weighting": self.sample_weighting, "mixture": self.mixture}
        if getattr(self, "_domain_sampler", None) is not None:
            parts["domain_sampler"] = _SamplerAtStep(self._domain_sampler, self.state)
        if getattr(self, "_mixture_stream", None) is not None:
            parts["mixture_stream"] = _StreamAtStep(self._mixture_stream, self.state, self._stream_rows_per_step)
        if getattr(self, "_alignment_target", None) is not None:
            parts["gradient_alignment"] = _AlignmentPosition(self)
        if getattr(self, "_meta_batch", None) is not None:
            parts["storm_meta_batch"] = self._meta_batch
        return parts

    def _state_facts(self) -> dict:
        """What, besides the stateful parts' classes, a checkpoint's weighting state must agree on with this run
        (:func:`hfweight.state.fingerprint`); a subclass adds its own (the reward functions)."""
        return {"domains": list(self.domain_names), "mixture_mode": self.args.mixture_mode if self.mixture is not None else None}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._has_weighting_state():
            save_state(output_dir, self._stateful_parts(), self._state_facts(), self.args.process_index, self.args.world_size)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self._has_weighting_state():
            load_state(checkpoint, self._stateful_parts(), self._state_facts(), self.args.process_index, self.args.world_size)
        elif os.path.exists(state_file(checkpoint, 0)):
            raise ValueError(
                f"{state_file(checkpoint, 0)} holds weighting state but this run has weighting off; resuming would drop "
                "the strategies' state. Resume with the configuration that wrote it (or start a new run from its model)."
            )

    # ---- end of training ----------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the latest *complete* checkpoint (the parent may pick a half-written one)
            resume_from_checkpoint = resolve_resume_checkpoint(True, self.args.output_dir)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self._has_weighting_state() and self.args.should_save:
            self.save_weighting_artifacts(self.args.output_dir)
        return output

    def weighting_record(self) -> dict:
        """What ``weighting_summary.json`` and the model card record: the configuration, the domains, and the final
        weights of every dynamic part (a subclass adds its own, e.g. reward weights, by extending this dict)."""
        record = {"config": self.args.weighting_summary(), "domains": self.domain_names}
        if self.mixture is not None:
            final = getattr(self.mixture, "final_probabilities", self.mixture.probabilities)()
            record["final_mixture"] = dict(zip(self.domain_names, final.tolist()))
        return record

    def save_weighting_artifacts(self, output_dir: str) -> dict[str, str]:
        """Write the weighting summary (JSON), the final mixture (JSON loadable by ``mixture='static'``) and a plot
        of the logged weights to ``output_dir``; return the paths written."""
        from .plots import plot_weighting_history

        os.makedirs(output_dir, exist_ok=True)
        paths = {}
        record = self.weighting_record()
        if "final_mixture" in record:
            paths["mixture"] = os.path.join(output_dir, "mixture_weights.json")
            with open(paths["mixture"], "w") as f:
                json.dump({"weights": record["final_mixture"]}, f, indent=2)
        paths["summary"] = os.path.join(output_dir, "weighting_summary.json")
        with open(paths["summary"], "w") as f:
            json.dump(record, f, indent=2, default=repr)  # e.g. a policy callable in mixture_kwargs
        plot = plot_weighting_history(self.state.log_history, os.path.join(output_dir, "weighting.png"))
        if plot is not None:
            paths["plot"] = plot
        return paths

    def create_model_card(self, *args, **kwargs):
        """The parent's card (``README.md`` in ``output_dir``, what ``push_to_hub`` uploads) plus a weighting
        section: configuration, final mixture and reward weights, and the plots (see :mod:`hfweight.card`)."""
        super().create_model_card(*args, **kwargs)
        if not self._has_weighting_state() or not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        paths = self.save_weighting_artifacts(output_dir)
        plots = [os.path.relpath(p, output_dir) for k, p in paths.items() if p.endswith(".png")]
        write_weighting_section(output_dir, self.weighting_record(), plots)
