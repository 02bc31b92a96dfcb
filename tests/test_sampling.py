"""The resample mode: DomainSampler (map-style) and MixtureIterableDataset (streaming)."""

from __future__ import annotations

import itertools

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from helpers import roundtrip
from torch.utils.data import BatchSampler, DataLoader

from hfweight.sampling import DomainSampler, MixtureIterableDataset

# three domains of very different sizes: rows 0–4, 5–104, 105–1104
ROWS = [list(range(0, 5)), list(range(5, 105)), list(range(105, 1105))]


def domain_of(index: int) -> int:
    return 0 if index < 5 else 1 if index < 105 else 2


def chi_square(counts, probs) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


CHI2_DF2_999 = 13.82  # 99.9 % quantile of χ² with 2 degrees of freedom (the tests are deterministic anyway)



# ---- DomainSampler ------------------------------------------------------------------------------------------------


def test_empirical_frequencies_match_alpha():
    alpha = [0.2, 0.3, 0.5]
    sampler = DomainSampler(ROWS, alpha, seed=3, batch_size=100, num_samples=20_000)
    counts = [0, 0, 0]
    for index in sampler:
        counts[domain_of(index)] += 1
    assert chi_square(counts, alpha) < CHI2_DF2_999


def test_deterministic_for_a_seed():
    a = list(DomainSampler(ROWS, [0.2, 0.3, 0.5], seed=7, batch_size=8, num_samples=200))
    b = list(DomainSampler(ROWS, [0.2, 0.3, 0.5], seed=7, batch_size=8, num_samples=200))
    c = list(DomainSampler(ROWS, [0.2, 0.3, 0.5], seed=8, batch_size=8, num_samples=200))
    assert a == b and a != c


class Controller:
    """Stands in for a mixture controller on one rank: every rank updates it identically after each step."""

    def __init__(self):
        self.step = 0

    def probabilities(self):
        shift = (self.step % 3) / 10
        return torch.tensor([0.2 + shift, 0.3, 0.5 - shift], dtype=torch.float64)


def test_two_ranks_shard_disjoint_and_complete_global_batches():
    per_device, world, steps = 4, 2, 12
    global_batch = per_device * world
    reference_controller = Controller()
    reference = DomainSampler(ROWS, reference_controller, seed=11, batch_size=global_batch, num_samples=steps * global_batch)
    expected, it = [], iter(reference)
    for _ in range(steps):
        expected.append([next(it) for _ in range(global_batch)])
        reference_controller.step += 1

    controllers = [Controller() for _ in range(world)]
    shards = [
        iter(BatchSamplerShard(
            BatchSampler(DomainSampler(ROWS, controllers[r], seed=11, batch_size=global_batch, num_samples=steps * global_batch), per_device, drop_last=False),
            num_processes=world, process_index=r,
        ))
        for r in range(world)
    ]
    for step in range(steps):
        batches = [next(shards[r]) for r in range(world)]  # each rank's micro-batch of this step
        assert batches[0] + batches[1] == expected[step]  # complete, in order
        positions = [set(range(r * per_device, (r + 1) * per_device)) for r in range(world)]
        assert positions[0].isdisjoint(positions[1])
        for controller in controllers:  # the mixture update at the step boundary, identical on every rank
            controller.step += 1


def test_probability_change_applies_from_next_global_batch():
    calls = []

    def source():
        calls.append(1)
        return [1.0, 0.0, 0.0]

    sampler = DomainSampler(ROWS, source, seed=0, batch_size=8, num_samples=24)
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    sampler.set_probabilities([0.0, 0.0, 1.0])
    rest_of_batch = [next(it) for _ in range(5)]
    next_batch = [next(it) for _ in range(8)]
    assert {domain_of(i) for i in first + rest_of_batch} == {0}
    assert {domain_of(i) for i in next_batch} == {2}
    assert len(calls) == 1  # the source was read once, at the start of the first global batch
    assert sampler.last_probabilities.tolist() == [0.0, 0.0, 1.0]


def test_a_domain_that_runs_out_of_rows_starts_a_new_pass():
    sampler = DomainSampler([[0, 1, 2], [3, 4, 5, 6]], [1.0, 0.0], seed=5, batch_size=4, num_samples=12)
    drawn = list(sampler)
    passes = [drawn[i:i + 3] for i in range(0, 12, 3)]
    for group in passes:
        assert sorted(group) == [0, 1, 2]  # each pass is a permutation: no repeat before the domain is exhausted
    assert len({tuple(g) for g in passes}) > 1  # and each pass is reshuffled


def test_from_column_uses_sorted_domains():
    values = ["prose", "code", "prose", "math", "code"]
    sampler = DomainSampler.from_column(values, {"math": 1.0}, seed=0, batch_size=2, num_samples=3)
    assert sampler.domain_names == ["code", "math", "prose"]
    assert list(sampler) == [3, 3, 3]


@pytest.mark.parametrize("half", [40, 37])  # a batch boundary and the middle of a global batch
def test_exact_resume(half):
    n = 80

    def make(controller):
        return DomainSampler(ROWS, controller, seed=21, batch_size=8, num_samples=n)

    straight_controller = Controller()
    straight = make(straight_controller)
    full = []
    for i, index in enumerate(straight):
        full.append(index)
        if (i + 1) % 8 == 0:
            straight_controller.step += 1

    first_controller = Controller()
    first = make(first_controller)
    it, got = iter(first), []
    for i in range(half):
        got.append(next(it))
        if (i + 1) % 8 == 0:
            first_controller.step += 1
    state = roundtrip(first.state_dict())

    second_controller = Controller()
    second_controller.step = first_controller.step
    second = make(second_controller)
    second.load_state_dict(state)
    for i, index in enumerate(second, start=half):  # the resumed epoch yields exactly the rest
        got.append(index)
        if (i + 1) % 8 == 0:
            second_controller.step += 1
    assert got == full


def test_resume_at_consumed_batch_replays_read_ahead_with_recorded_alpha():
    """The loader read two batches past what training consumed; the state is taken at the consumed boundary and the
    read-ahead batches are replayed with the mixture they were drawn with, though the source has changed since."""
    controller = Controller()
    original = DomainSampler(ROWS, controller, seed=2, batch_size=6, num_samples=60)
    it = iter(original)
    drawn = []
    for _ in range(5):  # 5 batches drawn...
        drawn.append([next(it) for _ in range(6)])
        controller.step += 1
    state = roundtrip(original.state_dict(batches_consumed=3))  # ...3 consumed by training
    continuation = [next(it) for _ in range(6)]  # the original's 6th batch, drawn with step-5 weights

    resumed_controller = Controller()
    resumed_controller.step = 5
    resumed = DomainSampler(ROWS, resumed_controller, seed=2, batch_size=6, num_samples=60)
    resumed.load_state_dict(state)
    replay = list(itertools.islice(iter(resumed), 18))
    assert replay == drawn[3] + drawn[4] + continuation
    with pytest.raises(ValueError, match="not among the retained snapshots"):
        DomainSampler(ROWS, controller, seed=2, batch_size=6, snapshots=2).state_dict(batches_consumed=7)


def test_resume_state_rejects_another_sampler():
    state = DomainSampler(ROWS, [1, 1, 1], seed=1, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="saved seed=1"):
        DomainSampler(ROWS, [1, 1, 1], seed=2, batch_size=4).load_state_dict(state)


def test_bad_probabilities_are_clear_errors():
    sampler = DomainSampler(ROWS, lambda: [1.0, float("nan"), 0.0], batch_size=2)
    with pytest.raises(ValueError, match="finite, ≥ 0 and not all 0"):
        next(iter(sampler))
    with pytest.raises(ValueError, match="have no rows"):
        DomainSampler([[0], []], [1, 1])


# ---- MixtureIterableDataset ---------------------------------------------------------------------------------------


def sources(n_a=4000, n_b=4000):
    return {"b": [{"v": 100_000 + i} for i in range(n_b)], "a": [{"v": i} for i in range(n_a)]}


def test_streaming_interleave_frequencies():
    alpha = [0.3, 0.7]  # sorted domains: a, b
    ds = MixtureIterableDataset(sources(), alpha, seed=1, num_samples=5000, domain_column="domain")
    assert ds.domain_names == ["a", "b"]
    rows = list(ds)
    counts = [sum(r["domain"] == "a" for r in rows), sum(r["domain"] == "b" for r in rows)]
    assert len(rows) == 5000 and chi_square(counts, alpha) < 10.83  # χ²(1) 99.9 %
    a_values = [r["v"] for r in rows if r["domain"] == "a"]
    assert a_values == list(range(len(a_values)))  # each stream is read in order, without loss


def test_streaming_resume_by_skipping():
    small = {"a": [{"v": i} for i in range(7)], "b": [{"v": 100 + i} for i in range(5)]}  # forces restarts
    straight = list(itertools.islice(iter(MixtureIterableDataset(small, [0.5, 0.5], seed=4)), 60))
    first = MixtureIterableDataset(small, [0.5, 0.5], seed=4)
    got = list(itertools.islice(iter(first), 25))
    state = roundtrip(first.state_dict())
    second = MixtureIterableDataset(small, [0.5, 0.5], seed=4)
    second.load_state_dict(state)
    got += list(itertools.islice(iter(second), 35))
    assert got == straight


def test_streaming_exhaustion_modes():
    small = {"a": [{"v": i} for i in range(3)], "b": [{"v": 100 + i} for i in range(50)]}
    stop = list(MixtureIterableDataset(small, [0.5, 0.5], seed=0, on_exhausted="stop"))
    assert sum(r["v"] < 100 for r in stop) == 3 and len(stop) < 53
    drop = list(MixtureIterableDataset(small, [0.5, 0.5], seed=0, on_exhausted="drop"))
    assert sorted(r["v"] for r in drop) == list(range(3)) + list(range(100, 150))
    restart = list(itertools.islice(iter(MixtureIterableDataset(small, [0.9, 0.1], seed=0)), 40))
    assert sum(r["v"] < 100 for r in restart) > 3  # the small stream was restarted
    with pytest.raises(RuntimeError, match="yields no rows"):
        list(itertools.islice(iter(MixtureIterableDataset({"a": [], "b": [1]}, [1, 1])), 5))


def test_new_weights_reach_dataloader_workers():
    ds = MixtureIterableDataset(sources(20_000, 20_000), [1.0, 0.0], seed=0, domain_column="domain")
    loader = DataLoader(ds, batch_size=16, num_workers=1, prefetch_factor=2, collate_fn=list)
    it = iter(loader)
    assert {r["domain"] for r in next(it)} == {"a"}
    ds.set_probabilities([0.0, 1.0])  # written in place into shared memory by the main process
    later = [next(it) for _ in range(20)]
    assert {r["domain"] for r in later[-1]} == {"b"}  # after the prefetched batches, the worker follows the new α
    del it


def test_two_workers_split_a_plain_stream_without_duplicates():
    ds = MixtureIterableDataset({"a": [{"v": i} for i in range(40)]}, seed=0, on_exhausted="stop")
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=list)
    values = sorted(r["v"] for batch in loader for r in batch)
    assert values == list(range(40))
