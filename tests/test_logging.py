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
