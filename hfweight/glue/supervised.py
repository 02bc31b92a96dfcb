"""``WeightingMixin``: the supervised glue of ``WeightedTrainer`` and ``WeightedSFTTrainer``.

It builds the strategies from the config, finds the domains, keeps the weighting columns through collation, and
hands the Trainer's step to :class:`hfweight.glue.step.WeightedStep` (plan, weighted loss, close) and to the drivers
the strategies declared (:mod:`hfweight.glue.drivers`). Logging, checkpointed state and artifacts come from
:class:`hfweight.glue.core.WeightingCore`.

Trainer seams used: ``get_batch_samples`` (the step's prefetched micro-batches → the plan), ``compute_loss`` (the
weighted loss), ``training_step`` (the end of the step, after the last backward), ``_get_train_sampler`` (resample
mixtures), ``_set_signature_columns_if_needed`` (the weighting columns survive ``remove_unused_columns``), and
``loss_is_scaled_for_ga`` (the loss is already normalized over the whole step).

With every weighting switch off, none of this runs: each override calls the parent unchanged (bit-for-bit parity).
"""

from __future__ import annotations

import copy
import logging

import torch

from ..columns import BATCH_PREFIX, ColumnSpec, WeightingCollator, discover_domains, validate_dataset
from ..config import REF_LOGPS_COLUMN, SAMPLE_WEIGHT_COLUMN, TOKEN_WEIGHTS_COLUMN
from ..loss import enable_fused_log_probs
from ..reference import load_reference_model
from .core import WeightingCore
from .data import check_declared_domains, evaluated_domains, is_map_dataset, is_mixture_stream
from .drivers import build_drivers
from .drivers.sampler import DomainResampling
from .step import BATCH_V, WeightedStep, model_inputs

logger = logging.getLogger(__name__)


class WeightingMixin(WeightingCore):
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
        # A reference no strategy reads would never be loaded: a wrong path or model would pass unnoticed. The config
        # checks its own field at construction; this covers the trainer argument and a field set afterwards.
        args.check_unused_reference("reference_model", args.reference_model)
        args.check_unused_reference("reference_model (the trainer argument)", reference_model)
        self._init_core()
        self.weighting_enabled = args.weighting_enabled
        self._weighted_step: WeightedStep | None = None
        self.token_weighting = self.sample_weighting = None
        self.last_sample_weights = None
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
        self.reference = self._load_reference(reference_model)
        self._setup_domains()
        self._drivers = build_drivers(self)
        self._column_spec = self._build_column_spec()
        if is_map_dataset(self.train_dataset):
            validate_dataset(self.train_dataset, self._column_spec)
        domain_index = {value: i for i, value in enumerate(self._domain_values)}
        self.data_collator = WeightingCollator(self.data_collator, self._column_spec, domain_index)
        self._fused = enable_fused_log_probs(self.model)
        if not self._fused:
            logger.warning(
                "hfweight: the model has no LM head TRL's fused kernel can drive; per-token log-probs come from the "
                "model's logits (memory as in the parent Trainer)."
            )
        self._weighted_step = WeightedStep(self, self._drivers)
        self._watch_step_boundaries()
        # Our loss is already normalized over the whole step: the Trainer must not divide it by GA again.
        self.loss_is_scaled_for_ga = True

    def _uses_reference(self) -> tuple[bool, bool]:
        """(a strategy reads reference log-probs, the token strategy needs a live reference model)."""
        needs_logps = any(s is not None and s.needs_reference for s in (self.token_weighting, self.mixture))
        return needs_logps, self.token_weighting is not None and self.token_weighting.needs_reference_model

    def _load_reference(self, reference_model):
        """The frozen reference model, placed like the policy (None: none needed or none given, then the cached
        ``ref_logps`` column is required)."""
        reference = reference_model if reference_model is not None else self.args.reference_model
        needs_logps, self._needs_reference_model = self._uses_reference()
        if self._needs_reference_model and reference is None:
            # The authors' default (ASFT): the initial model, frozen; for a PEFT model its base with adapters off.
            reference = "base" if hasattr(self.model, "disable_adapter") else copy.deepcopy(self.model)
        if not (needs_logps or self._needs_reference_model) or reference is None:
            return None
        reference = load_reference_model(reference, self.model, self.processing_class)
        return self._place_reference(reference) if isinstance(reference, torch.nn.Module) else reference

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

    def _reference_module(self) -> torch.nn.Module:
        """The module whose LM head scores the reference (the policy itself for a PEFT 'base' reference)."""
        return self.model if self.reference == "base" else self.reference

    def _setup_domains(self) -> None:
        """Find the domains (sorted) and their sizes in the training data, then bind them."""
        column = self.args.domain_column
        self._domain_values: list = []
        sizes = None
        if is_map_dataset(self.train_dataset) and column in self.train_dataset.column_names:
            self._domain_values, sizes = discover_domains(self.train_dataset, column)
            check_declared_domains(self.args, self._domain_values, f"the training dataset's column {column!r}")
        elif self.mixture is not None and is_mixture_stream(self.train_dataset):
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
        # which domains the user measures: a run-time watch treats them as wanted (ConcentratedDomainWatch)
        self.mixture.set_evaluated_domains(evaluated_domains(
            self.eval_dataset, self.args.domain_column, dict(zip(self._domain_values, self.domain_names))))
        if self.args.mixture_mode == "upweight":
            if sizes is None:
                raise ValueError(
                    "mixture_mode='upweight' needs the natural domain mixture q, read from a map-style dataset's "
                    "domain column; for a streaming dataset use mixture_mode='resample'."
                )
            self._natural_mixture = sizes / sizes.sum()

    def _build_column_spec(self) -> ColumnSpec:
        """Which weighting columns the collator carries and the dataset check requires, and why."""
        args = self.args
        spec = ColumnSpec(domain_column=args.domain_column, allow_negative=args.allow_negative_weights)
        spec.sample_weight = self.sample_weighting is not None
        spec.token_weights = self.token_weighting is not None
        spec.ref_logps = self._uses_reference()[0]
        spec.domain = bool(self._domain_values)
        required = {
            SAMPLE_WEIGHT_COLUMN: (self.sample_weighting, f"sample_weighting={args.sample_weighting!r}"),
            TOKEN_WEIGHTS_COLUMN: (self.token_weighting, f"token_weighting={args.token_weighting!r}"),
        }
        for column, (strategy, who) in required.items():
            if strategy is not None and strategy.column_required:
                spec.required.add(column)
                spec.required_by[column] = who
        if spec.ref_logps and self.reference is None:
            spec.required.add(REF_LOGPS_COLUMN)
            spec.required_by[REF_LOGPS_COLUMN] = "a reference-based strategy without a `reference_model`"
        if self.mixture is not None:
            spec.required.add(args.domain_column)
            spec.required_by[args.domain_column] = f"mixture={args.mixture!r}"
        return spec

    def _replica_factor(self) -> int:
        """Ranks that see the same batch (tensor/context/sequence parallel), as in ``Trainer._get_num_items_in_batch``."""
        return self.get_tp_size() * self.get_cp_size() * self.get_sp_size()

    # ---- Trainer seams --------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        resampling = [d for d in getattr(self, "_drivers", ()) if isinstance(d, DomainResampling)]
        if getattr(self, "weighting_enabled", False) and resampling:
            return resampling[0].train_sampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if getattr(self, "weighting_enabled", False):
            for name in self._column_spec.names:
                if name not in self._signature_columns:
                    self._signature_columns.append(name)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.weighting_enabled and batch_samples:
            self._weighted_step.prepare(batch_samples)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.weighting_enabled:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        extras = {k: inputs[k] for k in list(inputs) if k.startswith(BATCH_PREFIX)}
        if BATCH_V not in extras or not model.training or self._weighted_step.plan is None:
            # Evaluation and prediction: the plain, unweighted loss of the parent, so held-out numbers compare.
            return super().compute_loss(
                model, model_inputs(inputs), return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss = self._weighted_step.loss(model, model_inputs(inputs), extras)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not getattr(self, "weighting_enabled", False):
            return loss
        return self._weighted_step.after_backward(loss)

    def _log_forward_metrics(self, inputs: dict, fused_outputs) -> None:
        """Hook: metrics the parent trainer logs from its own forward, which the weighted loss replaces (TRL's SFT:
        entropy, token accuracy, tokens seen). ``fused_outputs`` is the fused head's output, or None."""

    # ---- the core's questions ----------------------------------------------------------------------------------------

    def _weighting_on(self) -> bool:
        return getattr(self, "weighting_enabled", False)

    def _on_train_begin(self, state) -> None:
        super()._on_train_begin(state)
        for driver in self._drivers:
            driver.on_train_begin(state)

    def _on_step_end(self, state) -> None:
        for driver in self._drivers:
            driver.on_step_end(state)

    def _stateful_parts(self) -> dict:
        parts = {"token_weighting": self.token_weighting, "sample_weighting": self.sample_weighting, "mixture": self.mixture}
        for driver in self._drivers:
            parts.update(driver.state_parts())
        return parts
