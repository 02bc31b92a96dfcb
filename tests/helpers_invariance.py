"""One optimizer step under a weighting configuration, for the GA/rank invariance check of
docs/methods.md#normalization."""

from __future__ import annotations

import datasets
from helpers import GradientCapture, pad_collate, sft_rows, tiny_model, tiny_tokenizer, toy_dataset, training_args

from hfweight import WeightedSFTConfig, WeightedSFTTrainer, WeightedTrainer, WeightedTrainingArguments

# 8 rows = one optimizer step at (8, 1, 1), (2, 4, 1) and (4, 1, 2). Rows 0 and 1 have every label ignored, so the
# first micro-batch at (2, 4, 1) has no valid token at all. The loss-based configurations use the scoring pass
# (mode="score"), loss-dependent from the first step; the rescale mode, which uses the previous step's statistics, is
# checked over several steps in tests/test_sample_trainer.py.
EMPTY_ROWS = (0, 1)

CONFIGS = {
    "token_static/token": dict(token_weighting="static"),
    "token_static/sample": dict(token_weighting="static", loss_normalization="sample"),
    "sample_static/token": dict(sample_weighting="static"),
    "sample_static/sample": dict(sample_weighting="static", loss_normalization="sample"),
    "both_static/token": dict(token_weighting="static", sample_weighting="static"),
    "both_static/sample": dict(token_weighting="static", sample_weighting="static", loss_normalization="sample"),
    "dft/token": dict(token_weighting="dft"),
    "focal/sample": dict(token_weighting="focal", token_weighting_kwargs={"gamma": 2.0}, loss_normalization="sample"),
    "prior+sample/token": dict(token_weighting="prior", sample_weighting="static"),
    "loss_extremes/token": dict(
        sample_weighting="loss", sample_weighting_kwargs={"strategy": "extremes", "temperature": 0.4, "mode": "score"}
    ),
    "loss_linupper+prior/sample": dict(
        sample_weighting="loss",
        sample_weighting_kwargs={"strategy": "linupper", "temperature": 0.5, "mode": "score"},
        token_weighting="prior",
        loss_normalization="sample",
    ),
    "domain_upweight+sample/token": dict(
        sample_weighting="static",
        mixture="static",
        mixture_mode="upweight",
        mixture_kwargs={"weights": {"code": 0.6, "prose": 0.3, "math": 0.1}},
    ),
}


def one_step_gradients(config: dict, batch: int, ga: int, output_dir: str, reference=None) -> dict:
    """Gradients of the one optimizer step over the 8 invariance rows, as the optimizer sees them."""
    model = tiny_model()
    capture = GradientCapture(model)
    args = WeightedTrainingArguments(
        **training_args(output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=ga), **config
    )
    trainer = WeightedTrainer(
        model=model,
        args=args,
        train_dataset=toy_dataset(8, empty_rows=EMPTY_ROWS),
        data_collator=pad_collate,
        callbacks=[capture],
        reference_model=reference,
    )
    trainer.train()
    assert len(capture.steps) == 1
    return capture.steps[0]


# WeightedSFTTrainer: the same check through TRL's preparation (tokenized prompt-completion pairs, completion-only
# loss), with and without packing (packed rows keep each sample's weight and domain).
SFT_CONFIGS = {
    "sft_dft+sample/token": dict(token_weighting="dft", sample_weighting="static"),
    "sft_focal+domain/sample": dict(
        token_weighting="focal",
        loss_normalization="sample",
        mixture="static",
        mixture_mode="upweight",
        mixture_kwargs={"weights": {"code": 0.6, "prose": 0.3, "math": 0.1}},
    ),
    "sft_packed_sample/token": dict(sample_weighting="static", packing=True, max_length=12),
}


def one_step_sft_gradients(config: dict, batch: int, ga: int, output_dir: str) -> dict:
    """Gradients of one WeightedSFTTrainer optimizer step over 8 prompt-completion rows (16 when packed)."""
    config = dict(config)
    packing = config.pop("packing", False)
    max_length = config.pop("max_length", 24)
    model = tiny_model()
    capture = GradientCapture(model)
    base = training_args(output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=ga)
    args = WeightedSFTConfig(**base, max_length=max_length, packing=packing, bf16=False, **config)
    trainer = WeightedSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(sft_rows(16 if packing else 8)),
        processing_class=tiny_tokenizer(),
        callbacks=[capture],
    )
    assert len(trainer.train_dataset) >= 8, "the step needs 8 rows"
    trainer.train()
    assert len(capture.steps) == 1
    return capture.steps[0]


SUITES = {"pretrain": (CONFIGS, one_step_gradients), "sft": (SFT_CONFIGS, one_step_sft_gradients)}
