"""Exact hypervolume, Pareto fronts and a Pareto archive (used by ``reward_weighting="hypervolume"``,
docs/methods.md#hypervolume).

Conventions
-----------
Every objective is *maximized* unless ``maximize`` says otherwise (a bool for all objectives, or one bool per
objective). The hypervolume of a set ``P`` with respect to a reference point ``r`` is the Lebesgue measure of
``⋃_{p ∈ P} [r, p]`` (the boxes between the reference and each point). A point that does not strictly dominate the
reference in every coordinate spans an empty box and contributes nothing. Dominated and duplicate points contribute
nothing either, so the hypervolume of a set equals that of its Pareto front.

Algorithm
---------
:func:`hypervolume` is the exact "hypervolume by slicing objectives" recursion (HSO; While, Hingston, Barone & Huband,
IEEE TEC 2006 — the algorithm the authors of the hypervolume-guided reward weighting adapt from Fonseca et al. in
``yining610/dynamic-reward-weighting``, file ``verl/utils/reward_score/dynamic_math/hypervolumn_contribution.py``):
sort the points by the last objective, and sum over the slabs between consecutive distinct values of that objective
the slab's thickness times the (d−1)-dimensional hypervolume of the points that reach the slab. The 2-D base case is a
staircase sweep; before recursing into ≥ 3 dimensions the projected points are reduced to their Pareto front.

Complexity for ``n`` points in ``d`` dimensions: ``O(n log n)`` for ``d = 2`` and ``O(n^{d−1} log n)`` time in the worst
case for ``d ≥ 3`` (``O(n² log n)`` for 3-D, ``O(n⁴ log n)`` for 5-D), ``O(n·d)`` memory per recursion level (depth
``d``). This is meant for the small archives of validation points a training run produces (tens of points, ``d ≤ 5``);
it is exact for any ``d``, but becomes slow beyond that. There is no Monte Carlo anywhere.

:func:`hypervolume_gain` (the exclusive contribution of a new point) uses WFG's "limit set" identity
(While, Bradstreet & Barone, IEEE TEC 2012): ``gain(p) = vol([r, p]) − HV({min(a, p) : a ∈ A})`` (component-wise
minimum for maximization), which needs one hypervolume of at most ``|A|`` points instead of two.

Where we differ from the authors' code
--------------------------------------
- Their ``_hypervolume`` does not drop points below the reference (its 1-D base case returns ``max(p) − ref`` even
  when negative, so a worse first point gives a negative "volume"; they then clamp the gain at 0). Here a point that
  does not strictly dominate the reference contributes exactly 0.
- Their buffer keeps every point that ever had a positive gain (dominated ones included). :class:`ParetoArchive` keeps
  only the non-dominated set; the hypervolume is identical, the archive smaller.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "ParetoArchive",
    "dominates",
    "hypervolume",
    "hypervolume_gain",
    "pareto_front",
    "pareto_mask",
]


# ---- input handling -----------------------------------------------------------------------------------------------


def _as_points(points, d: int | None = None, what: str = "points") -> np.ndarray:
    """``(n, d)`` float64 array from a list of points, an array or a tensor (an empty input gives ``(0, d)``)."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().double().numpy()
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        width = d if d is not None else (arr.shape[1] if arr.ndim == 2 else 0)
        return np.zeros((0, width), dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a (n, d) array of points, got shape {tuple(arr.shape)}.")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{what} have {arr.shape[1]} objectives; expected {d}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinite values; the hypervolume is only defined for finite points.")
    return arr


def _as_vector(point, d: int | None = None, what: str = "point") -> np.ndarray:
    if isinstance(point, torch.Tensor):
        point = point.detach().cpu().double().numpy()
    arr = np.asarray(point, dtype=np.float64).reshape(-1)
    if d is not None and arr.size != d:
        raise ValueError(f"{what} has {arr.size} objectives; expected {d}.")
    if arr.size == 0:
        raise ValueError(f"{what} is empty; a point needs at least one objective.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} {arr.tolist()} contains NaN or infinite values.")
    return arr


def _signs(maximize, d: int) -> np.ndarray:
    """+1 for a maximized objective, −1 for a minimized one."""
    if isinstance(maximize, bool | np.bool_):
        return np.full(d, 1.0 if maximize else -1.0)
    flags = list(maximize)
    if len(flags) != d:
        raise ValueError(f"`maximize` has {len(flags)} entries but the points have {d} objectives.")
    return np.array([1.0 if bool(f) else -1.0 for f in flags])


# ---- dominance ----------------------------------------------------------------------------------------------------


def dominates(a, b, maximize=True) -> bool:
    """Whether ``a`` Pareto-dominates ``b``: at least as good in every objective and strictly better in one."""
    a = _as_vector(a, what="a")
    b = _as_vector(b, a.size, what="b")
    s = _signs(maximize, a.size)
    a, b = a * s, b * s
    return bool(np.all(a >= b) and np.any(a > b))


def _nondominated_max(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated points (maximization), keeping the first of identical points. ``O(n² d)``."""
    n = points.shape[0]
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        p = points[i]
        at_least = np.all(points >= p, axis=1)
        better = np.any(points > p, axis=1)
        if np.any(at_least & better):  # some point dominates p
            keep[i] = False
        elif int(np.argmax(at_least & ~better)) < i:  # an identical point came first
            keep[i] = False
    return keep


def pareto_mask(points, maximize=True) -> np.ndarray:
    """Boolean mask ``(n,)`` of the points on the Pareto front (the first of several identical points is kept).

    ``O(n² d)`` time. ``maximize`` is a bool or one bool per objective.
    """
    arr = _as_points(points)
    if arr.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return _nondominated_max(arr * _signs(maximize, arr.shape[1]))


def pareto_front(points, maximize=True) -> np.ndarray:
    """The non-dominated points of ``points`` as a float64 ``(m, d)`` array, in their original order, without
    duplicates. ``O(n² d)`` time."""
    arr = _as_points(points)
    if arr.shape[0] == 0:
        return arr
    return arr[pareto_mask(arr, maximize)].copy()


# ---- hypervolume --------------------------------------------------------------------------------------------------


def _hv2(points: np.ndarray, ref: np.ndarray) -> float:
    """2-D staircase sweep (maximization; points strictly above ``ref``). ``O(n log n)``."""
    order = np.argsort(-points[:, 0], kind="stable")
    area = 0.0
    y_top = ref[1]
    for i in order:
        x, y = points[i, 0], points[i, 1]
        if y > y_top:
            area += (x - ref[0]) * (y - y_top)
            y_top = y
    return float(area)


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    """HSO recursion (maximization; every point strictly above ``ref`` in every coordinate)."""
    n, d = points.shape
    if n == 0:
        return 0.0
    if d == 1:
        return float(points[:, 0].max() - ref[0])
    if d == 2:
        return _hv2(points, ref)
    order = np.argsort(-points[:, -1], kind="stable")
    q = points[order]
    total = 0.0
    for i in range(n):
        hi = q[i, -1]
        lo = q[i + 1, -1] if i + 1 < n else ref[-1]
        if hi <= lo:  # ties: the slab is empty until the last of the tied points
            continue
        sub = q[: i + 1, :-1]
        if d - 1 >= 3 and sub.shape[0] > 1:
            sub = sub[_nondominated_max(sub)]
        total += (hi - lo) * _hv(sub, ref[:-1])
    return float(total)


def _above(points: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return points[np.all(points > ref, axis=1)] if points.shape[0] else points


def hypervolume(points, reference, maximize=True) -> float:
    """Exact hypervolume of ``points`` ``(n, d)`` with respect to ``reference`` ``(d,)``.

    Maximization by default (``maximize`` may also be one bool per objective; for a minimized objective the reference
    must lie above the points). Points not strictly dominating the reference contribute nothing; dominated and
    duplicate points contribute nothing. Time ``O(n^{d−1} log n)`` worst case (``O(n log n)`` for ``d ≤ 2``).
    """
    ref = _as_vector(reference, what="reference")
    arr = _as_points(points, ref.size)
    s = _signs(maximize, ref.size)
    arr, ref = arr * s, ref * s
    arr = _above(arr, ref)
    if arr.shape[0] == 0:
        return 0.0
    if arr.shape[1] >= 3 and arr.shape[0] > 1:
        arr = arr[_nondominated_max(arr)]
    return _hv(arr, ref)


def _gain_max(archive: np.ndarray, p: np.ndarray, ref: np.ndarray) -> float:
    """Exclusive hypervolume of ``p`` over ``archive`` (maximization, oriented inputs). Exactly 0 when ``p`` is weakly
    dominated by an archive point or does not strictly dominate ``ref``."""
    if not np.all(p > ref):
        return 0.0
    if archive.shape[0] and np.any(np.all(archive >= p, axis=1)):
        return 0.0
    box = float(np.prod(p - ref))
    if archive.shape[0] == 0:
        return box
    limited = _above(np.minimum(archive, p), ref)
    if limited.shape[0] and limited.shape[1] >= 3 and limited.shape[0] > 1:
        limited = limited[_nondominated_max(limited)]
    return max(box - _hv(limited, ref), 0.0)


def hypervolume_gain(archive, new_point, reference, maximize=True) -> float:
    """Hypervolume added by ``new_point`` to ``archive``: ``HV(A ∪ {p}) − HV(A)`` ≥ 0.

    Exactly 0 when the point is weakly dominated by an archive point (a duplicate included) or does not strictly
    dominate the reference. Computed with WFG's limit set (see the module docstring): one hypervolume of at most
    ``|A|`` points, ``O(|A|^{d−1} log |A|)``.
    """
    ref = _as_vector(reference, what="reference")
    p = _as_vector(new_point, ref.size, what="new_point")
    arr = _as_points(archive, ref.size, what="archive")
    s = _signs(maximize, ref.size)
    return _gain_max(arr * s, p * s, ref * s)


class ParetoArchive:
    """A non-dominated set of points with a fixed reference point, grown by hypervolume gain.

    :meth:`add` inserts a point only if it adds hypervolume (it is then, by construction, not dominated by the
    archive) and drops the archive points it weakly dominates. The authors' buffer
    (``verl/trainer/ppo/ray_trainer_vanilla.py``: ``if hv_contribution > 0: self.buffer.append(...)``) applies the same
    rule but never prunes; the hypervolume is the same.

    Implements ``state_dict()`` / ``load_state_dict()`` (the :class:`hfweight.strategies.base.Stateful` protocol; not
    subclassed here so this module stays importable without the strategies package).

    Args:
        reference: The reference point ``(d,)``.
        maximize: A bool, or one bool per objective.
    """

    def __init__(self, reference, maximize=True):
        self.reference = _as_vector(reference, what="reference")
        self.d = self.reference.size
        self._signs = _signs(maximize, self.d)
        self._points = np.zeros((0, self.d), dtype=np.float64)  # original orientation

    @property
    def points(self) -> np.ndarray:
        """The archive's points ``(m, d)`` (a copy), in insertion order."""
        return self._points.copy()

    def __len__(self) -> int:
        return self._points.shape[0]

    def hypervolume(self) -> float:
        return hypervolume(self._points, self.reference, maximize=self._signs > 0)

    def gain(self, point) -> float:
        """Hypervolume ``point`` would add (does not modify the archive)."""
        p = _as_vector(point, self.d)
        return _gain_max(self._points * self._signs, p * self._signs, self.reference * self._signs)

    def add(self, point) -> float:
        """Insert ``point`` if it adds hypervolume; return the gain (0 if the point was not inserted)."""
        p = _as_vector(point, self.d)
        g = self.gain(p)
        if g > 0:
            oriented = self._points * self._signs
            keep = ~np.all(oriented <= p * self._signs, axis=1)
            self._points = np.concatenate([self._points[keep], p[None, :]], axis=0)
        return g

    def state_dict(self) -> dict:
        return {
            "reference": self.reference.tolist(),
            "maximize": (self._signs > 0).tolist(),
            "points": self._points.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.reference = _as_vector(state["reference"], what="reference")
        self.d = self.reference.size
        self._signs = _signs(list(state["maximize"]), self.d)
        pts = state["points"]
        self._points = _as_points(pts, self.d) if len(pts) else np.zeros((0, self.d), dtype=np.float64)

    @classmethod
    def from_state_dict(cls, state: dict) -> ParetoArchive:
        archive = cls(state["reference"], list(state["maximize"]))
        archive.load_state_dict(state)
        return archive
