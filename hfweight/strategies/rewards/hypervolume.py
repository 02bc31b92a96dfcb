"""Hypervolume-guided reward weighting (Lu et al. 2025, ``yining610/dynamic-reward-weighting``)
(docs/methods.md#hypervolume).

Validation-driven: the exact hypervolume gain of each validation point over a Pareto archive either scales the whole
reward (``variant="scalar"``, the authors' ``m = 0.5 + 1.5·tanh(gain)``) or moves weight toward the objectives whose
improvement added the volume (``"per_objective"``, default: ``log p ← log p + eta·z``, ``eta`` 0.1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ...hypervolume import ParetoArchive
from ...registry import register_reward_weighting
from ..checks import choice, number
from .base import F64, Weighter, as_f64, floats, kwarg, per_reward_spec, resolve_per_reward, simplex_log_weights


@register_reward_weighting("hypervolume")
class HypervolumeWeighting(Weighter):
    """Hypervolume-guided weighting (Lu et al. 2025, ``yining610/dynamic-reward-weighting``).

    Driven by validation, not by the training batch: the glue calls :meth:`observe_validation` with the per-reward
    validation means ``(K,)``; :meth:`weights` returns the current weights (they change only on validation, and apply
    from the next call).

    Reference point and archive. The first call sets the reference ``r = s₀ − reference_margin`` and puts ``s₀`` in a
    :class:`~hfweight.hypervolume.ParetoArchive`. The authors (``verl/trainer/ppo/ray_trainer_vanilla.py``) use
    ``r = s₀`` exactly, with an empty archive; then a later point has volume only if it beats ``s₀`` in *every*
    objective, and one that improves accuracy while holding the format score gets nothing. With the margin and ``s₀``
    in the archive, a point gains hypervolume as soon as it improves any objective without falling below ``r``, and
    a point equal to ``s₀`` gains exactly 0. Each later call computes the exact gain of the new point over the archive
    (``verl/utils/reward_score/dynamic_math/hypervolumn_contribution.py``: ``compute_score``); points with a positive
    gain join the archive (as in their code), dominated archive points are pruned (HV unchanged).

    Variants:

    - ``"scalar"`` — the authors' code: one multiplier ``m = 0.5 + 1.5·tanh(gain)`` on the whole reward (``m = 1``
      until the first gain is known), i.e. weights ``m·w0``. With GRPO's std-normalized advantages (and with TRL's
      ``normalize_then_sum``, which standardizes the sum again) a common positive factor cancels exactly: the scalar
      variant then changes nothing. It matters only without std normalization (RLOO's default,
      ``scale_rewards="none"``), where it rescales the reward against the KL term.
    - ``"per_objective"`` (default) — moves weight toward the objectives whose improvement adds hypervolume. With
      ``s`` the new point and ``s⁻`` the previous validation point, the marginal contribution of objective k is
      ``c_k = gain(s) − gain(s with s_k replaced by min(s_k, s⁻_k))``: how much of the gain is lost if objective k
      had not improved (0 when it did not improve; ``c_k ≥ 0`` because the gain is monotone). With shares
      ``z = c / Σc``: ``log p ← log p + eta·z``, weights ``= (Σ w0) · softmax(log p)``, starting from
      ``p = w0/Σw0`` (so every initial weight must be > 0). Shares are unit-free (the raw gain is a volume in the
      product of the K score units, which is why it is not used as the step size). No gain → no move. A joint
      improvement of several objectives is credited to each of them (removing any one loses it), so simultaneous
      progress keeps the weights balanced while one-sided progress pulls weight toward that side.

    Args:
        variant: ``"per_objective"`` or ``"scalar"``.
        eta: step size of the exponentiated update (per_objective), default 0.1 — the same per-step scale as the
            gradient method's ``lr/reg`` in the authors' scripts.
        reference_margin: subtracted from the first validation point to form the reference (a number or one per
            reward), default 1e-3 (in score units: the width of the sliver credited to the initial point).
        maximize: a bool or one per reward (validation scores of reward functions are maximized by default).
    """

    needs_validation = True

    def __init__(self, weights=None, variant: str = "per_objective", eta: float = 0.1, reference_margin=1e-3,
                 maximize=True):
        super().__init__(weights)
        self.variant = choice(variant, kwarg("variant"), ("per_objective", "scalar"))
        self.eta = number(eta, kwarg("eta"), low=0.0)
        if isinstance(reference_margin, int | float) and not isinstance(reference_margin, bool):
            number(reference_margin, kwarg("reference_margin"), low=0.0, low_open=True)
        else:
            for key, v in per_reward_spec(reference_margin, "reference_margin"):
                if not float(v) > 0:
                    raise ValueError(f"{kwarg('reference_margin')} gives {key!r} the margin {v!r}; margins must be > 0.")
        self._margin_spec = reference_margin
        if not isinstance(maximize, bool) and not (
            isinstance(maximize, Sequence) and all(isinstance(m, bool) for m in maximize)
        ):
            raise ValueError(f"{kwarg('maximize')} must be a bool or a list of bools, got {maximize!r}.")
        self._maximize_spec = maximize

    def _check_initial(self, w0):
        if self.variant == "per_objective" and len(self.reward_names) > 1:
            self._require_positive(w0)

    def _reset(self):
        k = len(self.reward_names)
        if isinstance(self._margin_spec, int | float):
            self._margin = [float(self._margin_spec)] * k
        else:
            self._margin = [float(v) for v in resolve_per_reward(self._margin_spec, self.reward_names,
                                                                  "reference_margin")]
        if isinstance(self._maximize_spec, bool):
            self._maximize = [self._maximize_spec] * k
        else:
            if len(self._maximize_spec) != k:
                raise ValueError(f"{kwarg('maximize')} has {len(self._maximize_spec)} entries; expected one per "
                                 f"reward function (K = {k}: {self.reward_names}).")
            self._maximize = list(self._maximize_spec)
        w0 = self.initial_weights
        self._total = float(w0.sum())
        self._log_p = simplex_log_weights(w0)
        self._multiplier = 1.0
        self._archive: ParetoArchive | None = None
        self._prev: list[float] | None = None
        self._last_gain = 0.0
        self._last_contrib = [0.0] * k
        self._observations = 0

    @property
    def reference(self) -> list[float] | None:
        """The hypervolume reference point (``None`` before the first validation)."""
        return None if self._archive is None else self._archive.reference.tolist()

    @property
    def multiplier(self) -> float:
        return self._multiplier

    def _current(self) -> torch.Tensor:
        w0 = self.initial_weights
        if self.variant == "scalar":
            return w0 * self._multiplier
        if len(self.reward_names) == 1:
            return w0.clone()
        return self._total * torch.softmax(self._log_p, dim=0)

    def _single_is_initial(self) -> bool:
        return self.variant == "per_objective"

    def _compute(self, rewards, step):
        return self._current()

    def observe_validation(self, scores, step: int) -> float:
        """Record the per-reward validation means ``(K,)``; return the hypervolume gain (0 for the first call, which
        sets the reference). A NaN score (no validation value for that reward) keeps the previous value of that
        coordinate, with a warning; the first call must be NaN-free."""
        self._require_bound()
        k = len(self.reward_names)
        s = as_f64(scores).flatten()
        if s.numel() != k:
            raise ValueError(f"observe_validation got {s.numel()} scores; expected one per reward function "
                             f"(K = {k}: {self.reward_names}).")
        if torch.isinf(s).any():
            raise ValueError(f"validation scores {s.tolist()} contain ±inf.")
        self._observations += 1
        if self._archive is None:
            if torch.isnan(s).any():
                raise ValueError(f"The first validation scores {s.tolist()} set the hypervolume reference and must not "
                                 "contain NaN; every reward function must score the validation set.")
            sign = torch.tensor([1.0 if m else -1.0 for m in self._maximize], dtype=F64)
            ref = s - sign * torch.tensor(self._margin, dtype=F64)
            self._archive = ParetoArchive(ref.tolist(), maximize=self._maximize)
            self._archive.add(s.tolist())
            self._prev = s.tolist()
            self._last_gain = 0.0
            return 0.0
        if torch.isnan(s).any():
            warnings.warn(f"validation scores {s.tolist()} contain NaN; those coordinates keep their previous value.",
                          stacklevel=2)
            s = torch.where(torch.isnan(s), torch.tensor(self._prev, dtype=F64), s)
        point = s.tolist()
        gain = self._archive.gain(point)
        if self.variant == "scalar":
            self._multiplier = 0.5 + 1.5 * math.tanh(gain)
        elif gain > 0 and k > 1:
            contrib = []
            for j in range(k):
                worse = list(point)
                if self._maximize[j]:
                    worse[j] = min(point[j], self._prev[j])
                else:
                    worse[j] = max(point[j], self._prev[j])
                contrib.append(max(gain - self._archive.gain(worse), 0.0))
            self._last_contrib = contrib
            total = sum(contrib)
            if total > 0:
                z = torch.tensor(contrib, dtype=F64) / total
                self._log_p = torch.log_softmax(self._log_p + self.eta * z, dim=0)
        self._archive.add(point)
        self._prev = point
        self._last_gain = gain
        self._last = self._current()
        return gain

    def metrics(self):
        out = super().metrics()
        out["hypervolume/gain"] = self._last_gain
        out["hypervolume/multiplier"] = self._multiplier
        if self._archive is not None:
            out["hypervolume/archive_size"] = float(len(self._archive))
            out["hypervolume/value"] = self._archive.hypervolume()
        return out

    def _state(self):
        return {
            "log_p": floats(self._log_p),
            "multiplier": self._multiplier,
            "archive": None if self._archive is None else self._archive.state_dict(),
            "prev": None if self._prev is None else list(self._prev),
            "last_gain": self._last_gain,
            "last_contrib": list(self._last_contrib),
            "observations": self._observations,
        }

    def _load(self, state):
        self._log_p = torch.tensor(state["log_p"], dtype=F64)
        self._multiplier = float(state["multiplier"])
        self._archive = None if state["archive"] is None else ParetoArchive.from_state_dict(state["archive"])
        self._prev = None if state["prev"] is None else [float(v) for v in state["prev"]]
        self._last_gain = float(state["last_gain"])
        self._last_contrib = [float(v) for v in state["last_contrib"]]
        self._observations = int(state["observations"])
