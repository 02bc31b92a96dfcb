"""A few optimizer steps under a loss-based sample weighting, recording gradients and weights, for the GA/rank
invariance checks of docs/methods.md#normalization (used in-process and by ``scripts/sample_worker.py`` under 2
ranks)."""

from __future__ import annotations

import datasets
from helpers import GradientCapture, pad_collate, sft_rows, tiny_model, tiny_tokenizer, toy_dataset, training_args
from transformers import TrainerCallback

from hfweight import WeightedSFTConfig, WeightedSFTTrainer, WeightedTrainer, WeightedTrainingArguments

STEPS = 3
ROWS = 8 * STEPS  # 8 rows per optimizer step at (8, 1, 1), (2, 4, 1) and (4, 1, 2)
EMPTY_ROWS = (0, 1)  # every label ignored: NaN losses, weight 0, and at (2, 4, 1) a micro-batch with no valid token
TRUNCATION = {"drop_fraction": 0.4, "min_samples": 4, "buffer_size": 64, "recompute_every": 1}

CONFIGS = {
    "loss_rescale/token": dict(
        sample_weighting="loss", sample_weighting_kwargs={"strategy": "linupper", "temperature": 0.3}
    ),
    "loss_rescale_quadratic+static+domain/sample": dict(
        sample_weighting="loss",
        sample_weighting_kwargs={"strategy": "quadratic", "temperature": 0.5, "mode": "rescale"},
        token_weighting="static",
        loss_normalization="sample",
        mixture="static",
        mixture_mode="upweight",
        mixture_kwargs={"weights": {"code": 0.6, "prose": 0.3, "math": 0.1}},
    ),
    "loss_score/token": dict(
        sample_weighting="loss", sample_weighting_kwargs={"strategy": "extremes", "temperature": 0.4, "mode": "score"}
    ),
    "truncation_rescale/sample": dict(
        sample_weighting="truncation", sample_weighting_kwargs=TRUNCATION, loss_normalization="sample"
    ),
    "storm_rescale/token": dict(sample_weighting="storm", sample_weighting_kwargs={"meta_lr": 0.05, "hidden": 4}),
}


class WeightRecorder(TrainerCallback):
    """After each optimizer step: the sample weights this rank used and the losses they came from."""

    def __init__(self):
        self.trainer = None
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        record = self.trainer.last_sample_weights
        self.steps.append({k: v.detach().clone().double() for k, v in record.items()})


def run_steps(config: dict, batch: int, ga: int, output_dir: str, steps: int = STEPS) -> dict:
    """``{"gradients": [per step {param: grad}], "weights": [per step {"losses", "weights"}]}`` of this rank.

    The model is float64: loss-based weights amplify the last-bit differences between batch layouts (the loss range
    of an untrained model is ~0.1, so ``h = 2ℓ/range`` scales a 1-ulp float32 loss difference by ~20), and the check
    is about exactness, not about float32 rounding."""
    model = tiny_model().double()
    capture, recorder = GradientCapture(model), WeightRecorder()
    base = training_args(
        output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=steps, learning_rate=0.1
    )
    trainer = WeightedTrainer(
        model=model,
        args=WeightedTrainingArguments(**base, **config),
        train_dataset=toy_dataset(ROWS, empty_rows=EMPTY_ROWS),
        data_collator=pad_collate,
        callbacks=[capture, recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    assert len(capture.steps) == steps
    return {"gradients": capture.steps, "weights": recorder.steps}


def run_sft_steps(config: dict, batch: int, ga: int, output_dir: str, steps: int = 2) -> dict:
    """The same through WeightedSFTTrainer (TRL's tokenization of prompt-completion pairs, completion-only loss)."""
    model = tiny_model()
    capture, recorder = GradientCapture(model), WeightRecorder()
    base = training_args(
        output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=steps, learning_rate=0.1
    )
    trainer = WeightedSFTTrainer(
        model=model,
        args=WeightedSFTConfig(**base, max_length=24, bf16=False, **config),
        train_dataset=datasets.Dataset.from_list(sft_rows(8 * steps)),
        processing_class=tiny_tokenizer(),
        callbacks=[capture, recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    return {"gradients": capture.steps, "weights": recorder.steps}
