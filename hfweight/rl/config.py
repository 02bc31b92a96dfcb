"""The GRPO/RLOO configurations: :class:`RewardWeightingArguments` (the weighting fields plus what only the online RL
trainers need, checked when the config is built) and the two Weighted configs built on TRL's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trl import GRPOConfig, RLOOConfig

from ..config import WeightingArguments

MIXTURE_REWARD_SIGNALS = ("learnability", "regret")
"""The per-domain signals a prompt-domain mixture can learn from
(:func:`~hfweight.rl.advantages.domain_reward_signal`)."""


@dataclass
class RewardWeightingArguments(WeightingArguments):
    """The weighting fields plus what only the online RL trainers need."""

    reward_validation_steps: int = field(
        default=10,
        metadata={
            "help": "For validation-driven reward weighting (hypervolume; constrained with Nelder–Mead): evaluate the "
            "reward functions on `eval_dataset` before training and then every this many optimizer steps (the "
            "authors validate after every step; each validation generates completions for the whole eval set)."
        },
    )
    reward_gradient_parameters: str | None = field(
        default=None,
        metadata={
            "help": "For reward_weighting='gradient': a regular expression selecting the parameters whose gradients "
            "form the Gram matrix (e.g. 'layers\\.(10|11)\\.'); None = every trainable parameter."
        },
    )
    mixture_reward_signal: str = field(
        default="learnability",
        metadata={
            "help": "Per-domain signal a prompt-domain mixture learns from: 'learnability' (variance of the combined "
            "reward within each prompt's group; p(1-p) for 0/1 rewards) or 'regret' (1 - mean combined reward)."
        },
    )

    supervised_loss = False
    OPTIONAL_NAME_FIELDS = (*WeightingArguments.OPTIONAL_NAME_FIELDS, "reward_gradient_parameters")

    def validate_rl_weighting(self) -> None:
        """Refuse fields the RL trainers would silently ignore and check the RL-only ones, when the config is built."""
        trainer = type(self).__name__.replace("Config", "Trainer")
        ignored = (
            ("reference_model", None, "the reference GRPO/RLOO regularize towards is TRL's own (the initial policy, "
             "loaded when `beta` > 0); hfweight's `reference_model` feeds reference-based token weightings and "
             "mixtures, which the RL trainers do not have"),
            ("loss_normalization", "token", "the policy loss is TRL's own; its normalization is TRL's `loss_type`"),
            ("allow_negative_weights", False, "it admits negative `sample_weight`/`token_weights` columns, which the "
             "RL trainers do not read; a negative reward weight goes in `reward_weights`"),
        )
        for name, default, why in ignored:
            if getattr(self, name) != default:
                raise ValueError(f"`{name}={getattr(self, name)!r}` has no effect in {trainer}: {why}. Drop the field.")
        for name in ("token_weighting", "sample_weighting"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"`{name}` weights a supervised loss; {trainer}'s policy loss has no per-token cross-entropy to "
                    "weight. Use `reward_weighting` (and `mixture` for prompt domains), or run SFT with "
                    "WeightedSFTTrainer."
                )
        if self.mixture is not None and self.mixture_mode != "resample":
            raise ValueError(
                f"{trainer} applies a prompt-domain mixture by resampling prompts; set mixture_mode='resample' "
                f"(got {self.mixture_mode!r})."
            )
        if isinstance(self.reward_validation_steps, bool) or not isinstance(self.reward_validation_steps, int) or (
            self.reward_validation_steps < 1
        ):
            raise ValueError(f"`reward_validation_steps` must be an integer ≥ 1, got {self.reward_validation_steps!r}.")
        if self.mixture_reward_signal not in MIXTURE_REWARD_SIGNALS:
            raise ValueError(
                f"`mixture_reward_signal` must be one of {MIXTURE_REWARD_SIGNALS}, got {self.mixture_reward_signal!r}."
            )
        if self.reward_gradient_parameters is not None:
            weighting = self.build_reward_weighting()
            if weighting is None or not weighting.needs_gram:
                raise ValueError(
                    f"`reward_gradient_parameters={self.reward_gradient_parameters!r}` only selects the parameters of "
                    f"reward_weighting='gradient''s gradient Gram; with reward_weighting={self.reward_weighting!r} it has "
                    "no effect. Drop it or set reward_weighting='gradient'."
                )
            try:
                re.compile(self.reward_gradient_parameters)
            except re.error as err:
                raise ValueError(
                    f"`reward_gradient_parameters` is not a valid regular expression: {err}."
                ) from err

    @property
    def rl_weighting_enabled(self) -> bool:
        """Whether reward weighting or a prompt-domain mixture is on: the RL trainers' switch (the supervised loss's
        ``weighting_enabled`` stays off here)."""
        return self.reward_weighting is not None or self.mixture is not None


@dataclass
class WeightedGRPOConfig(RewardWeightingArguments, GRPOConfig):
    """``trl.GRPOConfig`` plus the weighting fields (:class:`RewardWeightingArguments`)."""

    def __post_init__(self):
        super().__post_init__()
        self.validate_rl_weighting()


@dataclass
class WeightedRLOOConfig(RewardWeightingArguments, RLOOConfig):
    """``trl.RLOOConfig`` plus the weighting fields (:class:`RewardWeightingArguments`).

    RLOO does not standardize advantages by default (``normalize_advantages=False``) and folds the KL penalty into the
    reward, so the absolute scale of the reward weights matters, not only their ratios. Every built-in dynamic
    weighter keeps the total of the initial weights fixed (``saw``, ``gradient``, ``hypervolume`` per-objective,
    ``constrained``: ``Σ w = K − 1``); ``popart`` does so here by default (``fixed_sum=True`` unless set).
    """

    def __post_init__(self):
        super().__post_init__()
        if self.reward_weighting == "popart" and "fixed_sum" not in self.reward_weighting_kwargs:
            self.reward_weighting_kwargs = {**self.reward_weighting_kwargs, "fixed_sum": True}
        self.validate_rl_weighting()
