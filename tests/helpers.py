"""Shared fixtures for the tests: a tiny Llama, a toy dataset with weight columns, a padding collator.

Kept independent of the built-in corpus so the core tests run in seconds and also inside 2-rank worker scripts.
"""

from __future__ import annotations

import io

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from hfweight.cli import leave_process_group  # noqa: F401  (the worker scripts end with it, as the CLI does)

VOCAB = 64


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def toy_rows(n: int = 32, seed: int = 0, empty_rows: tuple[int, ...] = ()) -> list[dict]:
    """Variable-length rows (4–19 tokens) with `sample_weight`, `token_weights`, `ref_logps` (random, as if from a
    reference model) and a 3-valued `domain`.

    Rows listed in `empty_rows` have every label ignored (-100).
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * length if i in empty_rows else list(ids)
        if i not in empty_rows and i % 4 == 1:  # a masked prompt, like completion-only training
            labels[: length // 2] = [-100] * (length // 2)
        rows.append(
            {
                "input_ids": ids,
                "labels": labels,
                "sample_weight": float(torch.rand((), generator=g) * 2),
                "token_weights": (torch.rand(length, generator=g) * 2).tolist(),
                "ref_logps": (-torch.rand(length, generator=g) * 5).tolist(),
                "domain": ["code", "prose", "math"][i % 3],
            }
        )
    return rows


def toy_dataset(n: int = 32, seed: int = 0, empty_rows: tuple[int, ...] = ()) -> datasets.Dataset:
    return datasets.Dataset.from_list(toy_rows(n, seed, empty_rows))


def pad_collate(features: list[dict]) -> dict:
    """Right-pad `input_ids` (pad 0), `labels` (-100) and build `attention_mask`."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f.get("labels", f["input_ids"]))
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def cpu_run_args(output_dir: str, **fields) -> dict:
    """The arguments every test run shares (supervised or GRPO/RLOO): 4 rows per device, no accumulation, CPU, seed 0,
    a log line every step, nothing reported, saved or shown as a progress bar, no DataLoader workers; ``fields`` add
    to them or override them."""
    args = dict(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.update(fields)
    return args


def training_args(output_dir: str, **overrides) -> dict:
    """Deterministic CPU arguments shared by parity/invariance tests: one plain SGD step (learning rate 1, constant,
    no weight decay or clipping) over rows in dataset order."""
    args = cpu_run_args(
        output_dir,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
    )
    args.update(overrides)
    return args


class GradientCapture(TrainerCallback):
    """Copies every parameter's gradient just before each optimizer step (after accumulation and DDP reduction)."""

    def __init__(self, model):
        self.model = model
        self.steps: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append(
            {k: p.grad.detach().clone() for k, p in self.model.named_parameters() if p.grad is not None}
        )


def max_relative_difference(a: dict, b: dict) -> float:
    """max over parameters of ‖a − b‖ / ‖b‖ (0 when both are zero)."""
    worst = 0.0
    for k in b:
        denom = b[k].norm().item()
        diff = (a[k] - b[k]).norm().item()
        worst = max(worst, diff / denom if denom > 0 else diff)
    return worst


def logged_by_step(trainer, keys) -> dict[int, dict[str, float]]:
    """Each training step's log, restricted to ``keys`` and to the keys that step actually logged.

    A domain with no sample in a step logs no ``domain_loss/<domain>`` (``hfweight.glue.step.WeightedStep.finish``: its mean
    loss is 0/0), so which keys a step has is part of the record, not a missing value to fill.
    """
    return {
        h["step"]: {k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h
    }


def assert_same_step_logs(expected: dict, got: dict, steps, rel: float = 1e-6) -> None:
    """Two runs logged the same keys at each of ``steps`` (a domain absent from a step of one run is absent from the
    same step of the other: the same rows were drawn) and the same values to ``rel``."""
    for step in steps:
        assert step in expected and step in got and "loss" in expected[step], f"step {step} did not log a loss"
        assert set(got[step]) == set(expected[step]), (
            f"step {step}: logged {sorted(got[step])}, expected {sorted(expected[step])} (a domain present in one run "
            "and absent from the other means different rows were drawn)"
        )
        for key, value in expected[step].items():
            assert got[step][key] == pytest.approx(value, rel=rel, nan_ok=True), f"step {step}, {key}"


WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def tiny_tokenizer():
    """A whitespace word-level tokenizer over `w0 … w59` plus pad/bos/eos/unk (64 ids, matching `tiny_model`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def sft_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Prompt-completion text pairs with a sample weight and a domain per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p_len, c_len = int(torch.randint(2, 8, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (p_len + c_len,), generator=g)]
        rows.append(
            {
                "prompt": " ".join(words[:p_len]),
                "completion": " " + " ".join(words[p_len:]),
                "sample_weight": float(torch.rand((), generator=g) * 2),
                "domain": ["code", "prose", "math"][i % 3],
            }
        )
    return rows




def run_two_ranks(script: str, *args: str, timeout: int = 300):
    """Run ``script`` under ``torchrun --nproc_per_node 2`` (gloo on the CPU, one thread per rank) on a free port;
    fail with the ranks' stderr if it fails. Returns the completed process."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def roundtrip(state: dict) -> dict:
    """A state through torch.save/torch.load, as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def assert_same_state(a, b, where="state"):
    """Two saved weighting states are equal: same structure, tensors bit for bit, numbers exactly."""
    if torch.is_tensor(a):  # NaN equals NaN here too (a run-time watch's rows mark absent domains with NaN)
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, where
        a, b = a.cpu(), b.cpu()
        assert bool(((a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b).all()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN equals NaN here
