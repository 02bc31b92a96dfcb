"""Two ranks (gloo): identical mixture probabilities on both ranks at every step, the ranks' shards of every global
batch disjoint and complete; the per-domain statistics the controller receives are the sum of both ranks' rows; DGA's
inner products under DDP equal the 1-rank ones (no double counting), and per-shard partial sums reduce to the exact
products for sharded (DTensor) gradients."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from helpers import run_two_ranks
from helpers_mixture import dga_alignment, resample_run

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("ranks") / "out")
    run_two_ranks(os.path.join(HERE, "scripts", "mixture_worker.py"), prefix)
    return [json.load(open(f"{prefix}.rank{r}.json")) for r in (0, 1)]


@pytest.mark.multiprocess
def test_two_ranks_same_probabilities_and_disjoint_complete_shards(ranks):
    a, b = ranks[0]["resample"], ranks[1]["resample"]
    assert a["probabilities"] == b["probabilities"]  # bit-identical on both ranks, every step
    assert len({tuple(p) for p in a["probabilities"].values()}) > 1  # and DoReMi did move them
    assert a["global_batches"] == b["global_batches"] and len(a["global_batches"]) == 4
    for step, batch in enumerate(a["global_batches"]):
        mine, theirs = a["trained"][str(step)], b["trained"][str(step)]
        assert len(batch) == 8 and len(mine) == len(theirs) == 4
        assert Counter(mine) + Counter(theirs) == Counter(batch)  # complete, and together no row twice
    # the global batches are the ones a single process draws with the same per-step batch (8 = 4 × GA 2 × 1 rank),
    # as long as the mixture is the same: compare the first step, drawn before any update
    single = resample_run(4, 2, steps=1, mixture="doremi", kwargs={})
    assert single["global_batches"][0] == a["global_batches"][0]


@pytest.mark.multiprocess
def test_two_rank_dga_alignment_equals_one_rank(ranks):
    one = dga_alignment(2, 2)  # the same 4 rows per step as 2 ranks × batch 2 × GA 1
    for r in ranks:
        for key in ("inner_products", "squared_norms", "target_squared_norm", "signal"):
            assert r["dga"][key] == pytest.approx(one[key], rel=1e-5, nan_ok=True), key


@pytest.mark.multiprocess
def test_sharded_partial_products_are_exact(ranks):
    for r in ranks:
        assert r["sharded"]["sharded"]
        assert r["sharded"]["got"] == pytest.approx(r["sharded"]["expected"], rel=1e-6)


@pytest.mark.multiprocess
def test_two_rank_domain_statistics_are_the_sum_of_both_ranks_shares(ranks):
    """Each rank's controller receives the same per-domain statistics, equal to the sum of both ranks' shares, each
    recomputed by hand from the rows that rank trained on (an un-reduced or double-counted sum fails)."""
    a, b = ranks[0]["domain_stats"], ranks[1]["domain_stats"]
    assert a["received"] == b["received"] and len(a["received"]) == 2
    for got, mine, theirs in zip(a["received"], a["local"], b["local"]):
        assert mine != theirs  # the ranks trained on different rows
        np.testing.assert_allclose(np.array(got), np.array(mine) + np.array(theirs), rtol=1e-5, atol=1e-6)


def test_two_ranks_same_learning_progress_mixture(ranks):
    """learning_progress learns from all-reduced per-domain losses: bit-identical mixtures on both ranks at every
    step, moved by the run, and each step's shards complete and disjoint."""
    a, b = ranks[0]["learning_progress"], ranks[1]["learning_progress"]
    assert a["probabilities"] == b["probabilities"] and len(a["probabilities"]) == 6
    assert len({tuple(p) for p in a["probabilities"].values()}) >= 3
    assert a["global_batches"] == b["global_batches"]
    for step, batch in enumerate(a["global_batches"]):
        assert Counter(a["trained"][str(step)]) + Counter(b["trained"][str(step)]) == Counter(batch)
