"""Example mixture policies for ``mixture="policy"`` (the ``(history) -> weights`` interface of learned mixers).

A policy receives the history the :class:`hfweight.strategies.mixture.PolicyMixture` keeps (a list of dicts, oldest
first: ``step``, ``probabilities``, ``losses`` and the latest ``eval_losses``) and returns ``{domain: weight}``. Use one
from YAML with ``mixture_kwargs: {policy: "hfweight.policies:upweight_high_loss"}``.
"""

from __future__ import annotations


def upweight_high_loss(history: list[dict], window: int = 10, power: float = 1.0) -> dict:
    """Weights proportional to each domain's mean training loss over the last ``window`` steps (raised to ``power``):
    a simple "train more where the loss is high" baseline. A domain never seen in the window keeps its current weight's
    share (so it is not starved before it is measured)."""
    recent = history[-window:]
    names = list(recent[-1]["probabilities"])
    sums = {n: [entry["losses"][n] for entry in recent if entry["losses"].get(n) is not None] for n in names}
    seen = {n: sum(v) / len(v) for n, v in sums.items() if v}
    if not seen:
        return dict(recent[-1]["probabilities"])
    scores = {n: seen[n] ** power for n in seen}
    total_seen = sum(scores.values())
    mass_seen = sum(recent[-1]["probabilities"][n] for n in seen)
    out = {n: mass_seen * scores[n] / total_seen for n in seen}
    for n in names:
        if n not in seen:
            out[n] = recent[-1]["probabilities"][n]
    return out
