"""The GRPO/RLOO glue: :class:`RewardWeightingMixin` (mixed in before ``trl.GRPOTrainer`` / ``trl.RLOOTrainer``) and
the two trainers built with it.

The mixin composes the shared core (:class:`hfweight.glue.core.WeightingCore`: metrics window and log, checkpointed
state, artifacts, model card, cross-rank helpers) with the RL parts: the reward hook below, and — each built only when
the configuration asks for it — :class:`~hfweight.rl.prompts.PromptMixture` (``mixture``),
:class:`~hfweight.rl.validation.RewardValidation` (a weighter with ``needs_validation``) and
:class:`~hfweight.rl.gram.RewardGram` (a weighter with ``needs_gram``). It does not inherit the supervised step.

TRL computes the rewards of a generation batch in ``_calculate_rewards`` (gathered over all ranks, shape ``(N, K)``)
and reads ``self.reward_weights`` right after, to combine them: on every *training* generation batch the reward
weighter sees the batch's rewards and returns the weights TRL then applies to this batch; evaluation batches use the
current weights without touching the weighter's state.
"""

from __future__ import annotations

import torch
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from ..config import as_weighted_config
from ..glue.core import WeightingCore
from .config import WeightedGRPOConfig, WeightedRLOOConfig
from .gram import RewardGram
from .prompts import PromptMixture
from .validation import RewardValidation


class RewardWeightingMixin(WeightingCore):
    """Glue shared by :class:`WeightedGRPOTrainer` and :class:`WeightedRLOOTrainer` (mix in before the parent).

    Besides the core's attributes: ``reward_weighting`` (the weighter or None), the optional parts ``_prompts``,
    ``_validation`` and ``_gram`` (None when not configured), ``_capture_validation`` (see
    :mod:`hfweight.rl.validation`) and ``_last_rewards`` (the last training batch's gathered rewards).
    """

    _algorithm = "grpo"

    def _init_weighted(self, parent_init, model, args, **kwargs) -> None:
        """The parent's ``__init__`` with ``args`` as this trainer's Weighted config, then the weighting's setup.

        ``args`` None or a plain ``GRPOConfig``/``RLOOConfig`` becomes the Weighted config with weighting off (as the
        parent builds its default config). The mixture is built before the parent's ``__init__`` (which seeds the
        global RNG), the parts that read the parent's reward functions and datasets after it.
        """
        args = as_weighted_config(self._config_cls, args, model, self._parent_config_cls, self._algorithm.upper())
        self._init_core()
        self.mixture = args.build_mixture()
        self.reward_weighting = None
        self._prompts = self._validation = self._gram = None
        self._capture_validation: list[torch.Tensor] | None = None
        self._last_rewards: torch.Tensor | None = None
        parent_init(model, args=args, **kwargs)
        self._setup_reward_weighting()

    def _setup_reward_weighting(self) -> None:
        """Build the weighter and the parts the configuration asks for (each checks what it needs, e.g. an
        ``eval_dataset`` for validation), and watch the step boundaries; nothing with weighting off."""
        args = self.args
        if not args.rl_weighting_enabled:
            return
        if args.reward_weighting is not None:
            self.reward_weighting = args.build_reward_weighting()
            self.reward_weighting.bind(list(self.reward_func_names), self.reward_weights.clone())
            if self.reward_weighting.needs_validation:
                self._validation = RewardValidation(self)
            if self.reward_weighting.needs_gram:
                self._gram = RewardGram(self)
        if self.mixture is not None:
            self._prompts = PromptMixture(self)
            self.domain_names = self._prompts.domain_names
        self._watch_step_boundaries()

    # ---- what the core asks ----------------------------------------------------------------------------------------

    def _weighting_on(self) -> bool:
        return self.args.rl_weighting_enabled

    def _log_window_ready(self) -> bool:
        """Training logs only (TRL's evaluation logs carry a ``loss`` too)."""
        return self.model.training

    def _add_weighting_logs(self, logs: dict[str, float]) -> None:
        """The core's window and mixture, plus the reward weights in force now (``reward_weight/<name>``)."""
        super()._add_weighting_logs(logs)
        if self.reward_weighting is not None:
            for name, w in zip(self.reward_func_names, self.reward_weighting.current_weights().tolist()):
                logs[f"reward_weight/{name}"] = w

    def _stateful_parts(self) -> dict:
        parts = {"reward_weighting": self.reward_weighting, "mixture": self.mixture}
        if self._prompts is not None and self._prompts.sampler is not None:
            parts["prompt_sampler"] = self._prompts
        return parts

    def _state_facts(self) -> dict:
        return {**super()._state_facts(), "reward_functions": list(self.reward_func_names)}

    def _on_train_begin(self, state) -> None:
        if self._validation is not None:
            self._validation.on_train_begin(state)
        super()._on_train_begin(state)

    def _on_step_end(self, state) -> None:
        if self._validation is not None:
            self._validation.on_step_end(state)
        super()._on_step_end(state)

    def weighting_record(self) -> dict:
        record = super().weighting_record()
        if self.reward_weighting is not None:
            weights = self.reward_weighting.current_weights().tolist()
            record["final_reward_weights"] = dict(zip(self.reward_func_names, weights))
            metrics = self.reward_weighting.metrics()
            multipliers = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("lagrange/")}
            if multipliers:
                record["final_multipliers"] = multipliers
            if self._validation is not None and self._validation.last is not None:
                record["last_validation"] = dict(zip(self.reward_func_names, self._validation.last))
        return record

    # ---- parent hooks ----------------------------------------------------------------------------------------------

    def _training_batch(self) -> bool:
        """Whether the batch being generated and scored is a training one (not evaluation, not validation)."""
        return self.model.training and self._capture_validation is None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self._weighting_on():
            return rewards_per_func
        rewards = rewards_per_func.detach()
        if self._capture_validation is not None:
            self._capture_validation.append(rewards.float().cpu())
        training = self._training_batch()
        if self.reward_weighting is not None:
            if training:
                weights = self.reward_weighting.weights(rewards.float().cpu(), self.state.global_step)
                for key, value in self.reward_weighting.metrics().items():
                    self._record(key, value)
            else:
                weights = self.reward_weighting.current_weights()
            self.reward_weights = weights.clone()
        if training:
            self._last_rewards = rewards
            if self._prompts is not None:
                self._prompts.observe(inputs, rewards, self.reward_weights)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self._weighting_on() and self._training_batch():
            if self._prompts is not None:
                self._prompts.generation_batches += 1
            if self._gram is not None:
                self._gram.update(output, self._last_rewards.float())
        return output

    def _get_train_sampler(self, dataset=None):
        if self._prompts is None:
            return super()._get_train_sampler(dataset)
        return self._prompts.train_sampler(dataset if dataset is not None else self.train_dataset)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self.reward_weighting is not None:
            self.reward_weights = self.reward_weighting.current_weights().clone()
        if self._prompts is not None:
            self._prompts.resumed_from(checkpoint)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._prompts is not None:
            self._prompts.after_fetch()
        return batch_samples, num_items


class WeightedGRPOTrainer(RewardWeightingMixin, GRPOTrainer):
    """Drop-in for ``trl.GRPOTrainer``; with ``reward_weighting`` and ``mixture`` off it is exactly the parent."""

    _algorithm = "grpo"
    _config_cls, _parent_config_cls = WeightedGRPOConfig, GRPOConfig

    def __init__(self, model, reward_funcs=None, args: WeightedGRPOConfig | None = None, train_dataset=None, **kwargs):
        # `reward_funcs` is optional as in the parent (which raises "No reward source provided" without any source).
        self._init_weighted(
            super().__init__, model, args, reward_funcs=reward_funcs, train_dataset=train_dataset, **kwargs
        )


class WeightedRLOOTrainer(RewardWeightingMixin, RLOOTrainer):
    """Drop-in for ``trl.RLOOTrainer``; with ``reward_weighting`` and ``mixture`` off it is exactly the parent.

    RLOO does not standardize advantages by default, so the absolute scale of the reward weights matters: the
    dynamic weighters keep the total of the initial weights fixed (``popart`` with ``fixed_sum``; ``gradient`` and
    ``hypervolume`` per-objective renormalize to ``Σ w0``), see :mod:`hfweight.strategies.rewards`.
    """

    _algorithm = "rloo"
    _config_cls, _parent_config_cls = WeightedRLOOConfig, RLOOConfig

    def __init__(self, model, reward_funcs, args: WeightedRLOOConfig | None = None, train_dataset=None, **kwargs):
        self._init_weighted(
            super().__init__, model, args, reward_funcs=reward_funcs, train_dataset=train_dataset, **kwargs
        )
