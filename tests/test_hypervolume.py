"""Exact hypervolume, Pareto fronts and the Pareto archive against hand values and brute force."""

import itertools
import math

import numpy as np
import pytest
import torch

from hfweight.hypervolume import (
    ParetoArchive,
    dominates,
    hypervolume,
    hypervolume_gain,
    pareto_front,
    pareto_mask,
)


def _inclusion_exclusion(points, ref):
    """HV = Σ_{∅≠S} (−1)^{|S|+1} vol(∩_{p∈S} [ref, p]); the intersection of boxes is the box of the component-wise min."""
    pts = [np.asarray(p, dtype=float) for p in points]
    ref = np.asarray(ref, dtype=float)
    total = 0.0
    for size in range(1, len(pts) + 1):
        for subset in itertools.combinations(pts, size):
            corner = np.min(np.stack(subset), axis=0)
            total += (-1) ** (size + 1) * float(np.prod(np.clip(corner - ref, 0, None)))
    return total


def _grid_count(points, ref):
    """Integer points: count the unit cells [c, c+1]^d (c ≥ ref) inside some box [ref, p]."""
    pts = np.asarray(points, dtype=int)
    ref = np.asarray(ref, dtype=int)
    hi = pts.max(axis=0)
    count = 0
    for cell in itertools.product(*[range(r, h) for r, h in zip(ref, hi)]):
        upper = np.asarray(cell) + 1
        if np.any(np.all(pts >= upper, axis=1)):
            count += 1
    return count


# ---- hand values --------------------------------------------------------------------------------------------------


def test_2d_staircase_by_hand():
    # boxes [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1]: columns of width 1 and heights 3, 2, 1
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == 6.0
    # shifted reference: widths (1,1,1), heights above y=0.5: 2.5, 1.5, 0.5
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0.5]) == pytest.approx(4.5, abs=1e-15)


def test_3d_boxes_by_hand():
    assert hypervolume([[2, 3, 4]], [0, 0, 0]) == 24.0
    # cube of side 2 plus the part of [0,1]x[0,1]x[0,3] above z = 2: 8 + 1
    assert hypervolume([[2, 2, 2], [1, 1, 3]], [0, 0, 0]) == 9.0
    # three axis-aligned slabs: pairwise intersections 1x1x1 (three of them), triple intersection 1x1x1
    pts = [[3, 1, 1], [1, 3, 1], [1, 1, 3]]
    assert hypervolume(pts, [0, 0, 0]) == 3 * 3 - 3 * 1 + 1


def test_1d_and_empty():
    assert hypervolume([[3.0], [1.0]], [0.5]) == 2.5
    assert hypervolume(np.zeros((0, 2)), [0, 0]) == 0.0
    assert hypervolume([[1.0]], [2.0]) == 0.0


def test_dominated_and_duplicate_points_add_nothing():
    base = [[1, 3], [2, 2], [3, 1]]
    assert hypervolume(base + [[1, 1], [2, 2], [0.5, 2.5]], [0, 0]) == 6.0
    base3 = [[2, 2, 2], [1, 1, 3]]
    assert hypervolume(base3 + [[2, 2, 2], [1, 1, 1], [2, 1, 2]], [0, 0, 0]) == 9.0


def test_points_not_above_the_reference_contribute_nothing():
    assert hypervolume([[-1, 5], [0, 5], [5, 0]], [0, 0]) == 0.0  # below, and on the boundary
    assert hypervolume([[-1, 5], [2, 2]], [0, 0]) == 4.0
    assert hypervolume([[1, 1, -0.5], [1, 1, 1]], [0, 0, 0]) == 1.0


def test_minimization_flags_mirror_maximization():
    pts = np.array([[1.0, 3.0, 2.0], [2.0, 2.5, 1.0], [3.0, 1.0, 0.5]])
    ref = np.array([0.0, 0.0, 0.0])
    flip = np.array([1.0, -1.0, 1.0])
    assert hypervolume(pts * flip, ref * flip, maximize=[True, False, True]) == pytest.approx(hypervolume(pts, ref))
    assert hypervolume(-pts, -ref, maximize=False) == pytest.approx(hypervolume(pts, ref))


def test_accepts_tensors_and_rejects_nan():
    assert hypervolume(torch.tensor([[1.0, 2.0]]), torch.zeros(2)) == 2.0
    with pytest.raises(ValueError, match="NaN"):
        hypervolume([[1.0, float("nan")]], [0.0, 0.0])
    with pytest.raises(ValueError, match="objectives"):
        hypervolume([[1.0, 2.0, 3.0]], [0.0, 0.0])


# ---- brute force --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3, 4])
def test_random_fronts_against_inclusion_exclusion(d):
    rng = np.random.default_rng(100 + d)
    for _ in range(25):
        n = int(rng.integers(1, 8))
        pts = rng.uniform(-0.2, 1.0, size=(n, d))  # some points fall below the reference
        if rng.random() < 0.3:
            pts = np.concatenate([pts, pts[:1]])  # a duplicate
        ref = np.zeros(d)
        assert hypervolume(pts, ref) == pytest.approx(_inclusion_exclusion(pts, ref), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_integer_fronts_against_grid_count(d):
    rng = np.random.default_rng(7 * d)
    for _ in range(10):
        n = int(rng.integers(1, 6))
        pts = rng.integers(0, 5, size=(n, d))
        assert hypervolume(pts, np.zeros(d)) == _grid_count(pts, np.zeros(d, dtype=int))


def test_five_objectives_exact():
    rng = np.random.default_rng(5)
    pts = rng.uniform(0.0, 1.0, size=(6, 5))
    assert hypervolume(pts, np.zeros(5)) == pytest.approx(_inclusion_exclusion(pts, np.zeros(5)), rel=1e-12)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_gain_is_the_difference_of_hypervolumes(d):
    rng = np.random.default_rng(d)
    for _ in range(20):
        archive = rng.uniform(0.0, 1.0, size=(int(rng.integers(0, 6)), d))
        p = rng.uniform(-0.1, 1.1, size=d)
        ref = np.zeros(d)
        expected = _inclusion_exclusion(list(archive) + [p], ref) - _inclusion_exclusion(list(archive), ref)
        assert hypervolume_gain(archive, p, ref) == pytest.approx(max(expected, 0.0), abs=1e-12)


def test_gain_is_exactly_zero_for_dominated_duplicate_or_low_points():
    archive = [[2.0, 2.0, 2.0], [1.0, 3.0, 1.0]]
    ref = [0.0, 0.0, 0.0]
    assert hypervolume_gain(archive, [2.0, 2.0, 2.0], ref) == 0.0
    assert hypervolume_gain(archive, [1.0, 1.5, 2.0], ref) == 0.0
    assert hypervolume_gain(archive, [3.0, 3.0, 0.0], ref) == 0.0
    assert hypervolume_gain([], [1.0, 2.0, 3.0], ref) == 6.0
    # a 2-D hand case: archive (2,1); new (1,2) adds the 1x1 square above it
    assert hypervolume_gain([[2.0, 1.0]], [1.0, 2.0], [0.0, 0.0]) == 1.0


# ---- Pareto front and archive -------------------------------------------------------------------------------------


def test_pareto_front_and_mask():
    pts = [[1, 3], [2, 2], [1, 1], [3, 1], [2, 2], [0, 3]]
    assert pareto_mask(pts).tolist() == [True, True, False, True, False, False]
    assert pareto_front(pts).tolist() == [[1, 3], [2, 2], [3, 1]]
    # minimizing both: (1,1) dominates everything except (0,3)
    assert pareto_front(pts, maximize=False).tolist() == [[1, 1], [0, 3]]
    assert pareto_front(np.zeros((0, 2))).shape == (0, 2)
    assert dominates([2, 2], [1, 2]) and not dominates([2, 2], [2, 2]) and not dominates([3, 1], [1, 3])


def test_archive_keeps_the_nondominated_set_and_round_trips():
    archive = ParetoArchive([0.0, 0.0])
    assert archive.add([1.0, 1.0]) == 1.0
    assert archive.add([0.5, 0.5]) == 0.0  # dominated: not added
    assert archive.add([-1.0, 4.0]) == 0.0  # below the reference in x: not added
    assert archive.add([2.0, 0.5]) == 0.5
    assert archive.add([2.0, 2.0]) == 4.0 - 1.5  # dominates both: they are pruned
    assert archive.points.tolist() == [[2.0, 2.0]]
    assert archive.add([1.0, 3.0]) == 1.0
    assert archive.hypervolume() == 5.0
    assert math.isclose(archive.gain([3.0, 1.0]), 1.0)

    clone = ParetoArchive.from_state_dict(archive.state_dict())
    assert clone.points.tolist() == archive.points.tolist()
    for p in ([3.0, 1.0], [2.5, 2.5], [0.1, 5.0]):
        assert clone.add(p) == archive.add(p)
    assert clone.state_dict() == archive.state_dict()


def test_archive_with_minimized_objective():
    archive = ParetoArchive([0.0, 10.0], maximize=[True, False])
    assert archive.add([1.0, 8.0]) == 2.0
    assert archive.add([1.0, 9.0]) == 0.0
    assert archive.add([2.0, 9.0]) == 1.0
    assert archive.hypervolume() == 3.0
