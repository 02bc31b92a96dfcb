"""The small core every Weighted* trainer shares: metrics and logging, checkpointed strategy state, artifacts and the
model card, and the cross-rank helpers.

The supervised glue (:mod:`hfweight.glue.supervised`) and the GRPO/RLOO glue (:mod:`hfweight.rl.glue`) both mix this
class in before their parent trainer. A subclass says whether weighting is on (:meth:`WeightingCore._weighting_on`),
which objects carry state (:meth:`WeightingCore._stateful_parts`) and what a checkpoint must agree on
(:meth:`WeightingCore._state_facts`); the core saves and restores them with every checkpoint, adds the metrics
window to the Trainer's own logs (so every ``report_to`` backend gets them) and writes the artifacts at the end.

With weighting off every override calls the parent unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..card import card_tags, write_weighting_section
from ..state import load_state, resolve_resume_checkpoint, save_state, state_file


class StepBoundaries(TrainerCallback):
    """Hands the Trainer's train-begin and optimizer-step-end events to the trainer's own step-boundary duties
    (:meth:`WeightingCore._on_train_begin`, :meth:`WeightingCore._on_step_end`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin(state)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_step_end(state)


class MetricsWindow:
    """The weighting metrics gathered since the last training log, reduced as they arrive: per key a running total and
    count (keys reduced by the mean), or the running minimum (``*/min`` keys) or maximum (``*/max`` keys).

    Its size is one entry per key however many steps pass between logs, so a run that never logs
    (``logging_strategy="no"``) holds flat memory. The mean adds the values in arrival order, exactly as
    ``sum(values) / len(values)`` over the kept list did, so logged numbers are unchanged.
    """

    def __init__(self):
        self._entries: dict[str, list] = {}  # key -> [reduced value, count]

    def add(self, key: str, value: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = [value, 1]
        elif key.endswith("/min"):
            entry[0] = min(entry[0], value)
        elif key.endswith("/max"):
            entry[0] = max(entry[0], value)
        else:
            entry[0] += value
            entry[1] += 1

    def reduced(self) -> dict[str, float]:
        """Each key's min, max or mean over the window."""
        return {
            key: value if key.endswith(("/min", "/max")) else value / count
            for key, (value, count) in self._entries.items()
        }

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class WeightingCore:
    """Mix in before the parent trainer (through :class:`hfweight.glue.WeightingMixin` or the RL glue).

    Attributes every subclass sets before training: ``mixture`` (a controller or None), ``domain_names`` and
    ``_weighting_metrics`` (see :meth:`_init_core`).
    """

    def _init_core(self) -> None:
        """The empty metrics window and no mixture, before a subclass builds its strategies."""
        self._weighting_metrics = MetricsWindow()
        self.mixture = None
        self.domain_names: list[str] = []
        self._sampler_restores_position = False  # set by a domain sampler that checkpoints its own position

    def _watch_step_boundaries(self) -> None:
        """Call :meth:`_on_train_begin` and :meth:`_on_step_end` from now on (once weighting is known to be on)."""
        self.add_callback(StepBoundaries(self))

    def _on_train_begin(self, state) -> None:
        """Before the first step (also of a resumed run): tell the mixture the run's length."""
        if self.mixture is not None:
            self.mixture.set_total_steps(state.max_steps)

    def _on_step_end(self, state) -> None:
        """After every optimizer step (``state.global_step`` counts it)."""

    # ---- what a subclass answers ---------------------------------------------------------------------------------

    def _weighting_on(self) -> bool:
        """Whether this run has weighting metrics, checkpointed state and artifacts."""
        raise NotImplementedError

    def _stateful_parts(self) -> dict:
        """``{name: object with state_dict/load_state_dict}`` saved in every checkpoint (None entries are skipped)."""
        raise NotImplementedError

    def _state_facts(self) -> dict:
        """What, besides the stateful parts' classes, a checkpoint's weighting state must agree on with this run
        (:func:`hfweight.state.fingerprint`)."""
        return {"domains": list(self.domain_names), "mixture_mode": self.args.mixture_mode if self.mixture is not None else None}

    def _log_window_ready(self) -> bool:
        """Whether a training log (one with ``loss``) should carry the metrics window now."""
        return bool(self._weighting_metrics)

    # ---- metrics and logging ---------------------------------------------------------------------------------------

    def _record(self, key: str, value: float) -> None:
        """Add a value to the window logged with the next training log (``*/min`` and ``*/max`` keys reduce by min
        and max, the others by the mean)."""
        self._weighting_metrics.add(key, value)

    def _add_weighting_logs(self, logs: dict[str, float]) -> None:
        """Add the metrics gathered since the last log and the current mixture to ``logs``."""
        logs.update(self._weighting_metrics.reduced())
        self._weighting_metrics.clear()
        if self.mixture is not None:
            for name, p in zip(self.domain_names, self.mixture.probabilities().tolist()):
                logs[f"mixture/{name}"] = p

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._weighting_on() and "loss" in logs and self._log_window_ready():
            self._add_weighting_logs(logs)
        super().log(logs, *args, **kwargs)

    # ---- cross-rank helpers -------------------------------------------------------------------------------------------

    def _data_parallel_size(self) -> int:
        """Processes whose gradients DDP/ZeRO/FSDP average (replicated TP ranks don't count, as in Trainer)."""
        return self.accelerator.num_processes // self.get_tp_size()

    def _global_batch(self) -> dict[str, int]:
        """The factors of the global batch (rows per optimizer step over all processes)."""
        return {
            "per-device batch": self.args.per_device_train_batch_size,
            "gradient accumulation": self.args.gradient_accumulation_steps,
            "processes": self._data_parallel_size(),
        }

    def _global_batch_size(self) -> int:
        """Rows per optimizer step: per-device batch × gradient accumulation × data-parallel processes."""
        return math.prod(self._global_batch().values())

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """``tensor`` reduced over every process (on this rank's device); unchanged on one process."""
        tensor = tensor.to(self.args.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

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

    def _parameters_sharded(self) -> bool:
        """ZeRO-3 or FSDP: each rank holds a shard of every parameter outside the forward."""
        if getattr(self, "is_fsdp_enabled", False):
            return True
        if getattr(self, "is_deepspeed_enabled", False):
            plugin = self.accelerator.state.deepspeed_plugin
            return plugin is not None and plugin.zero_stage == 3
        return False

    # ---- checkpointing ------------------------------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._weighting_on():
            save_state(output_dir, self._stateful_parts(), self._state_facts(), self.args.process_index, self.args.world_size)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self._weighting_on():
            load_state(checkpoint, self._stateful_parts(), self._state_facts(), self.args.process_index, self.args.world_size)
        elif os.path.exists(state_file(checkpoint, 0)):
            raise ValueError(
                f"{state_file(checkpoint, 0)} holds weighting state but this run has weighting off; resuming would drop "
                "the strategies' state. Resume with the configuration that wrote it (or start a new run from its model)."
            )

    # ---- the run and its artifacts --------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the latest *complete* checkpoint (the parent may pick a half-written one)
            resume_from_checkpoint = resolve_resume_checkpoint(True, self.args.output_dir)
        with self._data_skip_owned_by_sampler():
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self._weighting_on() and self.args.should_save:
            self.save_weighting_artifacts(self.args.output_dir)
        return output

    @contextlib.contextmanager
    def _data_skip_owned_by_sampler(self):
        """While training, ``ignore_data_skip=True`` when a domain sampler restores its own position on resume (the
        Trainer must not also skip batches); the user's arguments get their own value back afterwards, so the same
        object reused for another trainer is not silently changed."""
        if not self._sampler_restores_position:
            yield
            return
        own = self.args.ignore_data_skip
        self.args.ignore_data_skip = True
        try:
            yield
        finally:
            self.args.ignore_data_skip = own

    def weighting_record(self) -> dict:
        """What ``weighting_summary.json`` and the model card record: the configuration, the domains, and the final
        weights of every dynamic part (a subclass adds its own, e.g. reward weights, by extending this dict)."""
        record = {"config": self.args.weighting_summary(), "domains": self.domain_names}
        if self.mixture is not None:
            record["final_mixture"] = dict(zip(self.domain_names, self.mixture.final_probabilities().tolist()))
        return record

    def save_weighting_artifacts(self, output_dir: str) -> dict[str, str]:
        """Write the weighting summary (JSON), the final mixture (JSON loadable by ``mixture='static'``) and a plot
        of the logged weights to ``output_dir``; return the paths written."""
        from ..plots import plot_weighting_history

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
        section: methods, configuration, final mixture and reward weights, and the plots (see :mod:`hfweight.card`).

        The metadata tags are the parent's (``generated_from_trainer``; TRL adds its ``_tag_names``, e.g. ``trl``,
        ``sft``), the caller's, and ``hfweight`` plus one per method used (:func:`hfweight.card.card_tags`), passed
        through the parent's own ``tags`` argument (its position differs between Trainer and TRL)."""
        if not self._weighting_on():
            return super().create_model_card(*args, **kwargs)
        bound = inspect.signature(super().create_model_card).bind_partial(*args, **kwargs)
        given = bound.arguments.get("tags") or []
        given = [given] if isinstance(given, str) else list(given)
        ours = card_tags(self.args.weighting_summary())
        bound.arguments["tags"] = given + [tag for tag in ours if tag not in given]
        super().create_model_card(*bound.args, **bound.kwargs)
        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        paths = self.save_weighting_artifacts(output_dir)
        plots = [os.path.relpath(p, output_dir) for k, p in paths.items() if p.endswith(".png")]
        write_weighting_section(output_dir, self.weighting_record(), plots)
