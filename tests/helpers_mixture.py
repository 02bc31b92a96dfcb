"""Mixture runs shared by the 1-rank tests and the 2-rank worker (tests/scripts/mixture_worker.py)."""

from __future__ import annotations

import tempfile

from helpers import pad_collate, tiny_model, toy_dataset, toy_rows, training_args
from transformers import TrainerCallback

from hfweight import WeightedTrainer, WeightedTrainingArguments
from hfweight.sampling import DomainSampler

ROW_INDEX = {tuple(r["input_ids"]): i for i, r in enumerate(toy_rows(40))}


class _Recording(WeightedTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = [ROW_INDEX[tuple(x for x in ids if x != 0)] for ids in inputs["input_ids"].tolist()]
        self.trained.setdefault(self.state.global_step, []).extend(rows)
        return super().training_step(model, inputs, num_items_in_batch)


class _Probabilities(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.by_step = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = self.trainer.mixture.probabilities().tolist()


def resample_run(batch: int, ga: int, steps: int = 4, mixture="odm", kwargs=None) -> dict:
    """A resample run on toy rows: per step, the rows this rank trained on, the mixture used, and the global batches
    its DomainSampler drew (indices of the whole optimizer step, before accelerate shards them)."""
    drawn = []
    original = DomainSampler._draw_batch

    def recording_draw(self):
        original(self)
        drawn.append(list(self._buffer))

    DomainSampler._draw_batch = recording_draw
    try:
        args = WeightedTrainingArguments(
            **training_args(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                            gradient_accumulation_steps=ga, learning_rate=1e-2),
            mixture=mixture, mixture_mode="resample", mixture_kwargs=kwargs if kwargs is not None else {"warmup_steps": 1},
        )
        callback = _Probabilities()
        trainer = _Recording(model=tiny_model(), args=args, train_dataset=toy_dataset(40), data_collator=pad_collate,
                             callbacks=[callback])
        trainer.trained = {}
        callback.trainer = trainer
        trainer.train()
    finally:
        DomainSampler._draw_batch = original
    return {"trained": trainer.trained, "probabilities": callback.by_step, "global_batches": drawn[:steps]}


def dga_alignment(batch: int, ga: int) -> dict:
    """The first DGA alignment (step 0) of a resample run: inner products, squared norms, signal."""
    args = WeightedTrainingArguments(
        **training_args(tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=ga),
        mixture="dga", mixture_mode="resample",
        mixture_kwargs={"target": ["math", "prose"], "target_batch_size": 5, "update_every": 1, "eta": 0.5},
    )
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(40),
                              eval_dataset=toy_dataset(12, seed=1), data_collator=pad_collate)
    trainer.train()
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in trainer.last_alignment.items()}
