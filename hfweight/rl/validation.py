"""Reward validation, for a reward weighter that declares ``needs_validation`` (``hypervolume``; ``constrained`` with
Nelder–Mead): once before training and then every ``reward_validation_steps`` optimizer steps, the trainer runs
``evaluate()`` on ``eval_dataset`` — TRL generates and scores the held-out prompts — and the NaN-robust per-reward mean
of those rewards over all ranks (:func:`~hfweight.rl.advantages.nan_robust_means`) is handed to the weighter. New
weights apply from the next generation batch (as in the authors' code).

While a validation runs, ``trainer._capture_validation`` is the list the reward hook appends each batch's gathered
rewards to (None outside one): the hook tells validation batches from training ones by it.
"""

from __future__ import annotations

import math

import torch

from .advantages import nan_robust_means


class RewardValidation:
    """Runs the validations of one GRPO/RLOO trainer; ``last`` holds the latest per-reward scores."""

    def __init__(self, trainer):
        if trainer.eval_dataset is None:
            raise ValueError(
                f"reward_weighting={trainer.args.reward_weighting!r} learns from validation scores: pass an "
                "`eval_dataset` of held-out prompts (it is generated on and scored with the same reward "
                "functions every `reward_validation_steps` steps)."
            )
        self.trainer = trainer
        self.last: list[float] | None = None

    def on_train_begin(self, state) -> None:
        if state.global_step == 0:  # a resumed run restored the reference point with the weighter's state
            self.run()

    def on_step_end(self, state) -> None:
        if state.global_step % self.trainer.args.reward_validation_steps == 0:
            self.run()

    def run(self) -> list[float]:
        """Generate on ``eval_dataset``, score with the reward functions, hand the per-reward means to the weighter."""
        trainer = self.trainer
        trainer._capture_validation = []
        was_training = trainer.model.training
        # evaluate() logs through the callback handler, which clears `should_log`/`should_evaluate`: called from a
        # step-end callback it would swallow that step's training log. Keep the flags the step had.
        flags = {k: getattr(trainer.control, k) for k in ("should_log", "should_evaluate", "should_save")}
        try:
            trainer.evaluate(metric_key_prefix="reward_validation")
            captured = trainer._capture_validation
            rows = torch.cat(captured) if captured else torch.empty(0, 0)
        finally:
            trainer._capture_validation = None
            trainer.model.train(was_training)
            for key, value in flags.items():
                setattr(trainer.control, key, value)
        if rows.numel() == 0:
            raise RuntimeError("Reward validation produced no rewards: is `eval_dataset` empty?")
        scores = nan_robust_means(rows)
        trainer.reward_weighting.observe_validation(scores, trainer.state.global_step)
        self.last = scores.tolist()
        for name, value in zip(trainer.reward_func_names, self.last):
            if math.isfinite(value):
                trainer._record(f"validation/{name}", value)
        return self.last
