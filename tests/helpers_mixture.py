"""Mixture runs shared by the 1-rank tests and the 2-rank worker (tests/scripts/mixture_worker.py)."""

from __future__ import annotations

import tempfile

import torch
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


# ---- per-domain statistics, recomputed independently ---------------------------------------------------------------

STATS_ROWS = {tuple(r["input_ids"]): r for r in toy_rows(40)}
STATS_FIELDS = ("loss_sum", "token_count", "sample_count", "excess_sum", "ref_loss_sum")


class SnapshotParameters(TrainerCallback):
    """The model's parameters at the start of every optimizer step (what that step's forwards saw)."""

    def __init__(self, model):
        self.model = model
        self.by_step = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def domain_stats_by_hand(parameters: dict, batches: list[dict]) -> list[list[float]]:
    """``[loss_sum; token_count; sample_count; excess_sum; ref_loss_sum]`` per domain (rows: those fields, columns:
    NAMES) of the given
    micro-batches, in plain PyTorch: each row alone (unpadded) through a fresh model carrying ``parameters``; token loss
    ``ℓ_t = −log p(label)``, DoReMi's excess ``max(ℓ_t − ℓ_ref,t, 0)`` with ``ℓ_ref,t = −ref_logps[t]`` of the label's
    position, domains looked up from the raw toy rows."""
    model = tiny_model()
    model.load_state_dict(parameters)
    model.eval()
    sums = torch.zeros(len(STATS_FIELDS), len(NAMES), dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            for ids in batch["input_ids"]:
                row = STATS_ROWS[tuple(x for x in ids.tolist() if x != 0)]
                d = NAMES.index(row["domain"])
                logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
                labels = torch.tensor(row["labels"][1:])
                valid = labels != -100
                loss = F.cross_entropy(logits[valid], labels[valid], reduction="none")
                ref_loss = -torch.tensor(row["ref_logps"][1:], dtype=torch.float64)[valid]
                sums[:, d] += torch.stack([loss.sum(), valid.sum().double(), torch.tensor(1.0),
                                           (loss - ref_loss).clamp(min=0).sum(), ref_loss.sum()])
    return sums.tolist()


def domain_stats_run(batch: int, ga: int, steps: int = 3) -> dict:
    """A DoReMi run (upweight, sequential rows, the toy `ref_logps` as reference) whose controller is spied on: per step,
    the DomainStats it received (summed over micro-batches and ranks) and this rank's own share recomputed by hand from
    the micro-batches it trained on and the parameters at the step's start."""
    collator = RecordingCollator()
    args = WeightedTrainingArguments(
        **training_args(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                        gradient_accumulation_steps=ga, learning_rate=0.5),
        mixture="doremi", mixture_mode="upweight",
    )
    model = tiny_model()
    snapshots = SnapshotParameters(model)
    trainer = WeightedTrainer(model=model, args=args, train_dataset=toy_dataset(40), data_collator=collator,
                              callbacks=[snapshots])
    received = []
    observe = trainer.mixture.observe

    def spy(stats):
        received.append([getattr(stats, f).tolist() for f in STATS_FIELDS])
        observe(stats)

    trainer.mixture.observe = spy
    trainer.train()
    local = [domain_stats_by_hand(snapshots.by_step[s], collator.batches[s * ga : (s + 1) * ga]) for s in range(steps)]
    logged = [{n: h[f"domain_loss/{n}"] for n in NAMES if f"domain_loss/{n}" in h}
              for h in trainer.state.log_history if "loss" in h]
    return {"received": received, "local": local, "logged": logged}
