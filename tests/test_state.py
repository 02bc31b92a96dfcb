"""Strategy state is saved in every checkpoint and restored on resume, so a resumed run continues exactly."""

import os

import pytest
import torch
from helpers import pad_collate, tiny_model, toy_dataset, training_args

from hfweight import WeightedTrainer, WeightedTrainingArguments, register_sample_weighting
from hfweight.strategies.base import SampleWeighting


@register_sample_weighting("test_counting")
class CountingWeights(SampleWeighting):
    """Stateful on purpose: weights drift with the number of batches seen, so a lost counter changes the losses."""

    def __init__(self):
        self.calls = 0

    def weights(self, ctx):
        self.calls += 1
        return ctx.column * (1.0 + 0.5 * (self.calls % 3))

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def _trainer(out, max_steps, weighting="test_counting", weighting_kwargs=None, **extra):
    args = WeightedTrainingArguments(
        **training_args(
            str(out),
            max_steps=max_steps,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            optim="adamw_torch",
            train_sampling_strategy="random",
            save_strategy="steps",
            save_steps=3,
            **extra,
        ),
        sample_weighting=weighting,
        sample_weighting_kwargs=weighting_kwargs,
    )
    return WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(40), data_collator=pad_collate)


def _losses(trainer):
    return {h["step"]: (h["loss"], h["weights/max"]) for h in trainer.state.log_history if "loss" in h}


def test_resume_continues_exactly(tmp_path):
    straight = _trainer(tmp_path / "straight", 6)
    straight.train()
    first = _trainer(tmp_path / "resumed", 3)
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / "hfweight_state.pt").exists()
    assert torch.load(checkpoint / "hfweight_state.pt", weights_only=False)["objects"]["sample_weighting"] == {"calls": 6}
    resumed = _trainer(tmp_path / "resumed", 6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.sample_weighting.calls == straight.sample_weighting.calls == 12
    expected, got = _losses(straight), _losses(resumed)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_checkpoint_without_state_warns(tmp_path):
    first = _trainer(tmp_path / "a", 3)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    os.remove(checkpoint / "hfweight_state.pt")
    resumed = _trainer(tmp_path / "a", 4)
    resumed.sample_weighting.calls = 99  # non-empty state: a missing file must be reported, not ignored
    with pytest.warns(UserWarning, match="has no hfweight_state.pt"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_resume_truncation_buffer_exactly(tmp_path):
    """Loss truncation's ring buffer and cutoff survive a checkpoint: the resumed run drops the same samples."""
    kwargs = {"drop_fraction": 0.3, "buffer_size": 16, "min_samples": 4, "recompute_every": 2}
    straight = _trainer(tmp_path / "straight", 6, "truncation", kwargs)
    straight.train()
    _trainer(tmp_path / "resumed", 3, "truncation", kwargs).train()
    resumed = _trainer(tmp_path / "resumed", 6, "truncation", kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    expected, got = _losses(straight), _losses(resumed)
    assert any(h.get("weights/min") == 0.0 for h in straight.state.log_history)  # truncation did drop samples
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
