"""Held-out evaluations a mixture controller asks for (``needs_eval``: Aioli, Skill-it, a policy with held-out
losses): at train begin and after every optimizer step, when :meth:`MixtureController.eval_requested` says so, every
domain's held-out set is evaluated and the per-domain losses handed back (:meth:`MixtureController.observe_eval`)."""

from __future__ import annotations

import torch
from transformers import Trainer

from ..data import split_by_domain
from .base import Driver


class HeldOutEvaluations(Driver):
    def __init__(self, trainer):
        super().__init__(trainer)
        t = trainer
        names = dict(zip(t._domain_values, t.domain_names))
        sets = split_by_domain(t.eval_dataset, t.args.domain_column, names)
        self.sets = {name: data for name, data in sets.items() if name in t.domain_names}
        if not self.sets:
            raise ValueError(
                f"mixture={t.args.mixture!r} learns from per-domain held-out losses: pass `eval_dataset` as a "
                "dict {domain: dataset} or a dataset with the domain column."
            )

    def on_train_begin(self, state) -> None:
        self.serve()

    def on_step_end(self, state) -> None:
        self.serve()

    def serve(self) -> None:
        """Evaluate every domain's held-out set when the controller asks, then feed the losses back (NaN: no set)."""
        t = self.trainer
        if not t.mixture.eval_requested():
            return
        losses = torch.full((len(t.domain_names),), float("nan"), dtype=torch.float64)
        # evaluate() logs, and the callback handler's on_log/on_evaluate clear the step's pending should_log /
        # should_evaluate / should_save: keep them, or the step's own training log and save would be dropped.
        control = t.control
        pending = (control.should_log, control.should_evaluate, control.should_save)
        for i, name in enumerate(t.domain_names):
            if name in self.sets:
                # transformers.Trainer.evaluate directly: these sets are slices of the already prepared eval_dataset,
                # which TRL's SFTTrainer.evaluate would tokenize (and map domains) a second time.
                metrics = Trainer.evaluate(t, eval_dataset=self.sets[name], metric_key_prefix=f"mixture_eval_{name}")
                losses[i] = metrics[f"mixture_eval_{name}_loss"]
        control.should_log, control.should_evaluate, control.should_save = pending
        t.mixture.observe_eval(losses, t.state.global_step)
