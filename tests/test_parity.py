"""Drop-in means bit-for-bit: with weighting off, WeightedTrainer is transformers.Trainer."""

import torch
from helpers import GradientCapture, pad_collate, tiny_model, toy_dataset, training_args
from transformers import Trainer, TrainingArguments

from hfweight import WeightedTrainer, WeightedTrainingArguments


def _run(trainer_cls, args_cls, tmp_path, **weighting):
    model = tiny_model()
    capture = GradientCapture(model)
    args = args_cls(
        **training_args(
            str(tmp_path),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=8,
            learning_rate=1e-2,
            optim="adamw_torch",
            train_sampling_strategy="random",
            max_grad_norm=1.0,
        ),
        **weighting,
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=toy_dataset(48, empty_rows=(5,)), data_collator=pad_collate, callbacks=[capture]
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, capture.steps, {k: p.detach() for k, p in model.named_parameters()}


def test_weighting_off_is_bit_for_bit_trainer(tmp_path):
    ref_losses, ref_grads, ref_params = _run(Trainer, TrainingArguments, tmp_path / "a")
    losses, grads, params = _run(WeightedTrainer, WeightedTrainingArguments, tmp_path / "b")
    assert len(ref_losses) == 8
    assert losses == ref_losses
    for step, (g, rg) in enumerate(zip(grads, ref_grads)):
        for k in rg:
            assert torch.equal(g[k], rg[k]), (step, k)
    for k in ref_params:
        assert torch.equal(params[k], ref_params[k]), k


def test_unit_weights_match_trainer_loss(tmp_path):
    """The weighted pipeline itself (fused log-probs, step denominator) reproduces Trainer's loss with weights 1."""
    ref_losses, ref_grads, _ = _run(Trainer, TrainingArguments, tmp_path / "a")
    ones = toy_dataset(48, empty_rows=(5,))
    ones = ones.map(lambda r: {"token_weights": [1.0] * len(r["input_ids"]), "sample_weight": 1.0})

    model = tiny_model()
    capture = GradientCapture(model)
    args = WeightedTrainingArguments(
        **training_args(
            str(tmp_path / "b"),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=8,
            learning_rate=1e-2,
            optim="adamw_torch",
            train_sampling_strategy="random",
            max_grad_norm=1.0,
        ),
        token_weighting="static",
        sample_weighting="static",
    )
    trainer = WeightedTrainer(model=model, args=args, train_dataset=ones, data_collator=pad_collate, callbacks=[capture])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for k in ref_grads[0]:
        assert torch.allclose(capture.steps[0][k], ref_grads[0][k], rtol=1e-4, atol=1e-7), k
