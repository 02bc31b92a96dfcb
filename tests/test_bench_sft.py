"""The SFT benchmarks' building blocks: every overhead variant builds and trains one step on the cached workload, the
variants that must agree do (cached vs live reference, weighting off vs ``trl.SFTTrainer``, ``dft`` vs TRL's DFT),
and the effectiveness benchmark's held-out NLL equals ``trl.SFTTrainer``'s own loss on the same rows."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_sft_overhead as overhead  # noqa: E402
import sft_common  # noqa: E402

ROWS, BATCH = 24, 4  # a small cached workload (scored once, ~1 s) and one short step per variant


@pytest.fixture(scope="module")
def step_losses():
    """Each variant's trainer from its benchmark factory, trained one optimizer step: ``{variant: (trainer, loss)}``."""
    sft_common.datasets.disable_progress_bars()
    out = {}
    for variant in overhead.VARIANTS:
        trainer = overhead.variant_factories([variant], batch_size=BATCH, rows=ROWS)[variant]()
        trainer.args.max_steps = 1
        out[variant] = (trainer, trainer.train().training_loss)
    return out


def test_every_variant_builds_and_trains_one_step(step_losses):
    assert set(step_losses) == set(overhead.VARIANTS)
    for variant, (trainer, loss) in step_losses.items():
        assert trainer.state.global_step == 1, variant
        assert math.isfinite(loss) and loss > 0, variant
        weighting, columns, live = overhead.VARIANTS[variant]
        if variant in overhead.PARENT_VARIANTS:
            assert not hasattr(trainer.args, "weighting_enabled"), variant
            continue
        assert trainer.args.token_weighting == weighting.get("token_weighting"), variant
        assert (getattr(trainer, "reference", None) is not None) == live, variant
        for column in ("token_weights", "ref_logps"):
            assert (column in trainer.train_dataset.column_names) == (column in columns), (variant, column)


def test_variants_that_must_agree(step_losses):
    loss = {variant: value for variant, (_, value) in step_losses.items()}
    # The cached column was scored by the live variants' reference model: same step, same loss.
    assert loss["rho1_cached"] == pytest.approx(loss["rho1_live"], rel=1e-5)
    assert loss["prior_cached"] == pytest.approx(loss["prior_live"], rel=1e-5)
    assert loss["weighted_off"] == loss["sft_trainer"]
    assert loss["dft"] == pytest.approx(loss["sft_trainer_dft"], rel=1e-5)
    # and the weightings do change the loss (the comparison is not of identical computations). Not `prior`: with the
    # randomly initialised reference p_ref ≈ 1/vocab, so (1 − p_ref)^α renormalized per sequence is ≈ 1 everywhere.
    for variant in ("static", "dft", "focal", "rho1_cached"):
        assert abs(loss[variant] - loss["sft_trainer"]) > 1e-4, variant


def test_completion_nll_equals_trl_loss():
    """The effectiveness benchmark's held-out NLL (plain PyTorch) equals ``trl.SFTTrainer``'s loss on one batch of
    the same rows (mean NLL over completion tokens)."""
    from trl import SFTConfig, SFTTrainer

    from hfweight.builtin import build_model

    data = overhead.workload(ROWS).select_columns(["input_ids", "labels", "domain"])
    tokenizer = sft_common.sft_tokenizer()
    model = build_model(tokenizer, seed=3)
    ours = sft_common.completion_nll(model, data, batch_size=5)
    args = SFTConfig(output_dir="/tmp/hfw_bench_sft_nll", report_to="none", use_cpu=True, bf16=False, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        theirs = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
    assert ours["all"] == pytest.approx(float(theirs), rel=1e-5)
    assert set(ours) == {*set(data["domain"]), "all"}
    counts = {
        d: sum(sum(y != -100 for y in row[1:]) for row, dd in zip(data["labels"], data["domain"]) if dd == d)
        for d in set(data["domain"])
    }
    total = sum(counts.values())
    assert ours["all"] == pytest.approx(sum(ours[d] * counts[d] for d in counts) / total, rel=1e-6)


def test_compare_regenerates_the_committed_weak_vs_strong_table(tmp_path):
    """``--compare`` (the command in docs/guidance.md) reads the committed per-start results and writes the table
    committed as sft_effectiveness_weak_vs_strong.md, unchanged."""
    import bench_sft_effectiveness as effectiveness

    results = os.path.join(os.path.dirname(effectiveness.__file__), "results")
    labels = {
        "weak, lr 1e-3": "weak", "strong (400), lr 1e-3": "strong", "stronger (1500), lr 1e-3": "stronger",
        "weak, lr 1e-4": "weak_lr1e-4", "strong (400), lr 1e-4": "strong_lr1e-4",
        "stronger (1500), lr 1e-4": "stronger_lr1e-4",
    }
    specs = [f"{label}={os.path.join(results, f'sft_effectiveness_{name}.json')}" for label, name in labels.items()]
    effectiveness.main(["--compare", *specs, "--name", "weak_vs_strong", "--results_dir", str(tmp_path)])
    written = (tmp_path / "weak_vs_strong.md").read_text()
    with open(os.path.join(results, "sft_effectiveness_weak_vs_strong.md")) as f:
        assert written == f.read()
