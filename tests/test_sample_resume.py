"""Resume of the loss-based sample weightings is exact: N steps, checkpoint, resume, N steps equals 2N straight steps
(same loss, weights and meta objective at each step). Truncation's buffer: tests/test_state.py."""

import math

import pytest
import torch
from helpers import assert_same_step_logs, logged_by_step, pad_collate, tiny_model, toy_dataset, training_args

from hfweight import WeightedTrainer, WeightedTrainingArguments


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The end-of-training plot (tested elsewhere) costs ~1.5 s per run."""
    monkeypatch.setattr("hfweight.plots.plot_weighting_history", lambda *args, **kwargs: None)


def _trainer(out, max_steps, kwargs, name):
    args = WeightedTrainingArguments(
        **training_args(
            str(out), max_steps=max_steps, gradient_accumulation_steps=2, per_device_train_batch_size=2,
            learning_rate=1e-2, optim="adamw_torch", train_sampling_strategy="random", save_strategy="steps", save_steps=2,
        ),
        sample_weighting=name,
        sample_weighting_kwargs=kwargs,
    )
    return WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(40), data_collator=pad_collate)


KEYS = ("loss", "weights/min", "weights/max", "weights/ess", "storm/meta_objective")


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("loss", {"strategy": "quadratic", "temperature": 0.3}),
        ("storm", {"meta_lr": 0.05, "hidden": 4, "meta_every": 2}),
    ],
    ids=["loss_rescale", "storm_rescale_every2"],
)
def test_resume_continues_exactly(tmp_path, name, kwargs):
    """4 steps straight = 2 steps, checkpoint, resume, 2 steps: the same loss, weights and meta objective at every
    step (`loss` keeps the previous step's range; `storm` its rescaler, Adam state, statistics and meta batch)."""
    straight = _trainer(tmp_path / "straight", 4, kwargs, name)
    straight.train()
    _trainer(tmp_path / "resumed", 2, kwargs, name).train()
    resumed = _trainer(tmp_path / "resumed", 4, kwargs, name)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    expected = logged_by_step(straight, KEYS)
    assert_same_step_logs(expected, logged_by_step(resumed, KEYS), steps=(3, 4))
    if name == "storm":
        assert straight.sample_weighting.meta_steps == resumed.sample_weighting.meta_steps > 0
        for a, b in zip(straight.sample_weighting.rescaler.parameters(), resumed.sample_weighting.rescaler.parameters()):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        # a meta step ran after the resume (global_step 2, on step 2's batch)
        assert not math.isnan(expected[3].get("storm/meta_objective", math.nan))
    assert len({round(v["weights/max"], 6) for v in expected.values()}) > 1  # the weights changed from step to step
