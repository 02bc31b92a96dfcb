"""Mixture runs shared by the 1-rank tests and the 2-rank worker (tests/scripts/mixture_worker.py)."""

from __future__ import annotations

import tempfile

import torch.nn.functional as F
from helpers import pad_collate, tiny_model, toy_dataset, toy_rows, training_args
from transformers import TrainerCallback

from hfweight import WeightedTrainer, WeightedTrainingArguments
from hfweight.sampling import DomainSampler, MixtureIterableDataset

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


# ---- shared by tests/test_mixture_trainer.py and tests/test_mixture_resume.py -------------------------------------

NAMES = ["code", "math", "prose"]  # sorted domains of toy_rows


class RecordingCollator:
    """pad_collate that keeps every collated batch (the loader reads ahead: the first GA batches are step 0's)."""

    def __init__(self):
        self.batches = []

    def __call__(self, features):
        batch = pad_collate(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def _trainer(tmp_path, dataset, collator=pad_collate, eval_dataset=None, callbacks=None, **overrides):
    weighting = {k: overrides.pop(k) for k in list(overrides) if k.startswith("mixture") or k == "domain_column"}
    args = WeightedTrainingArguments(**training_args(str(tmp_path), **overrides), **weighting)
    return WeightedTrainer(
        model=tiny_model(), args=args, train_dataset=dataset, eval_dataset=eval_dataset, data_collator=collator,
        callbacks=callbacks,
    )


def _token_sum(model, batch, select=None):
    """Σ of token losses (optionally over selected shifted positions) and the token count, in plain PyTorch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    keep = (labels != -100).reshape(-1)
    if select is not None:
        keep = keep & select.reshape(-1)
    return (nll * keep).sum(), keep.sum()


class RecordingTrainer(WeightedTrainer):
    """Records the rows of every micro-batch trained on, and the mixture at each step."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", [])
        self.seen.append((self.state.global_step, inputs["input_ids"].clone()))
        return super().training_step(model, inputs, num_items_in_batch)


def _stream(rows=None, **kwargs):
    rows = rows if rows is not None else toy_rows(30)
    by_domain = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append({k: r[k] for k in ("input_ids", "labels")})
    return MixtureIterableDataset(by_domain, seed=3, **kwargs)


def _stream_trainer(out, max_steps, dataset, mixture="odm", kwargs=None, cls=RecordingTrainer):
    args = WeightedTrainingArguments(
        **training_args(
            str(out), max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=1e-2, optim="adamw_torch", save_strategy="steps", save_steps=3,
        ),
        mixture=mixture, mixture_mode="resample", mixture_kwargs=kwargs if kwargs is not None else {"warmup_steps": 1},
    )
    return cls(model=tiny_model(), args=args, train_dataset=dataset, data_collator=pad_collate)


def _by_step(trainer):
    out = {}
    for step, ids in trainer.seen:
        out.setdefault(step, []).append(ids.tolist())
    return out
