"""Reference-model scores for reference-based strategies (Rho-1, PRIOR, DoReMi): three sources.

1. A separate frozen model (``reference_model="path/or/hub-id"``, or a model object passed to the trainer); it may be
   smaller than the policy but must share its vocabulary.
2. ``reference_model="base"``: the PEFT base model with its adapters disabled (no extra memory).
3. A precomputed ``ref_logps`` dataset column (:func:`score_dataset`, ``hfweight score-reference``): training then
   pays nothing for the reference.

Live reference log-probs are computed for every micro-batch of an optimizer step in the trainer's prepare phase, with
no gradient, through the same fused LM head as the policy, and stored in the batch exactly where a precomputed column
would be — so cached and live references give the same loss.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .loss import enable_fused_log_probs, token_log_probs, token_log_probs_and_hidden

BASE = "base"


def load_reference_model(spec, policy: nn.Module, tokenizer=None) -> nn.Module | str:
    """Resolve ``reference_model``: ``"base"`` (checked to be a PEFT model), a model object, or a path/hub id.

    Raises:
        ValueError: ``"base"`` without PEFT adapters, or a vocabulary different from the policy's.
    """
    if spec == BASE:
        if not hasattr(policy, "disable_adapter"):
            raise ValueError(
                "reference_model='base' uses the PEFT base model with adapters disabled, but the model has no PEFT "
                "adapters; pass `peft_config`, or give a reference model path."
            )
        return BASE
    if isinstance(spec, str) and spec.startswith("builtin:"):
        from .entrypoints import load_causal_lm

        reference, ref_tokenizer = load_causal_lm(spec)
    elif isinstance(spec, str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        reference = AutoModelForCausalLM.from_pretrained(spec)
        ref_tokenizer = None
        with contextlib.suppress(OSError, ValueError):
            ref_tokenizer = AutoTokenizer.from_pretrained(spec)
    else:
        reference, ref_tokenizer = spec, None
    check_same_vocabulary(policy, reference, tokenizer, ref_tokenizer)
    reference.eval()
    reference.requires_grad_(False)
    enable_fused_log_probs(reference)
    return reference


def check_same_vocabulary(policy: nn.Module, reference: nn.Module, tokenizer=None, ref_tokenizer=None) -> None:
    """Per-token scores only compare when both models index the same vocabulary."""
    policy_vocab = policy.get_output_embeddings().weight.shape[0]
    ref_vocab = reference.get_output_embeddings().weight.shape[0]
    if policy_vocab != ref_vocab:
        raise ValueError(
            f"The reference model's vocabulary ({ref_vocab} tokens) differs from the policy's ({policy_vocab}); "
            "per-token reference scores need the same tokenizer. Use a reference from the same model family."
        )
    if tokenizer is not None and ref_tokenizer is not None:
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        if tok.get_vocab() != ref_tokenizer.get_vocab():
            raise ValueError(
                "The reference model's tokenizer maps tokens differently from the policy's tokenizer; per-token "
                "reference scores need the same tokenizer."
            )


@torch.no_grad()
def reference_log_probs(reference: nn.Module | str, policy: nn.Module, inputs: dict) -> torch.Tensor:
    """Reference log-probabilities aligned with ``input_ids`` ``(B, T)`` (entry 0 is 0: nothing predicts it)."""
    with _reference_mode(reference, policy) as model:
        logps, _ = token_log_probs(model, inputs, fused=getattr(_target(model), "_hfweight_fused", False))
    return torch.cat([logps.new_zeros(logps.shape[0], 1), logps.float()], dim=1)


@contextlib.contextmanager
def _reference_mode(reference: nn.Module | str, policy: nn.Module):
    """Yield the module that computes reference scores: the reference itself, or the policy with adapters off."""
    if reference != BASE:
        yield reference
        return
    model = policy.module if hasattr(policy, "module") else policy
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_hidden_states(reference: nn.Module | str, policy: nn.Module, inputs: dict) -> torch.Tensor:
    """The reference backbone's last hidden state ``(B, T, H)`` (for full-vocabulary terms such as ASFT's KL)."""
    with _reference_mode(reference, policy) as model:
        return token_log_probs_and_hidden(model, inputs, fused=getattr(_target(model), "_hfweight_fused", False))[2]


def _target(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_dataset(
    reference: nn.Module,
    dataset,
    collator,
    output_dir: str,
    batch_size: int = 8,
    column: str = "ref_logps",
    shard_rows: int = 1024,
) -> datasets.Dataset:  # noqa: F821
    """Add a ``ref_logps`` column (per-token reference log-probs aligned with ``input_ids``) to a tokenized dataset.

    Batched, with a progress bar, and resumable: rows are scored in shards of ``shard_rows`` saved under
    ``output_dir/shards``; an interrupted run skips the shards already on disk. The result is saved to
    ``output_dir`` with ``save_to_disk`` and returned.
    """
    import datasets
    from tqdm.auto import tqdm

    shard_dir = os.path.join(output_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    reference.eval()
    enable_fused_log_probs(reference)
    device = next(reference.parameters()).device
    n = len(dataset)
    shards = []
    with tqdm(total=n, desc="Scoring with the reference", unit="row") as progress:
        for start in range(0, n, shard_rows):
            path = os.path.join(shard_dir, f"{start:012d}")
            rows = dataset.select(range(start, min(start + shard_rows, n)))
            if not os.path.exists(os.path.join(path, "dataset_info.json")):
                scores = []
                for b in range(0, len(rows), batch_size):
                    features = [rows[i] for i in range(b, min(b + batch_size, len(rows)))]
                    # Every token is scored (labels = input_ids): the loss later reads only its own label positions.
                    batch = collator([{"input_ids": f["input_ids"]} for f in features])
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    batch["labels"] = batch["input_ids"]
                    logps = reference_log_probs(reference, reference, batch).cpu()
                    for i, f in enumerate(features):
                        scores.append(_unpad(logps[i], batch, len(f["input_ids"]), i).tolist())
                rows.add_column(column, scores).save_to_disk(path + ".tmp")
                os.replace(path + ".tmp", path)
            shards.append(datasets.load_from_disk(path))
            progress.update(len(rows))
    scored = datasets.concatenate_datasets(shards)
    scored.save_to_disk(os.path.join(output_dir, "dataset"))
    return scored


def _unpad(row: torch.Tensor, batch: dict, length: int, index: int) -> torch.Tensor:
    """The ``length`` real positions of a padded row (right or left padding)."""
    mask = batch.get("attention_mask")
    if mask is not None and length < row.shape[0] and int(mask[index, 0]) == 0:
        return row[row.shape[0] - length :]
    return row[:length]
