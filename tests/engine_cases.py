"""The engine × trainer cases of issue 12, run inside one 2-rank launch per engine (tests/test_engines.py).

Every case trains the tiny model for :data:`STEPS` optimizer steps under the launch's engine and returns, per rank,
the full parameters after training (gathered from ZeRO-3 partitions / FSDP2 shards), every dynamic weight and
probability it used, and the facts proving the engine ran. A case the library refuses at setup returns the message.
"""

from __future__ import annotations

import copy
import os
import tempfile

import datasets
import engines
import torch
from helpers import pad_collate, sft_rows, tiny_model, tiny_tokenizer, toy_dataset, toy_rows, training_args
from transformers import TrainerCallback

from hfweight import WeightedSFTConfig, WeightedSFTTrainer, WeightedTrainer, WeightedTrainingArguments

STEPS = 2
ROWS = 8 * STEPS  # batch 4 per rank × 2 ranks per optimizer step
TRUNCATION = {"drop_fraction": 0.4, "min_samples": 4, "buffer_size": 64, "recompute_every": 1}  # drops from step 2
LOSS = {"strategy": "linupper", "temperature": 0.5}

# WeightedTrainer on toy rows (token_weights, sample_weight, domain columns).
PRETRAIN = {
    "static": dict(token_weighting="static", sample_weighting="static"),
    "loss_score": dict(sample_weighting="loss", sample_weighting_kwargs={**LOSS, "mode": "score"}),
    "loss_rescale": dict(sample_weighting="loss", sample_weighting_kwargs={**LOSS, "mode": "rescale"}),
    # mode "score" on every engine: "auto" would pick rescale under DDP/FSDP2 and score under DeepSpeed, which take
    # the same step but log the weights on different scales (rescale: mean 1 over the step; score: 0/1 × column).
    "truncation": dict(sample_weighting="truncation", sample_weighting_kwargs={**TRUNCATION, "mode": "score"}),
    "odm_resample": dict(mixture="odm", mixture_mode="resample", mixture_kwargs={"warmup_steps": 0}),
    "odm_upweight": dict(mixture="odm", mixture_mode="upweight", mixture_kwargs={"warmup_steps": 0}),
    "dga": dict(
        mixture="dga",
        mixture_mode="resample",
        mixture_kwargs={"target": ["math", "prose"], "target_batch_size": 5, "update_every": 1, "eta": 0.5},
    ),
}
# WeightedSFTTrainer on prompt-completion text (or pre-tokenized rows with cached reference log-probs).
SFT = {
    "sft_dft": dict(token_weighting="dft"),
    "sft_focal": dict(token_weighting="focal", token_weighting_kwargs={"gamma": 2.0}, sample_weighting="static"),
    "sft_rho1_reference": dict(token_weighting="rho1", token_weighting_kwargs={"keep_percent": 60.0}),
    "sft_prior_reference": dict(token_weighting="prior"),
    "sft_prior_base_lora": dict(token_weighting="prior", reference_model="base"),
    "sft_prior_cached": dict(token_weighting="prior"),
    "sft_packed": dict(sample_weighting="static", packing=True, max_length=12),
}
SEPARATE_REFERENCE = ("sft_rho1_reference", "sft_prior_reference")
CASES = {**PRETRAIN, **SFT}

# Refused at setup, with the reason in the message (asserted by the test).
REFUSED = {
    ("zero2", "loss_rescale"): "DeepSpeed keeps the gradients in its engine",
    ("zero3", "loss_rescale"): "DeepSpeed keeps the gradients in its engine",
    ("zero2", "dga"): "DeepSpeed's engine",
    ("zero3", "dga"): "DeepSpeed's engine",
}


class DynamicRecorder(TrainerCallback):
    """After every optimizer step: the mixture's probabilities, this rank's sample weights (and the losses they came
    from), DGA's alignment, and the strategies' checkpoint state."""

    def __init__(self):
        self.trainer = None
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        record = {}
        if t.mixture is not None:
            record["probabilities"] = t.mixture.probabilities().double()
            record["mixture_state"] = _plain(t.mixture.state_dict())
        if getattr(t, "last_sample_weights", None):
            record["sample_weights"] = _plain(t.last_sample_weights)
        if t.sample_weighting is not None:
            record["sample_state"] = _plain(t.sample_weighting.state_dict())
        if getattr(t, "last_alignment", None):
            record["alignment"] = _plain(t.last_alignment)
        self.steps.append(record)


def _plain(value):
    """Tensors → float64 CPU copies, recursively (so records from different engines compare with torch.equal)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double() if value.is_floating_point() else value.detach().cpu()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def full_parameters(trainer, engine: str) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, as float64 on CPU: gathered from ZeRO-3 partitions or FSDP2 shards
    (collective: every rank must call it)."""
    wrapped = trainer.model_wrapped
    module = getattr(wrapped, "module", wrapped)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().cpu().double().clone() for n, p in named}
    if engine == "fsdp2":
        return {n: p.full_tensor().detach().cpu().double() for n, p in named}
    return {n: p.detach().cpu().double().clone() for n, p in named}


def _logs(trainer) -> list[dict]:
    """Log history without timings."""
    timing = ("runtime", "per_second", "total_flos")
    return [{k: v for k, v in h.items() if not any(t in k for t in timing)} for h in trainer.state.log_history]


def _base_args(output_dir: str, engine: str, max_steps: int = STEPS, **overrides) -> dict:
    return {**training_args(output_dir, max_steps=max_steps, **overrides), **engines.training_overrides(engine)}


def _cached_sft_rows() -> datasets.Dataset:
    """Pre-tokenized rows (TRL skips tokenization) carrying precomputed reference log-probs."""
    rows = [{k: r[k] for k in ("input_ids", "ref_logps", "sample_weight", "domain")} for r in toy_rows(ROWS)]
    return datasets.Dataset.from_list(rows)


def build_trainer(engine: str, name: str, output_dir: str, callbacks=(), max_steps: int = STEPS, **arg_overrides):
    """The trainer of case ``name`` under ``engine`` (not trained yet)."""
    config = copy.deepcopy(CASES[name])
    if name in PRETRAIN:
        args = WeightedTrainingArguments(**_base_args(output_dir, engine, max_steps, **arg_overrides), **config)
        eval_dataset = toy_dataset(12, seed=1) if config.get("mixture") == "dga" else None
        return WeightedTrainer(
            model=tiny_model(), args=args, train_dataset=toy_dataset(ROWS * 2 if "resample" in str(config) else ROWS),
            eval_dataset=eval_dataset, data_collator=pad_collate, callbacks=list(callbacks),
        )
    packing = config.pop("packing", False)
    max_length = config.pop("max_length", 24)
    args = WeightedSFTConfig(
        **_base_args(output_dir, engine, max_steps, **arg_overrides), max_length=max_length, packing=packing,
        bf16=False, **config,
    )
    extra = {}
    if name in SEPARATE_REFERENCE:
        extra["reference_model"] = tiny_model(seed=1)
    if name == "sft_prior_base_lora":
        from peft import LoraConfig

        # init_lora_weights=False: the adapters change the model from the first step, so "base" (adapters off) is a
        # different model from the policy.
        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False)
    if name == "sft_prior_cached":
        train = _cached_sft_rows()
    else:
        train = datasets.Dataset.from_list(sft_rows(ROWS * 2 if packing else ROWS))
    if name == "sft_prior_base_lora":
        torch.manual_seed(7)  # LoRA's random init: the same on every engine and rank
    return WeightedSFTTrainer(
        model=tiny_model(), args=args, train_dataset=train, processing_class=tiny_tokenizer(),
        callbacks=list(callbacks), **extra,
    )


def run_case(engine: str, name: str) -> dict:
    """Train case ``name`` under ``engine``; what this rank saw (or ``{"refused": message}``)."""
    recorder = DynamicRecorder()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainer = build_trainer(engine, name, os.path.join(tmp, name), callbacks=[recorder])
        except ValueError as error:
            return {"refused": str(error)}
        recorder.trainer = trainer
        initial = {n: p.detach().cpu().double().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        facts = engines.assert_engine(trainer, engine)
        return {
            "facts": facts,
            "initial": initial,
            "params": full_parameters(trainer, engine),
            "dynamic": recorder.steps,
            "logs": _logs(trainer),
            "reference": _reference_facts(trainer),
        }


def _reference_facts(trainer) -> dict | None:
    """Where a separate reference model lives: its wrapper class and this rank's stored vs full element count."""
    reference = getattr(trainer, "reference", None)
    if not isinstance(reference, torch.nn.Module):
        return None if reference is None else {"kind": str(reference)}
    module = getattr(reference, "module", reference)
    params = list(module.parameters())
    return {
        "wrapper": type(reference).__name__,
        "local_numel": sum(engines._local_numel(p) for p in params),
        "full_numel": sum(engines._full_numel(p) for p in params),
        "requires_grad": any(p.requires_grad for p in params),
    }




# ---- checkpoint and resume (issue 12 item 3) ----------------------------------------------------------------------

RESUME_CONFIG = dict(
    sample_weighting="loss",
    sample_weighting_kwargs=LOSS,  # mode "auto": rescale under FSDP2, score under DeepSpeed
    mixture="odm",
    mixture_mode="resample",
    mixture_kwargs={"warmup_steps": 0},
)
RESUME_STEPS = 2  # N: checkpoint after N steps, resume to 2N


def _resume_trainer(engine: str, output_dir: str, max_steps: int, recorder) -> WeightedTrainer:
    args = WeightedTrainingArguments(
        **_base_args(
            output_dir, engine, max_steps, optim="adamw_torch", learning_rate=1e-2, save_strategy="steps",
            save_steps=RESUME_STEPS,
        ),
        **copy.deepcopy(RESUME_CONFIG),
    )
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(64), data_collator=pad_collate,
                              callbacks=[recorder])
    recorder.trainer = trainer
    return trainer


def resume_case(engine: str, workdir: str) -> dict:
    """N steps + checkpoint, a fresh trainer resumed from it to 2N, and 2N straight: both end states, per rank.
    ``workdir`` must be shared by the ranks (each writes its own shard of the checkpoint there)."""
    out = {}
    root = os.path.join(workdir, engine)
    first = _resume_trainer(engine, os.path.join(root, "first"), RESUME_STEPS, DynamicRecorder())
    first.train()
    checkpoint = os.path.join(root, "first", f"checkpoint-{RESUME_STEPS}")
    for label, kwargs in (("resumed", {"resume_from_checkpoint": checkpoint}), ("straight", {})):
        recorder = DynamicRecorder()
        trainer = _resume_trainer(engine, os.path.join(root, label), 2 * RESUME_STEPS, recorder)
        trainer.train(**kwargs)
        out[label] = {
            "facts": engines.assert_engine(trainer, engine),
            "params": full_parameters(trainer, engine),
            "dynamic": recorder.steps,
            "logs": _logs(trainer),
            "checkpoint_files": sorted(os.listdir(checkpoint)),
        }
    return out


def all_cases(engine: str, workdir: str, *names: str) -> dict:
    """Entry point of the 2-rank launch: every case in ``names`` (default all) under ``engine``, and under a sharded
    engine also :func:`resume_case` (``workdir``: a directory shared by the ranks)."""
    out = {"cases": {name: run_case(engine, name) for name in (names or CASES)}}
    if engine != "ddp" and not names:
        out["resume"] = resume_case(engine, workdir)
    return out
