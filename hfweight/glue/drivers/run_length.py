"""Tells a sample strategy that declares ``needs_run_length`` (loss truncation) how many samples the run will see."""

from __future__ import annotations

from .base import Driver


class RunLength(Driver):
    """Before the first step: ``max_steps`` × the global batch (per-device batch × GA × data-parallel processes)."""

    def on_train_begin(self, state) -> None:
        t, args = self.trainer, self.trainer.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * t._data_parallel_size()
        t.sample_weighting.set_run_length(state.max_steps * global_batch)
