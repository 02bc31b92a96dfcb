"""Workloads shared by the benchmarks: fixed-length blocks of the built-in corpus with weight columns, and one trainer
factory covering every variant compared (parent Trainer, WeightedTrainer with weighting off, with static weights).

Every row is exactly ``seq_len`` tokens of one domain (documents of a domain concatenated and cut), so every step
does the same work and step times compare; no padding means every position is a label for every variant.
Factories are module-level functions (wrapped with ``functools.partial``) so the harness can pickle them into
``spawn`` subprocesses.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections import defaultdict

import datasets
import numpy as np

from hfweight.builtin import build_corpus, build_model, build_tokenizer, lm_dataset

# variant name → WeightingArguments fields (``None``: the parent ``transformers.Trainer``). Every weighted variant
# runs the same model, data, order and seed; only these fields differ.
VARIANT_WEIGHTING: dict[str, dict | None] = {
    "trainer": None,
    "weighted_off": {},
    "weighted_static": {"token_weighting": "static", "sample_weighting": "static"},
    "weighted_static_fused": {"token_weighting": "static", "sample_weighting": "static"},  # + TRL's fused head forced
    "dft": {"token_weighting": "dft"},
    "focal": {"token_weighting": "focal"},
    # Loss-based sample weights (the dataset's `sample_weight` column multiplies them): the default exact mode
    # ("rescale": weights from each micro-batch's own forward, gradients rescaled by the global sum) and the scoring
    # pass ("score": a no-grad forward of the step first); `sample_static` is their like-for-like baseline.
    "sample_static": {"sample_weighting": "static"},
    "loss": {"sample_weighting": "loss"},
    "loss_score": {"sample_weighting": "loss", "sample_weighting_kwargs": {"mode": "score"}},
    "truncation": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"min_samples": 8}},
    "truncation_score": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"min_samples": 8, "mode": "score"}},
    "storm": {"sample_weighting": "storm"},
    "storm_every4": {"sample_weighting": "storm", "sample_weighting_kwargs": {"meta_every": 4}},
    "mixture_static_upweight": {
        "mixture": "static",
        "mixture_mode": "upweight",
        "mixture_kwargs": {"weights": {"code": 2.0, "prose": 1.0, "arithmetic": 1.0, "redundant": 0.5, "noise": 0.5}},
    },
    "odm_upweight": {"mixture": "odm", "mixture_mode": "upweight"},
    "temperature_resample": {"mixture": "temperature", "mixture_mode": "resample"},
    "schedule_resample": {
        "mixture": "schedule",
        "mixture_mode": "resample",
        "mixture_kwargs": {"stages": [{"until": 0.5, "temperature": 1.0}, {"until": 1.0, "temperature": 3.0}]},
    },
    # Dynamic mixtures with their authors' cadences, against `mixture_static_resample` (bench_overhead.py --mixtures).
    "mixture_static_resample": {
        "mixture": "static",
        "mixture_mode": "resample",
        "mixture_kwargs": {"weights": {"code": 2.0, "prose": 1.0, "arithmetic": 1.0, "redundant": 0.5, "noise": 0.5}},
    },
    "odm_resample": {"mixture": "odm", "mixture_mode": "resample"},
    "doremi_cached_resample": {"mixture": "doremi", "mixture_mode": "resample"},  # ref_logps column: no live reference
    "aioli_resample": {"mixture": "aioli", "mixture_mode": "resample"},  # probes 2 × 5 × 10 steps, evals every 10
    "skillit_resample": {
        "mixture": "skillit",
        "mixture_mode": "resample",
        "mixture_kwargs": {"graph": [[1.0 if i == j else 0.1 for j in range(5)] for i in range(5)], "update_every": 1000},
    },
    "dga_resample": {"mixture": "dga", "mixture_mode": "resample", "mixture_kwargs": {"target": "arithmetic"}},
    "policy_resample": {
        "mixture": "policy",
        "mixture_mode": "resample",
        "mixture_kwargs": {"policy": "hfweight.policies:upweight_high_loss"},
    },
}
MIXTURE_VARIANTS = (
    "mixture_static_resample",
    "temperature_resample",
    "schedule_resample",
    "odm_resample",
    "doremi_cached_resample",
    "aioli_resample",
    "skillit_resample",
    "dga_resample",
    "policy_resample",
)
HELDOUT_BLOCKS = 40  # per-domain held-out rows for aioli/skillit evaluations and dga's target (8 per domain)
VARIANTS = ("trainer", "weighted_off", "weighted_static")  # the default comparison
CORPUS_ROWS = 1500  # tokenizing a sample of the corpus is enough for a few hundred blocks and takes ~1 s
WEIGHT_RANGE = (0.5, 1.5)


@functools.cache
def tokenizer_and_corpus(seed: int = 0):
    corpus = build_corpus(seed=seed)
    return build_tokenizer(corpus), corpus


def _chunk_by_domain(tokenized: datasets.Dataset, seq_len: int, num_blocks: int) -> list[dict]:
    """Concatenate each domain's documents and cut into ``seq_len`` blocks, round-robin over domains so every
    batch mixes domains as the natural data would."""
    streams = defaultdict(list)
    for ids, domain in zip(tokenized["input_ids"], tokenized["domain"]):
        streams[domain].extend(ids)
    per_domain = {
        d: [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)] for d, ids in streams.items()
    }
    blocks = []
    for position in range(max(len(b) for b in per_domain.values())):
        for domain in sorted(per_domain):
            if position < len(per_domain[domain]):
                blocks.append({"input_ids": per_domain[domain][position], "domain": domain})
    if len(blocks) < num_blocks:
        raise ValueError(f"the corpus sample gives {len(blocks)} blocks of {seq_len} tokens, fewer than {num_blocks}")
    return blocks[:num_blocks]


@functools.cache
def weighted_blocks(seq_len: int, num_blocks: int = 256, seed: int = 0) -> datasets.Dataset:
    """``num_blocks`` rows of ``seq_len`` tokens with ``domain``, ``sample_weight`` and ``token_weights`` columns
    (weights uniform in ``WEIGHT_RANGE``, fixed by ``seed``). Every variant gets this same dataset; the parent
    Trainer drops the columns its model does not take, as it would for any dataset."""
    tokenizer, corpus = tokenizer_and_corpus(seed)
    sample = corpus["train"].shuffle(seed=seed).select(range(CORPUS_ROWS))
    blocks = _chunk_by_domain(lm_dataset(tokenizer, sample, max_length=1 << 16), seq_len, num_blocks)
    rng = np.random.default_rng(seed)
    for block in blocks:
        block["sample_weight"] = float(rng.uniform(*WEIGHT_RANGE))
        block["token_weights"] = rng.uniform(*WEIGHT_RANGE, size=seq_len).tolist()
    ref_rng = np.random.default_rng(seed + 1)  # cached reference log-probs (DoReMi without a live reference model)
    for block in blocks:
        block["ref_logps"] = (-ref_rng.uniform(0.5, 8.0, size=seq_len)).tolist()
    return datasets.Dataset.from_list(blocks)


@functools.cache
def heldout_blocks(seq_len: int, seed: int = 0) -> datasets.Dataset:
    """``HELDOUT_BLOCKS`` rows of the corpus's held-out split, cut like :func:`weighted_blocks` (with ``domain``)."""
    tokenizer, corpus = tokenizer_and_corpus(seed)
    tokenized = lm_dataset(tokenizer, corpus["heldout"], max_length=1 << 16)
    return datasets.Dataset.from_list(_chunk_by_domain(tokenized, seq_len, HELDOUT_BLOCKS))


def run_arguments(output_dir: str, seed: int, **fields) -> dict:
    """Training-argument fields every benchmark run shares: on the CPU, seeded, nothing reported, saved or shown as a
    progress bar; ``fields`` (optimization, weighting, trainer-specific settings) add to them or override them. A
    plain dict, for the ``TrainingArguments`` or ``*Config`` of any trainer."""
    common = dict(
        output_dir=output_dir, use_cpu=True, seed=seed, report_to="none", save_strategy="no", disable_tqdm=True
    )
    return {**common, **fields}


def timing_arguments(output_dir: str, batch_size: int, seed: int = 0, **fields) -> dict:
    """:func:`run_arguments` of a timed variant: identical optimization settings for every variant (constant learning
    rate 1e-4, AdamW, the data order of ``seed``, nothing logged or evaluated, no DataLoader workers; the harness sets
    ``max_steps`` to warmup + steps), so only ``fields`` (the weighting) differ."""
    timed = dict(
        per_device_train_batch_size=batch_size,
        max_steps=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_strategy="no",
        eval_strategy="no",
        data_seed=seed,
        dataloader_num_workers=0,
    )
    return run_arguments(output_dir, seed, **{**timed, **fields})


def _arguments(variant: str, batch_size: int):
    """Identical optimization settings for every variant; only the weighting fields differ."""
    from transformers import TrainingArguments

    from hfweight import WeightedTrainingArguments

    if variant not in VARIANT_WEIGHTING:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANT_WEIGHTING)}")
    weighting = VARIANT_WEIGHTING[variant]
    output_dir = os.path.join(tempfile.gettempdir(), "hfweight_bench", variant)
    if weighting is None:
        return TrainingArguments(**timing_arguments(output_dir, batch_size))
    return WeightedTrainingArguments(**timing_arguments(output_dir, batch_size, **weighting))


def make_trainer(variant: str, size: str, seq_len: int, batch_size: int, seed: int = 0, **model_overrides):
    """A ready trainer of ``variant`` on the built-in model of preset ``size`` (``model_overrides`` change its
    config, e.g. ``vocab_size``) and :func:`weighted_blocks`. Same model weights, data and order for every variant."""
    from transformers import DataCollatorForLanguageModeling, Trainer

    from hfweight import WeightedTrainer

    tokenizer, _ = tokenizer_and_corpus(seed)
    model = build_model(tokenizer, size=size, seed=seed, **model_overrides)
    trainer_cls = Trainer if variant == "trainer" else WeightedTrainer
    args = _arguments(variant, batch_size)
    extra = {}
    if getattr(args, "mixture", None) in ("aioli", "skillit", "dga"):
        extra["eval_dataset"] = heldout_blocks(seq_len, seed=seed)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=weighted_blocks(seq_len, seed=seed),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        **extra,
    )
    if variant.endswith("_fused"):
        trainer.fused_min_logits = 0
    return trainer


def variant_factories(variants, **workload) -> dict:
    """name → picklable zero-argument factory, for :func:`harness.compare`."""
    return {name: functools.partial(make_trainer, name, **workload) for name in variants}


def method_warnings(caught, prefix: str) -> list[str]:
    """The run-time warnings a weighting method emitted itself, in order: of the ``warnings.catch_warnings(record=True)``
    list ``caught``, those whose text starts with ``prefix`` (a mixture's ``"<name>:"``, a sample weighting's
    ``"sample_weighting='<name>':"``)."""
    return [str(w.message) for w in caught if str(w.message).startswith(prefix)]


def warned(runs: list[dict]) -> str:
    """``"n/m"``: of the ``m`` runs that recorded their warnings (``run["warnings"]``), how many warned (runs stored
    before a benchmark recorded warnings are left out); ``"–"`` if none recorded them."""
    recorded = [r for r in runs if "warnings" in r]
    return f"{sum(bool(r['warnings']) for r in recorded)}/{len(recorded)}" if recorded else "–"


def quiet() -> None:
    """Silence progress bars and info logs that would interleave with the harness's own lines."""
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
