"""The sample-weighting benchmark's data problems and its oracle arithmetic: ``spoil`` corrupts or duplicates exactly
the rows it reports (the same ones every time), the oracle set is the rest, and "gap closed" is hand-checkable."""

from __future__ import annotations

import os
import sys

import datasets
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_sample_effectiveness as bench  # noqa: E402

VOCAB = 50


def clean_rows(n: int = 40, length: int = 8) -> datasets.Dataset:
    """Rows whose tokens are all 1000 + row index: out of the random-token range, so a corrupted row is recognizable."""
    return datasets.Dataset.from_list([{"input_ids": [1000 + i] * length, "domain": "code"} for i in range(n)])


@pytest.mark.parametrize("problem", ["corrupt", "duplicate"])
def test_spoil_changes_exactly_the_reported_rows(problem):
    train = clean_rows()
    spoiled, bad = bench.spoil(train, problem, 0.3, VOCAB)
    again, bad_again = bench.spoil(train, problem, 0.3, VOCAB)
    assert bad == bad_again and spoiled.to_list() == again.to_list()  # fixed rows, fixed content
    assert len(bad) == 12 and len(spoiled) == len(train)
    originals = train["input_ids"]
    for i, row in enumerate(spoiled):
        if i not in bad:
            assert row == train[i]
        elif problem == "corrupt":
            assert len(row["input_ids"]) == 8 and all(0 <= t < VOCAB for t in row["input_ids"])
        else:  # a copy of one of the few sources, all of them unspoiled rows
            source = originals.index(row["input_ids"])
            assert source not in bad
    if problem == "duplicate":
        assert len({tuple(spoiled[i]["input_ids"]) for i in bad}) == bench.DUPLICATED_SOURCES


def test_gap_closed_hand_worked():
    assert bench.gap_closed(variant_loss=5.0, uniform_loss=5.5, oracle_loss=5.0) == 1.0
    assert bench.gap_closed(variant_loss=5.5, uniform_loss=5.5, oracle_loss=5.0) == 0.0
    assert bench.gap_closed(variant_loss=5.25, uniform_loss=5.5, oracle_loss=5.0) == pytest.approx(0.5)
    assert bench.gap_closed(variant_loss=6.0, uniform_loss=5.5, oracle_loss=5.0) == pytest.approx(-1.0)


def test_corrupt_and_duplicate_always_run_uniform_and_oracle_with_documented_defaults():
    args = bench.parse_args(["--problem", "corrupt", "--variants", "truncation"])
    assert args.variants == ["uniform", "oracle", "truncation"] and args.name == "sample_effectiveness_corrupt_builtin"
    assert bench.DEFAULT_VARIANTS["truncation"] == {"sample_weighting": "truncation"}  # no kwargs: the defaults
    assert bench.parse_args(["--problem", "corrupt", "--variants", "truncation_d0.3", "--only"]).variants == [
        "truncation_d0.3"
    ]
    with pytest.raises(SystemExit):
        bench.parse_args(["--problem", "domains", "--variants", "oracle"])


def test_known_drop_weights_exactly_the_spoiled_rows_zero():
    spoiled, bad = bench.spoil(clean_rows(), "corrupt", 0.3, VOCAB)
    weighted = bench.truth_weighted(spoiled, bad)
    assert weighted["sample_weight"] == [0.0 if i in bad else 1.0 for i in range(len(spoiled))]
    assert weighted["input_ids"] == spoiled["input_ids"]  # same rows, same order: only the column is added


def test_override_changes_one_variants_kwargs(monkeypatch):
    monkeypatch.setattr(bench, "OVERRIDES", {})
    bench.parse_args(["--problem", "corrupt", "--variants", "truncation",
                      "--override", 'truncation={"min_samples": 16}'])
    table = bench.variant_table("corrupt")
    assert table["truncation"] == {"sample_weighting": "truncation", "sample_weighting_kwargs": {"min_samples": 16}}
    assert table["truncation_d0.2"]["sample_weighting_kwargs"] == {"drop_fraction": 0.2}  # other variants untouched
    assert bench.DEFAULT_VARIANTS["truncation"] == {"sample_weighting": "truncation"}  # the defaults are not edited
    with pytest.raises(SystemExit):
        bench.parse_args(["--problem", "corrupt", "--override", 'nope={"a": 1}'])


def test_merge_lets_a_later_file_replace_a_variants_runs(tmp_path):
    def run(variant, seed, loss):
        return {"variant": variant, "seed": seed, "final_clean": loss}

    settings = {"steps": 120, "problem": "corrupt", "corpus": "builtin"}
    first = [run("uniform", 0, 5.0), run("truncation", 0, 4.9), run("storm", 0, 4.95), run("truncation", 1, 4.8)]
    paths = []
    for name, runs in (("a", first), ("b", [run("truncation", 0, 4.7)])):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            bench.json.dump({"settings": settings, "runs": runs}, f)
    args = bench.parse_args(["--problem", "corrupt"])
    args.merge = paths
    merged = bench.merged_runs(args)
    assert [(r["variant"], r["seed"], r["final_clean"]) for r in merged] == [
        ("uniform", 0, 5.0), ("truncation", 0, 4.7), ("storm", 0, 4.95), ("truncation", 1, 4.8)]
    assert args.variants == ["uniform", "truncation", "storm"] and args.seeds == [0, 1]
