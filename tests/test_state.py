"""Strategy state is saved in every checkpoint and restored on resume, so a resumed run continues exactly."""

import os

import pytest
import torch
from helpers import assert_same_step_logs, logged_by_step, pad_collate, tiny_model, toy_dataset, training_args

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


def _mixture_trainer(out, max_steps, mixture, kwargs, mode="resample"):
    args = WeightedTrainingArguments(
        **training_args(
            str(out), max_steps=max_steps, gradient_accumulation_steps=2, per_device_train_batch_size=2,
            learning_rate=1e-2, optim="adamw_torch", train_sampling_strategy="random", save_strategy="steps", save_steps=3,
        ),
        mixture=mixture,
        mixture_mode=mode,
        mixture_kwargs=kwargs,
    )
    return WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(40), data_collator=pad_collate)


@pytest.mark.parametrize(
    "mixture,kwargs,mode",
    [
        ("static", {"weights": {"code": 0.7, "prose": 0.2, "math": 0.1}}, "resample"),
        ("odm", {"warmup_steps": 1}, "resample"),
        ("odm", {"warmup_steps": 1}, "upweight"),
    ],
)
def test_resume_mixture_and_sampler_exactly(tmp_path, mixture, kwargs, mode):
    """Resample mode: the same rows in the same order after resume (the sampler restores its position itself);
    the controller's state (ODM's EXP3 estimates) continues exactly."""
    straight = _mixture_trainer(tmp_path / "straight", 6, mixture, kwargs, mode)
    straight.train()
    _mixture_trainer(tmp_path / "resumed", 3, mixture, kwargs, mode).train()
    resumed = _mixture_trainer(tmp_path / "resumed", 6, mixture, kwargs, mode)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))

    keys = ("loss", "mixture/code", "domain_loss/code", "domain_loss/prose", "domain_loss/math")
    assert_same_step_logs(logged_by_step(straight, keys), logged_by_step(resumed, keys), steps=(4, 5, 6))


def test_step_log_comparison_keeps_absent_domains_apart():
    """The resume comparison: a domain absent from the same step of both runs matches; absent from one only, or a
    different value, fails."""
    straight = {4: {"loss": 4.0, "domain_loss/code": 3.5}, 5: {"loss": 3.9, "domain_loss/code": 3.4, "domain_loss/math": 4.2}}
    assert_same_step_logs(straight, {4: dict(straight[4]), 5: dict(straight[5])}, steps=(4, 5))
    with pytest.raises(AssertionError, match="step 4: logged"):
        assert_same_step_logs(straight, {4: {**straight[4], "domain_loss/math": 4.1}, 5: straight[5]}, steps=(4, 5))
    with pytest.raises(AssertionError, match="step 5: logged"):
        assert_same_step_logs(straight, {4: straight[4], 5: {"loss": 3.9, "domain_loss/code": 3.4}}, steps=(4, 5))
    with pytest.raises(AssertionError, match="step 5, domain_loss/math"):
        assert_same_step_logs(straight, {4: straight[4], 5: {**straight[5], "domain_loss/math": 4.3}}, steps=(4, 5))


def test_resample_follows_the_mixture(tmp_path):
    """With α = (code 0.9, …) the sampler draws code rows about 90% of the time."""
    trainer = _mixture_trainer(tmp_path, 1, "static", {"weights": {"code": 0.9, "prose": 0.05, "math": 0.05}})
    sampler = trainer._get_train_sampler()
    domains = trainer.train_dataset["domain"]
    drawn = [domains[i] for _ in range(10) for i in iter(sampler)]  # 10 epochs of 40 draws
    assert 0.84 < drawn.count("code") / 400 < 0.96
