"""The driver interface: one capability the weighted step needs beyond the loss.

A strategy declares what it needs with a flag on its base class (:mod:`hfweight.strategies.base`); the glue builds
the matching drivers (:func:`hfweight.glue.drivers.build_drivers`) and calls their hooks, in the drivers' order, at
fixed points of the Trainer's loop. Every hook defaults to doing nothing, so a driver implements only its own.

    train begin ─► on_train_begin
    each optimizer step:
        prefetch ─► before_step ─► sample_weights (one driver may supply v) ─► [step denominator Z]
        each micro-batch: forward ─► after_forward ─► weighted loss ─► backward
        after the last backward ─► close_step (gradient corrections) ─► end_step (strategy updates)
    step end ─► on_step_end
    checkpoint ─► state_parts
"""

from __future__ import annotations

import torch


class Driver:
    """Base class of the glue's capability drivers; ``trainer`` is the Weighted* trainer that runs it."""

    supplies_sample_weights: bool = False
    """Whether :meth:`sample_weights` gives the step's per-sample weights (at most one driver does)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, state) -> None:
        """Before the first optimizer step (of a fresh or a resumed run)."""

    def on_step_end(self, state) -> None:
        """After every optimizer step."""

    def before_step(self, plan, batch_samples: list[dict]) -> None:
        """The step's micro-batches are prefetched; no backward of the step has run."""

    def sample_weights(self, plan, index: int, batch: dict, segments: torch.Tensor, num_samples: int):
        """With ``supplies_sample_weights``: ``v`` of micro-batch ``index`` before the domain factor (None: ones)."""
        raise NotImplementedError

    def after_forward(self, plan, micro) -> None:
        """A micro-batch's forward is done (``micro``: :class:`hfweight.glue.step.MicroBatch`); its weighted loss
        comes next, from ``micro.v`` and ``micro.den_w``, which a driver may replace."""

    def close_step(self, plan, loss: torch.Tensor) -> torch.Tensor:
        """After the step's last backward, before clipping: correct the gradients; return the loss to log."""
        return loss

    def end_step(self, plan) -> None:
        """After every driver's :meth:`close_step`: update strategies from the finished step."""

    def state_parts(self) -> dict:
        """``{name: object with state_dict/load_state_dict}`` this driver adds to every checkpoint."""
        return {}
