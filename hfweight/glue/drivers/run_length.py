"""Tells a sample strategy that declares ``needs_run_length`` (loss truncation) how many samples the run will see."""

from __future__ import annotations

from .base import Driver


class RunLength(Driver):
    """Before the first step: ``max_steps`` × the global batch (per-device batch × GA × data-parallel processes)."""

    def on_train_begin(self, state) -> None:
        t = self.trainer
        t.sample_weighting.set_run_length(state.max_steps * t._global_batch_size())
