"""The weighted loss against independent plain-PyTorch computations of the formulas of
docs/methods.md#normalization."""

import copy

import pytest
import torch
from helpers import pad_collate, tiny_model, toy_dataset, training_args

from hfweight import WeightedTrainer, WeightedTrainingArguments
from hfweight.loss import (
    FUSED_MIN_LOGITS,
    enable_fused_log_probs,
    token_log_probs,
    use_fused_head,
    weighted_denominator,
    weighted_numerator,
)


def _reference_step_loss(model, rows, normalization, use_token_weights, use_sample_weights):
    """Loop by loop (docs/methods.md#normalization): token L = Σ v w ℓ / Σ v w;
    sample L = Σ v ℓ_i / Σ_{n_i>0} v, ℓ_i = Σ w ℓ / Σ w."""
    num, den = 0.0, 0.0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            v = r["sample_weight"] if use_sample_weights else 1.0
            s_num, s_den = 0.0, 0.0
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] == -100:
                    continue
                w = r["token_weights"][t] if use_token_weights else 1.0
                s_num += w * -logp[t - 1, r["labels"][t]].item()
                s_den += w
            if normalization == "token":
                num, den = num + v * s_num, den + v * s_den
            elif s_den != 0:
                num, den = num + v * s_num / s_den, den + v
    return num / den


@pytest.mark.parametrize("normalization", ["token", "sample"])
@pytest.mark.parametrize("weights", [(True, False), (False, True), (True, True)])
def test_logged_loss_equals_plain_pytorch(tmp_path, normalization, weights):
    use_tok, use_smp = weights
    dataset = toy_dataset(4, seed=3, empty_rows=(2,))
    model = tiny_model()
    expected = _reference_step_loss(copy.deepcopy(model), dataset.to_list(), normalization, use_tok, use_smp)
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2),
        token_weighting="static" if use_tok else None,
        sample_weighting="static" if use_smp else None,
        loss_normalization=normalization,
    )
    trainer = WeightedTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collate)
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(expected, rel=1e-6)


def test_numerator_and_denominator_by_hand():
    """A 2×3 batch worked by hand."""
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    w = torch.tensor([[0.5, 1.0, 9.0], [2.0, 0.0, 9.0]])
    v = torch.tensor([2.0, 1.0])
    num, per_sample = weighted_numerator(token_loss, mask, None, w, v, "token")
    den = weighted_denominator(mask, w, v, "token")
    # token: 2*(0.5*1 + 1*2) + 1*(2*4 + 0*5) = 5 + 8 = 13 ; den 2*(1.5) + 1*(2) = 5
    assert num.item() == pytest.approx(13.0) and den.item() == pytest.approx(5.0)
    assert per_sample.tolist() == pytest.approx([2.5 / 1.5, 4.0])
    num_s, _ = weighted_numerator(token_loss, mask, None, w, v, "sample")
    den_s = weighted_denominator(mask, w, v, "sample")
    assert num_s.item() == pytest.approx(2 * 2.5 / 1.5 + 4.0) and den_s.item() == pytest.approx(3.0)
    # loss weights different from denominator weights (DFT-style): numerator uses them, denominator does not
    lw = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.4, 0.0]])
    num_l, _ = weighted_numerator(token_loss, mask, lw, None, None, "token")
    assert num_l.item() == pytest.approx(0.1 + 0.4 + 1.2 + 2.0)
    assert weighted_denominator(mask, None, None, "token").item() == 4


def test_empty_batch_keeps_graph():
    x = torch.randn(2, 3, requires_grad=True)
    num, _ = weighted_numerator(x.exp(), torch.zeros(2, 3, dtype=torch.bool), None, None, None, "token")
    num.backward()
    assert num.item() == 0.0 and x.grad is not None and torch.all(x.grad == 0)


def test_fused_and_fallback_log_probs_equal_log_softmax():
    model = tiny_model()
    batch = pad_collate(toy_dataset(4).to_list())
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        expected = expected.masked_fill(target == -100, 0)
        fallback, mask = token_log_probs(model, batch, fused=False)
        assert enable_fused_log_probs(model)
        fused, fused_mask = token_log_probs(model, batch, fused=True, min_fused_logits=0)
    assert torch.equal(mask, target != -100) and torch.equal(fused_mask, mask)
    assert torch.allclose(fallback, expected, atol=1e-6)
    assert torch.allclose(fused, expected, atol=1e-5)


def test_fused_head_only_where_the_logits_are_large():
    """On a GPU, small micro-batches take the full-logits path and large ones the fused head; on the CPU, never the fused head."""
    model = tiny_model()
    vocab = model.config.vocab_size
    small = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    tokens_at_threshold = -(-FUSED_MIN_LOGITS // vocab)
    large = {"input_ids": torch.zeros(1, tokens_at_threshold, dtype=torch.long)}
    assert not use_fused_head(model, small, fused=True)
    # On the CPU the fused head costs more than the logits (FUSED_HEAD_DEVICES), whatever the size.
    assert not use_fused_head(model, large, fused=True)
    assert use_fused_head(model, large, fused=True, min_logits=FUSED_MIN_LOGITS)
    assert not use_fused_head(model, large, fused=False)  # the model has no fused head
    assert use_fused_head(model, small, fused=True, min_logits=0)
