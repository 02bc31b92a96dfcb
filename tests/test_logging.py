"""Weight statistics reach every report_to backend (they all listen through TrainerCallback.on_log)."""

import math

import pytest
from helpers import pad_collate, tiny_model, toy_dataset, training_args
from transformers import TrainerCallback

from hfweight import WeightedTrainer, WeightedTrainingArguments


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_weight_statistics_are_logged(tmp_path):
    dataset = toy_dataset(8)
    recorder = Recorder()
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2),
        sample_weighting="static",
        mixture="static",
        mixture_mode="upweight",
        mixture_kwargs={"weights": {"code": 2, "prose": 1, "math": 1}},
    )
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=dataset, data_collator=pad_collate, callbacks=[recorder])
    trainer.train()
    logs = recorder.logs[0]
    # v_i = sample_weight_i · α_d / q_d over the step's 8 rows
    natural = {d: dataset["domain"].count(d) / 8 for d in ("code", "prose", "math")}
    alpha = {"code": 0.5, "prose": 0.25, "math": 0.25}
    v = [r["sample_weight"] * alpha[r["domain"]] / natural[r["domain"]] for r in dataset]
    s, s2 = sum(v), sum(x * x for x in v)
    assert logs["weights/ess"] == pytest.approx(s * s / s2, rel=1e-5)
    assert logs["weights/ess_fraction"] == pytest.approx(s * s / s2 / 8, rel=1e-5)
    assert logs["weights/min"] == pytest.approx(min(v), rel=1e-5) and logs["weights/max"] == pytest.approx(max(v), rel=1e-5)
    p = [x / s for x in v]
    assert logs["weights/entropy"] == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-5)
    assert logs["mixture/code"] == pytest.approx(0.5)
    assert {"domain_loss/code", "domain_loss/prose", "domain_loss/math"} <= set(logs)
    assert (tmp_path / "weighting.png").exists() and (tmp_path / "mixture_weights.json").exists()


class WindowSizes(TrainerCallback):
    """The metrics window's stored size after every optimizer step."""

    def __init__(self):
        self.trainer = None
        self.sizes = []

    def on_step_end(self, args, state, control, **kwargs):
        window = self.trainer._weighting_metrics
        self.sizes.append(sum(len(entry) for entry in window._entries.values()))


def _loss_weighted_trainer(out, callbacks, **fields):
    args = WeightedTrainingArguments(
        **training_args(str(out), learning_rate=1e-3, **fields),
        sample_weighting="loss",
        mixture="static",
        mixture_mode="upweight",
        mixture_kwargs={"weights": {"code": 2, "prose": 1, "math": 1}},
    )
    return WeightedTrainer(
        model=tiny_model(), args=args, train_dataset=toy_dataset(32), data_collator=pad_collate, callbacks=callbacks
    )


def test_metrics_window_bounded_when_nothing_logs(tmp_path):
    """logging_strategy='no': the window is never emptied by a log, yet holds one entry per key, whatever the steps."""
    sizes = WindowSizes()
    trainer = _loss_weighted_trainer(tmp_path, [sizes], max_steps=24, logging_strategy="no")
    sizes.trainer = trainer
    recorded = []
    original = trainer._record
    trainer._record = lambda key, value: (recorded.append(key), original(key, value))
    trainer.train()
    assert len(recorded) > 24 * 5  # values keep arriving every step ...
    assert sizes.sizes[1] > 0 and set(sizes.sizes[1:]) == {sizes.sizes[1]}  # ... the stored window does not grow


def test_logged_window_values_are_the_mean_min_max_of_what_was_recorded(tmp_path):
    """Each log carries, per key, the mean (min/max for */min, */max keys) of the values recorded since the last log
    (computed here from the raw values, independently of the window)."""
    raw: dict[str, list[float]] = {}
    expected_logs = []

    class Expect(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                expected_logs.append(({
                    key: min(v) if key.endswith("/min") else max(v) if key.endswith("/max") else sum(v) / len(v)
                    for key, v in raw.items()
                }, dict(logs)))
                raw.clear()

    trainer = _loss_weighted_trainer(tmp_path, [Expect()], max_steps=6, logging_steps=3, gradient_accumulation_steps=2)
    original = trainer._record
    trainer._record = lambda key, value: (raw.setdefault(key, []).append(value), original(key, value))
    trainer.train()
    assert len(expected_logs) == 2
    for expected, logged in expected_logs:
        assert {"weights/min", "weights/max", "weights/ess", "domain_loss/code"} <= set(expected)
        assert {key: logged[key] for key in expected} == expected  # exactly: the same additions in the same order
