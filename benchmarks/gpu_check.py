"""GPU check (issue 12 item 8): one command, no downloads, a few minutes on one NVIDIA GPU; prints one table.

    python benchmarks/gpu_check.py             # on a machine with one CUDA GPU (about 3-6 min for a 24 GB card)
    python benchmarks/gpu_check.py --dry-run   # CPU, tiny models, ~1 min: the same code paths, run in CI

Three parts, each a block of rows ``check | value | expected | ok``:

1. **parity** — each Weighted* trainer with weighting off against its parent (``Trainer``, ``SFTTrainer``,
   ``GRPOTrainer``, ``RLOOTrainer``), same seed and data, a few optimizer steps: the largest ``|Δθ|`` of the final
   parameters must be 0 (bit for bit). The parent is also run twice: on CUDA that noise floor must be 0 too
   (deterministic algorithms are switched on), otherwise the comparison would mean nothing.
2. **fused LM head** — hfweight's per-token log-probs through TRL's ``add_fused_lm_head`` (the path used on Triton
   devices) against the plain path (full logits, fp32 cross-entropy), on a Qwen2.5-0.5B-shaped model: relative
   difference of the loss and of the gradients in fp32 and under bf16 autocast, and the peak memory of each path
   (the fused path must be lower: it never holds the ``(batch, seq, vocab)`` logits).
3. **cost** — step time and peak memory of WeightedTrainer/WeightedSFTTrainer against the parent on the same
   Qwen2.5-0.5B-shaped model: static sample weights (a column), ``dft``, ``loss`` sample weights, an online ``odm``
   mixture. Reported, not judged (the README states the CPU numbers).

The model is built from a config (random weights): Qwen2.5-0.5B's shape is hidden 896, 24 layers, 14 query / 2
key-value heads, MLP 4864, vocabulary 151 936, tied embeddings. The tokenizer and texts are hfweight's built-in ones
(:mod:`hfweight.builtin`), so nothing is downloaded. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and
is not measured on CPU (shown as ``-``). Exit status 1 if any judged row fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, tie_word_embeddings=True)
PARITY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True)


# ---- setup ----------------------------------------------------------------------------------------------------------


def qwen2(tokenizer, shape: dict, seed: int = 0):
    """A ``Qwen2ForCausalLM`` of ``shape`` with random weights (fp32), ids of ``tokenizer``; vocabulary at least the
    tokenizer's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = {**shape, "vocab_size": max(shape.get("vocab_size", 0), len(tokenizer))}
    config = Qwen2Config(**shape, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(config, name))
    return model


def deterministic(cuda: bool) -> None:
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def common_args(out: str, cuda: bool, steps: int, batch: int) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
                logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
                dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda)


def lm_rows(tokenizer, corpus, n: int, max_length: int):
    from hfweight.builtin import lm_dataset

    rows = lm_dataset(tokenizer, corpus["train"].select(range(n)), max_length=max_length)
    g = torch.Generator().manual_seed(0)
    weights = (torch.rand(n, generator=g) * 2).tolist()
    return rows.add_column("sample_weight", weights)


def collate(tokenizer):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


# ---- 1. parity ------------------------------------------------------------------------------------------------------


def _final_params(trainer) -> dict[str, torch.Tensor]:
    trainer.train()
    return {k: p.detach().float().cpu().clone() for k, p in trainer.model.named_parameters()}


def _max_abs(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def parity_trainers(kind: str, weighted: bool, tokenizer, corpus, cuda: bool, out: str):
    """The parent (or its Weighted* drop-in with weighting off) for ``kind`` on the small parity model."""
    import trl
    from transformers import Trainer, TrainingArguments

    import hfweight
    from hfweight.builtin import correctness_reward, format_reward, grpo_dataset, sft_dataset

    model = qwen2(tokenizer, PARITY_SHAPE)
    base = common_args(out, cuda, steps=3, batch=4)
    if kind == "Trainer":
        cls, args_cls = (hfweight.WeightedTrainer, hfweight.WeightedTrainingArguments) if weighted else (
            Trainer, TrainingArguments)
        rows = lm_rows(tokenizer, corpus, 24, 64).select_columns(["input_ids"])
        return cls(model=model, args=args_cls(**base, remove_unused_columns=False), train_dataset=rows,
                   data_collator=collate(tokenizer))
    if kind == "SFTTrainer":
        cls, args_cls = (hfweight.WeightedSFTTrainer, hfweight.WeightedSFTConfig) if weighted else (
            trl.SFTTrainer, trl.SFTConfig)
        return cls(model=model, args=args_cls(**base, max_length=96), train_dataset=sft_dataset(n=24),
                   processing_class=tokenizer)
    cls, args_cls = {
        ("GRPOTrainer", False): (trl.GRPOTrainer, trl.GRPOConfig),
        ("GRPOTrainer", True): (hfweight.WeightedGRPOTrainer, hfweight.WeightedGRPOConfig),
        ("RLOOTrainer", False): (trl.RLOOTrainer, trl.RLOOConfig),
        ("RLOOTrainer", True): (hfweight.WeightedRLOOTrainer, hfweight.WeightedRLOOConfig),
    }[(kind, weighted)]
    # beta=0: no reference model (RLOO would otherwise load one by the model's hub name, which a config-built model lacks)
    args = args_cls(**base, num_generations=4, max_completion_length=8, beta=0.0)
    return cls(model=model, reward_funcs=[correctness_reward, format_reward], args=args,
               train_dataset=grpo_dataset(n=24), processing_class=tokenizer)


def check_parity(tokenizer, corpus, cuda: bool) -> list[tuple]:
    rows = []
    for kind in ("Trainer", "SFTTrainer", "GRPOTrainer", "RLOOTrainer"):
        with tempfile.TemporaryDirectory() as out:
            parent = _final_params(parity_trainers(kind, False, tokenizer, corpus, cuda, out))
            again = _final_params(parity_trainers(kind, False, tokenizer, corpus, cuda, out))
            ours = _final_params(parity_trainers(kind, True, tokenizer, corpus, cuda, out))
        floor, diff = _max_abs(again, parent), _max_abs(ours, parent)
        rows.append((f"parity {kind}: parent run twice, max |Δθ|", f"{floor:.3g}", "0", floor == 0))
        rows.append((f"parity Weighted{kind} off vs {kind}, max |Δθ|",
                     f"{diff:.3g}", "0", diff == 0))
    return rows


# ---- 2. fused LM head -----------------------------------------------------------------------------------------------


def _peak(cuda: bool):
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return None


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def log_prob_loss_and_grads(model, inputs: dict, fused: bool, bf16: bool, cuda: bool):
    """``-mean log p`` of the labelled tokens through hfweight's :func:`token_log_probs` (fused head forced on when
    ``fused``), its gradients, and the peak memory of the forward+backward."""
    from hfweight.loss import token_log_probs

    model.zero_grad(set_to_none=True)
    _reset_peak(cuda)
    device = "cuda" if cuda else "cpu"
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logps, mask = token_log_probs(model, inputs, fused, min_fused_logits=0 if fused else None)
        loss = -(logps * mask).sum() / mask.sum()
    loss.backward()
    peak = _peak(cuda)
    grads = {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, peak


def _relative(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)) for k in b)


def check_fused_head(tokenizer, shape: dict, cuda: bool, batch: int, length: int) -> list[tuple]:
    from hfweight.loss import enable_fused_log_probs

    device = "cuda" if cuda else "cpu"
    model = qwen2(tokenizer, shape).to(device)
    if not enable_fused_log_probs(model):
        return [("fused LM head: TRL's add_fused_lm_head applies", "no", "yes", False)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (batch, length), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    rows = []
    for bf16, tolerance in ((False, 1e-4), (True, 2e-2)):
        precision = "bf16 autocast" if bf16 else "fp32"
        plain_loss, plain_grads, plain_peak = log_prob_loss_and_grads(model, inputs, False, bf16, cuda)
        fused_loss, fused_grads, fused_peak = log_prob_loss_and_grads(model, inputs, True, bf16, cuda)
        loss_rel = abs(fused_loss - plain_loss) / abs(plain_loss)
        grad_rel = _relative(fused_grads, plain_grads)
        rows.append((f"fused head {precision}: loss rel. diff", f"{loss_rel:.2e}", f"≤ {tolerance:g}", loss_rel <= tolerance))
        rows.append((f"fused head {precision}: grad rel. diff (worst tensor)", f"{grad_rel:.2e}", f"≤ {tolerance:g}",
                     grad_rel <= tolerance))
        if cuda:
            rows.append((f"fused head {precision}: peak MiB fused / plain",
                         f"{fused_peak / 2**20:.0f} / {plain_peak / 2**20:.0f}", "fused < plain", fused_peak < plain_peak))
    return rows


# ---- 3. cost vs the parent ------------------------------------------------------------------------------------------


class _StepTimer:
    """Wall time of each optimizer step after ``warmup`` (a TrainerCallback built lazily)."""

    def __new__(cls, warmup: int, cuda: bool):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times, self.last = [], None

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    _reset_peak(cuda)

            def on_step_end(self, args, state, control, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if self.last is not None and state.global_step > warmup:
                    self.times.append(now - self.last)
                self.last = now

        return Timer()


COST_VARIANTS = {
    "Trainer (parent)": ("lm", None),
    "static sample weights": ("lm", dict(sample_weighting="static")),
    "loss sample weights": ("lm", dict(sample_weighting="loss")),
    "online mixture (odm)": ("lm", dict(mixture="odm", mixture_mode="resample")),
    "SFTTrainer (parent)": ("sft", None),
    "dft": ("sft", dict(token_weighting="dft")),
}


def cost_trainer(variant: str, tokenizer, corpus, shape: dict, cuda: bool, out: str, steps: int, batch: int,
                 length: int):
    import trl
    from transformers import Trainer, TrainingArguments

    import hfweight
    from hfweight.builtin import sft_dataset

    kind, weighting = COST_VARIANTS[variant]
    model = qwen2(tokenizer, shape)
    base = common_args(out, cuda, steps=steps, batch=batch)
    if kind == "lm":
        rows = lm_rows(tokenizer, corpus, 8 * batch * steps, length)
        if weighting is None:
            return Trainer(model=model, args=TrainingArguments(**base, remove_unused_columns=False),
                           train_dataset=rows.select_columns(["input_ids"]), data_collator=collate(tokenizer))
        return hfweight.WeightedTrainer(model=model, args=hfweight.WeightedTrainingArguments(**base, **weighting),
                                        train_dataset=rows, data_collator=collate(tokenizer))
    rows = sft_dataset(n=4 * batch * steps)
    if weighting is None:
        return trl.SFTTrainer(model=model, args=trl.SFTConfig(**base, max_length=length), train_dataset=rows,
                              processing_class=tokenizer)
    return hfweight.WeightedSFTTrainer(model=model, args=hfweight.WeightedSFTConfig(**base, max_length=length,
                                                                                   **weighting),
                                       train_dataset=rows, processing_class=tokenizer)


def check_cost(tokenizer, corpus, shape: dict, cuda: bool, steps: int, warmup: int, batch: int, length: int):
    rows, parent_time = [], {}
    for variant, (kind, weighting) in COST_VARIANTS.items():
        with tempfile.TemporaryDirectory() as out:
            trainer = cost_trainer(variant, tokenizer, corpus, shape, cuda, out, warmup + steps, batch, length)
            timer = _StepTimer(warmup, cuda)
            trainer.add_callback(timer)
            trainer.train()
            peak = _peak(cuda)
        step = sum(timer.times) / max(len(timer.times), 1)
        if weighting is None:
            parent_time[kind] = step
        ratio = step / parent_time[kind]
        memory = "-" if peak is None else f"{peak / 2**20:.0f} MiB"
        rows.append((f"cost {variant}: step s (× parent), peak", f"{step:.3f} ({ratio:.2f}×), {memory}", "reported",
                     None))
        del trainer
    return rows


# ---- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few steps (what CI runs)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "fused", "cost"], help="parts to skip")
    return parser.parse_args(argv)


def format_table(rows: list[tuple]) -> str:
    lines = ["| check | value | expected | ok |", "|---|---|---|---|"]
    for check, value, expected, ok in rows:
        mark = "-" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"| {check} | {value} | {expected} | {mark} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("No CUDA device: run with --dry-run for the CPU rehearsal.", file=sys.stderr)
        return 2
    import transformers

    from hfweight.builtin import tiny_setup

    transformers.logging.set_verbosity_error()
    deterministic(cuda)
    corpus, tokenizer, _ = tiny_setup(seed=0)
    shape = QWEN_05B if cuda else TINY
    batch, length = (4, 512) if cuda else (2, 32)
    started = time.perf_counter()
    rows = []
    if "parity" not in args.skip:
        rows += check_parity(tokenizer, corpus, cuda)
    if "fused" not in args.skip:
        rows += check_fused_head(tokenizer, shape, cuda, batch, length)
    if "cost" not in args.skip:
        rows += check_cost(tokenizer, corpus, shape, cuda, steps=5 if cuda else 2, warmup=2 if cuda else 1,
                           batch=batch, length=length)
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    print(f"\nhfweight GPU check on {device}, model shape {'Qwen2.5-0.5B' if cuda else 'tiny Qwen2'}, "
          f"{time.perf_counter() - started:.0f} s\n")
    print(format_table(rows))
    failed = [r for r in rows if r[3] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
