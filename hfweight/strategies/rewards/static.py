"""``static`` reward weighting: the configured weights, unchanged (docs/methods.md#static-reward)."""

from __future__ import annotations

from ...registry import register_reward_weighting
from .base import Weighter


@register_reward_weighting("static")
class StaticWeighting(Weighter):
    """The configured weights, unchanged: the config's ``reward_weights`` or ``reward_weighting_kwargs['weights']``
    (a list in reward order, or a ``{reward name: weight}`` dict naming every reward). Negative weights are allowed
    (a penalty), as in TRL."""

    def _compute(self, rewards, step):
        return self.initial_weights.clone()
