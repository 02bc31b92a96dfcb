"""The embedded model: a small Llama built from a config with random weights (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# Architecture presets. Parameter counts with the default 2048-token vocabulary (untied embeddings):
# tiny ≈ 1.3M (runs a pretrain → SFT → GRPO recipe in minutes on 2 CPU cores), small ≈ 20M.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 344,
        "max_position_embeddings": 1024,
    },
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 8,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "intermediate_size": 1536,
        "max_position_embeddings": 1024,
    },
}


def model_config(tokenizer: PreTrainedTokenizerBase, size: str = "tiny", **overrides: Any) -> LlamaConfig:
    """The ``LlamaConfig`` of preset ``size`` sized to ``tokenizer`` (``vocab_size = len(tokenizer)``, its pad/bos/eos
    ids), untied embeddings, fp32; any ``overrides`` (e.g. ``num_hidden_layers=2``) replace the preset values."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SIZES)}")
    kwargs: dict[str, Any] = {
        **SIZES[size],
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        "dtype": torch.float32,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_model(
    tokenizer: PreTrainedTokenizerBase, size: str = "tiny", seed: int = 0, **overrides: Any
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of preset ``size`` (see :data:`SIZES`) for ``tokenizer``, in fp32.

    The weights depend only on ``seed`` and the config (initialised under ``torch.manual_seed(seed)`` in a forked RNG
    state, so the caller's global RNG is left untouched). The generation config carries the tokenizer's pad/bos/eos,
    so ``generate`` (and GRPO rollouts) stop at ``<|eos|>``. It exists so the default runs need no hub download.
    """
    config = model_config(tokenizer, size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.float32)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(config, name))
    return model
