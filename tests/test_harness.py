"""The benchmark harness (benchmarks/harness.py) on two trivial variants: result structure, ratios, order, output."""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import pad_collate, tiny_model, toy_dataset, training_args
from transformers import Trainer, TrainingArguments

from hfweight import WeightedTrainer, WeightedTrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import harness  # noqa: E402

STEPS, WARMUP, REPEATS = 2, 1, 2
CALLS: list[str] = []


def _make(name: str, trainer_cls, args_cls, output_dir: str):
    CALLS.append(name)
    args = args_cls(**training_args(output_dir, logging_strategy="no", remove_unused_columns=False))
    data = toy_dataset(16).select_columns(["input_ids", "labels"])
    return trainer_cls(model=tiny_model(), args=args, train_dataset=data, data_collator=pad_collate)


def make_parent(output_dir="/tmp/hfw_harness_parent"):
    return _make("parent", Trainer, TrainingArguments, output_dir)


def make_weighted(output_dir="/tmp/hfw_harness_weighted"):
    return _make("weighted", WeightedTrainer, WeightedTrainingArguments, output_dir)


def _check(result: harness.Comparison, isolate: bool):
    assert result.baseline == "parent" and result.isolate is isolate
    assert (result.steps, result.warmup, result.repeats) == (STEPS, WARMUP, REPEATS)
    assert list(result.variants) == ["parent", "weighted"]
    for summary in result.variants.values():
        assert len(summary.runs) == REPEATS
        for run in summary.runs:
            assert len(run.step_times) == len(run.cpu_times) == STEPS
            assert all(t > 0 for t in run.step_times + run.cpu_times)
            assert run.peak_rss_mib > 0 and run.peak_increase_mib >= 0 and run.memory_method
        for spread in (summary.step_s, summary.ratio, summary.cpu_s, summary.cpu_ratio, summary.peak_rss_mib):
            assert set(spread) == {"median", "min", "max"}
            assert 0 < spread["min"] <= spread["median"] <= spread["max"]
    for ratio in (result.variants["parent"].ratio, result.variants["parent"].cpu_ratio):
        assert ratio == {"median": 1.0, "min": 1.0, "max": 1.0}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """One in-process comparison shared by the tests below (a few seconds)."""
    root = tmp_path_factory.mktemp("harness")
    CALLS.clear()
    variants = {
        "parent": lambda: make_parent(str(root / "parent")),
        "weighted": lambda: make_weighted(str(root / "weighted")),
    }
    result = harness.compare(
        variants, steps=STEPS, warmup=WARMUP, repeats=REPEATS, progress=None, settings={"model": "toy"}
    )
    return result, list(CALLS)


def test_compare_structure_and_ratios(comparison):
    _check(comparison[0], isolate=False)


def test_order_alternates_between_repeats(comparison):
    """So drift within a repeat does not always fall on the same variant."""
    assert comparison[1] == ["parent", "weighted", "weighted", "parent"]


def test_report_writes_markdown_and_json(comparison, tmp_path):
    markdown = harness.report(comparison[0], "demo", results_dir=str(tmp_path), title="Demo")
    assert (tmp_path / "demo.md").read_text() == markdown
    assert "| `parent` |" in markdown and "| `weighted` |" in markdown and "model=toy" in markdown
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["baseline"] == "parent"
    assert saved["variants"]["parent"]["ratio"]["median"] == 1.0
    assert saved["variants"]["weighted"]["ratio"]["median"] > 0
    assert "torch" in saved["environment"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="baseline"):
        harness.compare({"a": make_parent}, steps=1, warmup=0, repeats=1, baseline="b")
    with pytest.raises(ValueError, match="steps"):
        harness.compare({"a": make_parent}, steps=0, warmup=0, repeats=1)


@pytest.mark.slow
def test_compare_isolated():
    """Each run in a spawned subprocess: factories travel by reference, so they must be module-level."""
    result = harness.compare(
        {"parent": make_parent, "weighted": make_weighted}, steps=STEPS, warmup=WARMUP, repeats=1, isolate=True
    )
    assert result.isolate and all(len(s.runs) == 1 for s in result.variants.values())
    assert result.variants["parent"].ratio["median"] == 1.0 and result.variants["weighted"].ratio["median"] > 0
