"""WeightedSFTTrainer: parity with trl.SFTTrainer, DFT equivalence, weights that survive TRL's preparation and packing."""

import datasets
import pytest
import torch
from helpers import GradientCapture, sft_rows, tiny_model, tiny_tokenizer
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from hfweight import WeightedSFTConfig, WeightedSFTTrainer
from hfweight.loss import per_sample_values, sample_segments


def _common(tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        max_length=24,
        disable_tqdm=True,
        seed=0,
    )
    args.update(overrides)
    return args


def _train(trainer_cls, config_cls, tmp_path, data, **kwargs):
    model = tiny_model()
    capture = GradientCapture(model)
    trainer = trainer_cls(
        model=model, args=config_cls(**_common(tmp_path, **kwargs)), train_dataset=data, processing_class=tiny_tokenizer(), callbacks=[capture]
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses, capture.steps, {k: p.detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("packing", [False, True])
def test_weighting_off_is_bit_for_bit_sft_trainer(tmp_path, packing):
    data = datasets.Dataset.from_list(sft_rows(40))  # prompt/completion: completion-only loss by default
    _, ref_losses, ref_grads, ref_params = _train(SFTTrainer, SFTConfig, tmp_path / "a", data, packing=packing)
    _, losses, grads, params = _train(WeightedSFTTrainer, WeightedSFTConfig, tmp_path / "b", data, packing=packing)
    assert len(losses) == 8 and losses == ref_losses
    for g, rg in zip(grads, ref_grads):
        assert all(torch.equal(g[k], rg[k]) for k in rg)
    assert all(torch.equal(params[k], ref_params[k]) for k in ref_params)


def test_dft_matches_trl_loss_type_dft(tmp_path):
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in sft_rows(40)])
    _, ref_losses, ref_grads, _ = _train(SFTTrainer, SFTConfig, tmp_path / "a", data, loss_type="dft")
    _, losses, grads, _ = _train(WeightedSFTTrainer, WeightedSFTConfig, tmp_path / "b", data, token_weighting="dft")
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for k in ref_grads[0]:
        assert torch.allclose(grads[0][k], ref_grads[0][k], rtol=1e-4, atol=1e-8), k


def _packed_first_batch(tmp_path, rows, **kwargs):
    trainer = WeightedSFTTrainer(
        model=tiny_model(),
        args=WeightedSFTConfig(**_common(tmp_path, packing=True, **kwargs), sample_weighting="static"),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tiny_tokenizer(),
    )
    return trainer, next(iter(trainer.get_train_dataloader()))


def test_packing_keeps_each_sample_weight_and_domain(tmp_path):
    """Weights 10^-i make every sample distinguishable: a shifted or leaked weight would name the wrong sample."""
    rows = sft_rows(12)
    for i, r in enumerate(rows):
        r["sample_weight"] = 10.0 ** (-(i % 6))
    tokenizer = tiny_tokenizer()
    by_tokens = {}
    for r in rows:  # what each sample tokenizes to (prompt + completion + eos)
        ids = tokenizer(r["prompt"] + r["completion"])["input_ids"] + [tokenizer.eos_token_id]
        by_tokens[tuple(ids)] = (r["sample_weight"], r["domain"])
    trainer, batch = _packed_first_batch(tmp_path, rows, per_device_train_batch_size=2)
    segments, n = sample_segments(batch)
    weights = per_sample_values(batch["hfw_sample_weight"], batch, segments, n)
    domains = per_sample_values(batch["hfw_domain"], batch, segments, n)
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    ids = batch["input_ids"][0].tolist()
    assert n == len(starts) - 1 > 2  # several samples share the packed row
    for s in range(n):
        expected_weight, expected_domain = by_tokens[tuple(ids[starts[s] : starts[s + 1]])]
        assert weights[s].item() == pytest.approx(expected_weight)
        assert trainer.domain_names[int(domains[s])] == expected_domain
    # every shifted label position belongs to the sample of its label token
    labels = batch["labels"][0, 1:]
    for t in range(labels.shape[0]):
        if labels[t] != -100:
            assert starts[segments[0, t]] <= t + 1 < starts[segments[0, t] + 1]


def test_packed_loss_equals_unpacked_per_sample_computation(tmp_path):
    """The packed step's weighted loss equals Σ v_i Σ ℓ / Σ v_i n_i computed sample by sample without packing.

    In fp32: SFTConfig defaults to ``bf16=True``, which makes the Trainer run every forward (the reference's too) under
    CPU bf16 autocast. There, PyTorch's bf16 SDPA kernel on an AVX-512 CPU rounds a sample differently inside the
    packed row (explicit block mask) than alone (``is_causal``): 0.03 logit differences on this sharp model, 2.6e-4 in
    the loss, which is bf16 noise, not weighting. On AVX2 dispatch both calls agree bit for bit, which is why this test
    passed on an AVX2 machine while asking for no precision.
    """
    rows = sft_rows(12)
    for i, r in enumerate(rows):
        r["sample_weight"] = 10.0 ** (-(i % 4))
    trainer, batch = _packed_first_batch(
        tmp_path, rows, per_device_train_batch_size=2, gradient_accumulation_steps=1, train_sampling_strategy="sequential",
        bf16=False,
    )
    assert trainer.accelerator.mixed_precision == "no"  # the precision this comparison is about
    with torch.no_grad():  # a sharp, non-uniform model, so that a leaked or misplaced weight changes the loss
        trainer.model.lm_head.weight.mul_(30.0)
    segments, n = sample_segments(batch)
    weights = per_sample_values(batch["hfw_sample_weight"], batch, segments, n)
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    expected = {}

    class Reference(TrainerCallback):
        # Computed once training has started, so both numbers come from the same threading/numeric setup.
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            num = den = 0.0
            with torch.no_grad():
                for s in range(n):
                    piece, piece_labels = ids[starts[s] : starts[s + 1]], labels[starts[s] : starts[s + 1]]
                    logp = torch.log_softmax(model(input_ids=piece[None]).logits[0].double(), -1)
                    for t in range(1, len(piece)):
                        if piece_labels[t] != -100:
                            num -= weights[s].item() * logp[t - 1, piece_labels[t]].item()
                            den += weights[s].item()
            expected["loss"] = num / den

    trainer.add_callback(Reference())
    trainer.args.max_steps = 1
    trainer.train()
    # fp32 packed vs unpacked forwards of a sharp model agree to ~1e-7 (measured 1.6e-8); a misplaced 10^-i weight
    # moves it by > 1e-2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected["loss"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["dft", "prior"])
def test_lora_via_peft_config(tmp_path, strategy):
    """PEFT/LoRA through `peft_config`: the optimizer moves the adapters only (every base weight equals the original
    model's after training); with `prior`, the reference is the PEFT base with adapters off, so the `ref_logps` the
    strategy receives at every micro-batch equal the original (pre-LoRA) model's log-probabilities of the labels, and
    differ from the policy's (adapters initialized non-zero, so a reference that left them on would fail). fp32
    (bf16=False): under CPU bf16 autocast both the policy and its reference round to ~1e-3."""
    from peft import LoraConfig

    data = datasets.Dataset.from_list(sft_rows(16))
    extra = {"reference_model": "base"} if strategy == "prior" else {}
    original = tiny_model()
    trainer = WeightedSFTTrainer(
        model=tiny_model(),
        args=WeightedSFTConfig(**_common(tmp_path, max_steps=2, bf16=False), token_weighting=strategy, **extra),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapters_before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    seen = []  # (model inputs, ref_logps, policy logps, mask) of every micro-batch
    compute_loss, loss_weights = trainer.compute_loss, trainer.token_weighting.loss_weights

    def spy_compute_loss(model, inputs, *args, **kwargs):
        tensors = {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v) and not k.startswith("hfw_")}
        seen.append({"inputs": tensors})
        return compute_loss(model, inputs, *args, **kwargs)

    def spy_loss_weights(ctx):
        seen[-1].update(ref=ctx.ref_logps, logps=ctx.logps, mask=ctx.mask)
        return loss_weights(ctx)

    trainer.compute_loss, trainer.token_weighting.loss_weights = spy_compute_loss, spy_loss_weights
    trainer.train()
    assert trainer.reference == ("base" if strategy == "prior" else None)
    assert len(seen) == 4  # 2 steps × GA 2

    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in trainer.model.named_parameters() if "lora_" not in k}
    for name, value in original.named_parameters():
        assert torch.equal(base_now[name], value), f"base weight {name} moved"
    for name, value in trainer.model.named_parameters():
        assert value.requires_grad == ("lora_" in name), name
        if "lora_" in name:
            assert not torch.equal(value, adapters_before[name]), f"adapter {name} did not train"

    if strategy == "prior":
        original.eval()
        with torch.no_grad():
            for micro in seen:
                inputs = micro["inputs"]
                logits = original(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1]
                labels = inputs["labels"][:, 1:]
                expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
                mask = micro["mask"]
                assert bool(mask.any())
                torch.testing.assert_close(micro["ref"][mask].double(), expected[mask], rtol=1e-5, atol=1e-5)
                assert (micro["ref"][mask] - micro["logps"][mask]).abs().max() > 1e-3  # adapters on ≠ base
