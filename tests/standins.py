"""Local stand-ins for the hub models and datasets of ``recipes/real/*.yaml`` (issue 12 item 6).

:func:`build_standins` writes, under a folder, one small model per hub model id — the same architecture class
(``Qwen2ForCausalLM`` for Qwen2.5, ``LlamaForCausalLM`` for SmolLM2), the same number of layers (so layer-indexed
settings such as ``reward_gradient_parameters: 'layers\\.(22|23)\\.'`` still select something), tied embeddings as in
the originals, a tiny width, random weights — saved with hfweight's built-in tokenizer (it has a chat template), and
one small dataset per hub dataset id with the same columns and format (JSON lines per split). It returns the path of
the JSON map that ``$HFWEIGHT_STANDINS`` points the entry scripts to (:func:`hfweight.entrypoints.standin`).

The formats, as published on the hub: ``trl-lib/DeepMath-103K`` — ``prompt`` (a conversation of one user message)
and ``solution`` (the final answer as LaTeX); ``trl-lib/Capybara`` — ``messages`` (user/assistant turns), splits
``train``/``test``; ``HuggingFaceTB/smollm-corpus`` ``cosmopedia-v2`` — ``prompt``, ``text``, ``token_length``,
``audience``, ``format`` (textbook, blogpost, wikihow, story, …), ``seed_data``.
"""

from __future__ import annotations

import json
import os
import random

MODELS = {
    "Qwen/Qwen2.5-0.5B": ("qwen2", 24),
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", 24),
    "HuggingFaceTB/SmolLM2-135M": ("llama", 30),
}
FORMATS = ["textbook", "blogpost", "wikihow", "story"]


def _model(kind: str, layers: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[kind]
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    import torch

    torch.manual_seed(0)
    model = model_cls(config)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(config, name))
    return model


def _write_jsonl(folder: str, split: str, rows: list[dict]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _math_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        question = f"What is ${a} + {b}$? Put the final answer in \\boxed{{}}."
        rows.append({"prompt": [{"role": "user", "content": question}], "solution": f"${a + b}$"})
    return rows


def _chat_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"messages": [
            {"role": "user", "content": f"Add {a} and {b}."},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]})
    return rows


def _corpus_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        words = " ".join(rng.choice(["the", "model", "learns", "a", "domain", "mixture", "of", "text"]) for _ in range(40))
        rows.append({"prompt": f"Write a {fmt}.", "text": f"A {fmt}: {words}.", "token_length": 48,
                     "audience": "general", "format": fmt, "seed_data": "standin"})
    return rows


def build_standins(root: str) -> str:
    """Write every stand-in under ``root``; return the path of the ``{hub id: local path}`` JSON map."""
    from hfweight.builtin import build_corpus, build_tokenizer

    tokenizer = build_tokenizer(build_corpus(seed=0))
    mapping = {}
    for hub_id, (kind, layers) in MODELS.items():
        path = os.path.join(root, "models", hub_id.replace("/", "__"))
        _model(kind, layers, tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
        mapping[hub_id] = path
    rng = random.Random(0)
    datasets = {
        "trl-lib/DeepMath-103K": {"train": _math_rows(64, rng)},
        "trl-lib/Capybara": {"train": _chat_rows(64, rng), "test": _chat_rows(8, rng)},
        "HuggingFaceTB/smollm-corpus:cosmopedia-v2": {"train": _corpus_rows(128, rng)},
    }
    for hub_id, splits in datasets.items():
        path = os.path.join(root, "datasets", hub_id.replace("/", "__").replace(":", "__"))
        for split, rows in splits.items():
            _write_jsonl(path, split, rows)
        mapping[hub_id] = path
    map_path = os.path.join(root, "standins.json")
    with open(map_path, "w") as f:
        json.dump(mapping, f, indent=1)
    return map_path
