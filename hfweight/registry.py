"""Named strategies: one registry per kind of weighting.

A config field such as ``token_weighting="dft"`` is looked up here. Users add their own strategy without touching the
package::

    from hfweight import register_token_weighting
    from hfweight.strategies.base import TokenWeighting

    @register_token_weighting("my_weights")
    class MyWeights(TokenWeighting):
        ...

    WeightedTrainingArguments(..., token_weighting="my_weights", token_weighting_kwargs={...})

A registry may list names reserved for a strategy that has not landed yet as *planned*: selecting one is a clear error
at config time rather than a silent fallback. The four registries below reserve none: every strategy the design names
is implemented and registers itself on import of :mod:`hfweight.strategies`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    """Maps a strategy name to a factory ``factory(**kwargs) -> strategy``.

    Args:
        kind: The config field this registry serves (``"token_weighting"``, ...), used in error messages.
        planned: Names reserved for strategies not available in this version.
    """

    def __init__(self, kind: str, planned: tuple[str, ...] = ()):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        self._planned = set(planned)

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``factory`` (usually a class) under ``name``; re-registering replaces it."""

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            self._factories[name] = factory
            self._planned.discard(name)
            if getattr(factory, "name", None) in (None, ""):
                try:
                    factory.name = name
                except (AttributeError, TypeError):  # plain functions of some types refuse attributes
                    pass
            return factory

        return decorator

    @property
    def available(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def build(self, spec: Any, kwargs: dict | None = None) -> Any:
        """Return a strategy for ``spec``: a registered name (built with ``kwargs``) or an object used as is.

        Raises:
            ValueError: unknown name, a planned name, or kwargs the strategy rejects; the message names the field.
        """
        kwargs = dict(kwargs or {})
        if not isinstance(spec, str):
            if kwargs:
                raise ValueError(
                    f"`{self.kind}_kwargs` was given together with a strategy object for `{self.kind}`; configure the "
                    "object directly and leave the kwargs empty."
                )
            return spec
        if spec in self._planned:
            raise ValueError(
                f"`{self.kind}={spec!r}` is not available yet in this version of hfweight. "
                f"Available: {self.available}."
            )
        if spec not in self._factories:
            raise ValueError(
                f"Unknown `{self.kind}={spec!r}`. Available: {self.available}. "
                f"Register your own with `hfweight.register_{self.kind}(name)`."
            )
        try:
            return self._factories[spec](**kwargs)
        except TypeError as err:
            raise ValueError(f"Bad `{self.kind}_kwargs` for `{self.kind}={spec!r}`: {err}") from err


TOKEN_WEIGHTINGS = Registry("token_weighting")
SAMPLE_WEIGHTINGS = Registry("sample_weighting")
MIXTURES = Registry("mixture")
REWARD_WEIGHTINGS = Registry("reward_weighting")

register_token_weighting = TOKEN_WEIGHTINGS.register
register_sample_weighting = SAMPLE_WEIGHTINGS.register
register_mixture = MIXTURES.register
register_reward_weighting = REWARD_WEIGHTINGS.register
