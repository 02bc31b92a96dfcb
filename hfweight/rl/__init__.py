"""``WeightedGRPOTrainer`` / ``WeightedRLOOTrainer``: TRL's online RL trainers with multi-objective reward weighting
and prompt-domain mixtures (docs/methods.md#rewards).

TRL computes the rewards of a generation batch in ``_calculate_rewards`` (gathered over all ranks, shape
``(N, K)``: N completions of the whole generation batch, K reward functions, NaN where a function returned None) and
reads ``self.reward_weights`` right after, to combine them. That is the one hook the glue uses:

1. **Every training generation batch**: the reward weighter sees the batch's ``(N, K)`` rewards and returns the
   weights TRL then applies to *this* batch (``static``, ``popart``, ``saw``, ``constrained`` use the batch itself;
   ``hypervolume`` and ``gradient`` return the weights their last update produced). Evaluation batches use the
   current weights without touching the weighter's state (:mod:`hfweight.rl.glue`).
2. **Validation** (``hypervolume``; ``constrained`` with Nelder–Mead): held-out rewards before training and every
   ``reward_validation_steps`` optimizer steps (:mod:`hfweight.rl.validation`).
3. **Gradient Gram** (``gradient``): one backward per reward function of TRL's own policy loss after each training
   generation batch (:mod:`hfweight.rl.gram`).
4. **Prompt-domain mixtures** (``mixture=...`` with a ``domain`` column on the prompts): prompts drawn by domain, the
   controller learning from a per-domain reward signal (:mod:`hfweight.rl.prompts`).

All of it — weights, archives, multipliers, momentum, running statistics, mixture and sampler state — is saved in
each checkpoint and restored on resume (:mod:`hfweight.state`); weights are logged every step
(``reward_weight/<name>``) and plotted to ``weighting.png`` at the end of training.

With ``reward_weighting=None`` and ``mixture=None`` every override calls the parent unchanged (exact parity).

Modules: :mod:`~hfweight.rl.config` (the configs), :mod:`~hfweight.rl.advantages` (pure functions of the rewards),
:mod:`~hfweight.rl.prompts`, :mod:`~hfweight.rl.validation`, :mod:`~hfweight.rl.gram` (the optional parts) and
:mod:`~hfweight.rl.glue` (the mixin and the two trainers).
"""

from .advantages import combined_rewards, domain_reward_signal, group_advantages, nan_robust_means
from .config import MIXTURE_REWARD_SIGNALS, RewardWeightingArguments, WeightedGRPOConfig, WeightedRLOOConfig
from .glue import RewardWeightingMixin, WeightedGRPOTrainer, WeightedRLOOTrainer
from .prompts import DomainRepeatSampler

__all__ = [
    "MIXTURE_REWARD_SIGNALS",
    "DomainRepeatSampler",
    "RewardWeightingArguments",
    "RewardWeightingMixin",
    "WeightedGRPOConfig",
    "WeightedGRPOTrainer",
    "WeightedRLOOConfig",
    "WeightedRLOOTrainer",
    "combined_rewards",
    "domain_reward_signal",
    "group_advantages",
    "nan_robust_means",
]
