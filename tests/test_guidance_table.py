"""The cross-corpus guidance table's arithmetic and the benchmarks' warning records: the share of the gap and its
standard error against an independent computation (a bootstrap-free hand formula and numpy), the warning filter and
the "n/m" count of runs that warned."""

from __future__ import annotations

import os
import statistics
import sys
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import guidance_table  # noqa: E402
from common import method_warnings, warned  # noqa: E402


def test_gap_share_of_paired_seeds_is_the_ratio_estimator():
    deltas, oracle = [-0.05, -0.10, -0.03], [-0.10, -0.20, -0.09]
    share, se = guidance_table.gap_share(deltas, oracle)
    d, o = np.array(deltas), np.array(oracle)
    ratio = d.mean() / o.mean()
    assert share == pytest.approx(-0.18 / -0.39)
    # ratio-estimator variance: s²(d − r·o) / (n · ō²), with the sample (n − 1) variance
    assert se == pytest.approx(np.sqrt(np.var(d - ratio * o, ddof=1) / (len(d) * o.mean() ** 2)))


def test_gap_share_of_the_oracle_itself_has_no_error_and_a_proportional_row_none():
    oracle = [-0.1, -0.3, -0.2]
    assert guidance_table.gap_share(oracle, oracle) == pytest.approx((1.0, 0.0))
    share, se = guidance_table.gap_share([x / 2 for x in oracle], oracle)  # half the gap on every seed: no doubt
    assert share == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-12)


def test_gap_share_of_unpaired_seed_counts_treats_the_means_as_independent():
    deltas, oracle = [-0.02, -0.08, -0.05, 0.01, -0.06, -0.04], [-0.10, -0.14, -0.12]
    share, se = guidance_table.gap_share(deltas, oracle)
    d, o = statistics.fmean(deltas), statistics.fmean(oracle)
    se_d = statistics.stdev(deltas) / 6**0.5
    se_o = statistics.stdev(oracle) / 3**0.5
    assert share == pytest.approx(d / o)
    assert se == pytest.approx(((se_d / o) ** 2 + (d / o * se_o / o) ** 2) ** 0.5)


def test_method_warnings_keep_only_the_methods_own_in_order():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("doremi: a domain it feeds does not learn", stacklevel=1)
        warnings.warn("some library: unrelated", stacklevel=1)
        warnings.warn("sample_weighting='loss': a tail that does not learn", stacklevel=1)
        warnings.warn("doremi: a second one", stacklevel=1)
    assert method_warnings(caught, "doremi:") == ["doremi: a domain it feeds does not learn", "doremi: a second one"]
    assert method_warnings(caught, "sample_weighting='loss':") == ["sample_weighting='loss': a tail that does not learn"]
    assert method_warnings(caught, "odm:") == []


def test_warned_counts_only_runs_that_recorded_their_warnings():
    runs = [{"warnings": ["x: fired"]}, {"warnings": []}, {}, {"warnings": ["x: a", "x: b"]}]
    assert warned(runs) == "2/3"
    assert warned([{}, {}]) == "–"
    assert warned([]) == "–"
