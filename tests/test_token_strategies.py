"""Per-token strategies against independent plain-PyTorch computations on a hand-made batch."""

import copy
import math

import pytest
import torch
from helpers import GradientCapture, max_relative_difference, pad_collate, tiny_model, toy_dataset, training_args
from helpers_invariance import EMPTY_ROWS

from hfweight import WeightedTrainer, WeightedTrainingArguments
from hfweight.strategies.token import prior_weights, rho1_selection


def _token_terms(model, rows):
    """Per valid label position of each row: (row, position, p, ℓ, p_ref)."""
    out = []
    with torch.no_grad():
        for i, r in enumerate(rows):
            logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double(), -1)
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] != -100:
                    lp = logp[t - 1, r["labels"][t]].item()
                    out.append((i, t, math.exp(lp), -lp, math.exp(r["ref_logps"][t])))
    return out


def _expected(strategy, kwargs, terms, rows):
    """Loss of one step over all rows (token normalization), from the formulas of docs/methods.md (per-token
    weights)."""
    if strategy == "dft":
        return sum(p * nll for _, _, p, nll, _ in terms) / len(terms)
    if strategy == "focal":
        return sum((1 - p) ** kwargs["gamma"] * nll for _, _, p, nll, _ in terms) / len(terms)
    if strategy == "prior":
        num = 0.0
        for i in range(len(rows)):
            mine = [x for x in terms if x[0] == i]
            if not mine:
                continue
            raw = [(1 - pr) ** kwargs["alpha"] for *_, pr in mine]
            mean = sum(raw) / len(raw)
            num += sum(w / mean * x[3] for w, x in zip(raw, mine))
        return num / len(terms)
    if strategy == "rho1":
        excess = sorted(((nll + math.log(pr), nll) for _, _, _, nll, pr in terms), reverse=True)
        keep = math.ceil(len(terms) * kwargs["keep_percent"] / 100)
        return sum(nll for _, nll in excess[:keep]) / keep
    raise AssertionError(strategy)


@pytest.mark.parametrize(
    "strategy,kwargs",
    [("dft", {}), ("focal", {"gamma": 2.0}), ("focal", {"gamma": 0.5}), ("prior", {"alpha": 1.0}), ("prior", {"alpha": 2.0}), ("rho1", {"keep_percent": 60.0}), ("rho1", {"keep_percent": 100.0})],
)
def test_step_loss_equals_plain_pytorch(tmp_path, strategy, kwargs):
    dataset = toy_dataset(6, seed=5).remove_columns(["token_weights"])  # the pure strategy, not composed with a column
    model = tiny_model()
    expected = _expected(strategy, kwargs, _token_terms(copy.deepcopy(model), dataset.to_list()), dataset.to_list())
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), per_device_train_batch_size=6), token_weighting=strategy, token_weighting_kwargs=kwargs
    )
    trainer = WeightedTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collate)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_prior_weights_mean_one_per_sequence():
    ref = torch.log(torch.tensor([[0.5, 0.9, 0.1, 0.3], [0.2, 0.2, 0.2, 0.2]]))
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    w = prior_weights(ref, mask, alpha=1.0)
    raw = torch.tensor([0.5, 0.1, 0.9])
    assert torch.allclose(w[0, :3], raw / raw.mean()) and w[0, 3] == 0
    assert torch.allclose(w[1, :2], torch.ones(2)) and torch.all(w[1, 2:] == 0)
    certain = prior_weights(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), alpha=1.0)  # p_ref = 1 everywhere
    assert torch.allclose(certain, torch.ones(1, 3))


def test_rho1_keeps_exact_count_of_highest_excess():
    excess = torch.tensor([[0.5, -1.0, 3.0, 9.0], [2.0, 1.0, 0.0, 7.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    sel = rho1_selection(excess, mask, keep_percent=50.0)  # 7 valid → ceil(3.5) = 4 kept: 7, 3, 2, 1
    assert sel.sum() == 4 and sel[0, 3] == 0  # the masked 9.0 is never selected
    assert sel[1, 3] == sel[0, 2] == sel[1, 0] == sel[1, 1] == 1


def _rho1_gradients_by_hand(rows: list[dict], micro_batches: list[list[int]], keep_percent: float) -> dict:
    """Rho-1's gradient when the top-k% tokens by excess loss ``ℓ_t − ℓ_ref,t`` are chosen within each micro-batch:
    ``∇ Σ_mb Σ_{kept in mb} ℓ_t / Σ_mb ceil(n_mb · k%)``, each row run alone (unpadded) through a fresh model."""
    model = tiny_model()
    total, kept = 0.0, 0
    for micro in micro_batches:
        losses, excess = [], []
        for i in micro:
            r = rows[i]
            logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0], -1)
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] != -100:
                    losses.append(-logp[t - 1, r["labels"][t]])
                    excess.append(losses[-1].item() + r["ref_logps"][t])  # ℓ − ℓ_ref, ℓ_ref = −ref_logps
        n_keep = math.ceil(len(losses) * keep_percent / 100)
        for j in sorted(range(len(losses)), key=lambda j: excess[j], reverse=True)[:n_keep]:
            total = total + losses[j]
        kept += n_keep
    grads = torch.autograd.grad(total / kept, list(model.parameters()), allow_unused=True)
    return {name: g for (name, _), g in zip(model.named_parameters(), grads) if g is not None}


def test_rho1_selects_per_micro_batch_with_the_exact_global_count(tmp_path):
    """Documented behaviour: Rho-1 selects its top-k% within each micro-batch, so which tokens are kept (not the
    normalization) changes with GA. Each configuration's gradient equals the plain-PyTorch gradient of that rule:
    (8, 1, 1) selects over all 8 rows, (2, 4, 1) within each pair of rows, the first pair having no valid token;
    the two differ, and keeping everything is exact again."""
    data = toy_dataset(8, empty_rows=EMPTY_ROWS).remove_columns(["token_weights"])  # the pure selection
    rows = data.to_list()
    assert all(lab == -100 for i in (0, 1) for lab in rows[i]["labels"])  # an all-ignored first micro-batch at GA 4
    got = {}
    for keep in (40.0, 100.0):
        for batch, ga in ((8, 1), (2, 4)):
            model = tiny_model()
            capture = GradientCapture(model)
            args = WeightedTrainingArguments(
                **training_args(str(tmp_path / f"{keep}_{batch}"), per_device_train_batch_size=batch,
                                gradient_accumulation_steps=ga),
                token_weighting="rho1", token_weighting_kwargs={"keep_percent": keep},
            )
            WeightedTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collate, callbacks=[capture]).train()
            got[keep, batch] = capture.steps[0]
            micro = [list(range(i, i + batch)) for i in range(0, 8, batch)]
            assert max_relative_difference(got[keep, batch], _rho1_gradients_by_hand(rows, micro, keep)) <= 1e-5
    assert max_relative_difference(got[40.0, 2], got[40.0, 8]) > 1e-4  # the selection does depend on the split
    assert max_relative_difference(got[100.0, 2], got[100.0, 8]) <= 1e-5


@pytest.mark.parametrize(
    "strategy,kwargs,message",
    [
        ("rho1", {"keep_percent": 0}, r"`keep_percent` must be in \(0, 100\]"),
        ("rho1", {"keep_percent": 120}, r"`keep_percent` must be in \(0, 100\]"),
        ("focal", {"gamma": -1.0}, r"`gamma` must be a finite number ≥ 0"),
        ("prior", {"alpha": -0.5}, r"`alpha` must be a finite number ≥ 0"),
    ],
)
def test_bad_strategy_kwargs(tmp_path, strategy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightedTrainingArguments(**training_args(str(tmp_path)), token_weighting=strategy, token_weighting_kwargs=kwargs)


def test_reference_strategy_without_reference_or_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "ref_logps"} for r in toy_dataset(8).to_list()]
    import datasets

    from hfweight.columns import WeightColumnError

    args = WeightedTrainingArguments(**training_args(str(tmp_path)), token_weighting="prior")
    with pytest.raises(WeightColumnError, match=r"Column 'ref_logps' is required by a reference-based strategy"):
        WeightedTrainer(model=tiny_model(), args=args, train_dataset=datasets.Dataset.from_list(rows), data_collator=pad_collate)


def test_ref_logps_wrong_length(tmp_path):
    rows = toy_dataset(8).to_list()
    rows[3]["ref_logps"] = rows[3]["ref_logps"][:-1]
    import datasets

    from hfweight.columns import WeightColumnError

    args = WeightedTrainingArguments(**training_args(str(tmp_path)), token_weighting="prior")
    with pytest.raises(WeightColumnError, match=r"Column 'ref_logps' has \d+ entries but 'input_ids' has \d+ at row 3"):
        WeightedTrainer(model=tiny_model(), args=args, train_dataset=datasets.Dataset.from_list(rows), data_collator=pad_collate)


def test_live_reference_equals_cached_column(tmp_path):
    """A live reference model and its precomputed `ref_logps` (hfweight.reference.score_dataset) give the same step."""
    from hfweight.reference import score_dataset

    reference = tiny_model(seed=7)
    dataset = toy_dataset(8, empty_rows=EMPTY_ROWS).remove_columns(["ref_logps"])
    cached = score_dataset(copy.deepcopy(reference), dataset, pad_collate, str(tmp_path / "scores"), batch_size=3, shard_rows=5)
    grads = {}
    for name, data, ref in (("live", dataset, reference), ("cached", cached, None)):
        model = tiny_model()
        capture = GradientCapture(model)
        args = WeightedTrainingArguments(
            **training_args(str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=2),
            token_weighting="prior",
        )
        WeightedTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collate, callbacks=[capture], reference_model=ref).train()
        grads[name] = capture.steps[0]
    assert max_relative_difference(grads["cached"], grads["live"]) <= 1e-5


def test_reference_vocabulary_mismatch(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    args = WeightedTrainingArguments(**training_args(str(tmp_path)), token_weighting="prior")
    with pytest.raises(ValueError, match=r"vocabulary \(80 tokens\) differs from the policy's \(64\)"):
        WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(8), data_collator=pad_collate, reference_model=other)


def test_base_reference_equals_frozen_copy_of_base(tmp_path):
    """`reference_model="base"` (PEFT adapters disabled) scores exactly like a separate frozen copy of the base."""
    from peft import LoraConfig, get_peft_model

    grads = {}
    for name in ("base", "copy"):
        base = tiny_model()
        frozen = copy.deepcopy(base)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        capture = GradientCapture(model)
        args = WeightedTrainingArguments(
            **training_args(str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=2),
            token_weighting="prior",
            reference_model="base" if name == "base" else None,
        )
        data = toy_dataset(8, empty_rows=EMPTY_ROWS).remove_columns(["ref_logps"])
        trainer = WeightedTrainer(
            model=model, args=args, train_dataset=data, data_collator=pad_collate, callbacks=[capture],
            reference_model=None if name == "base" else frozen,
        )
        trainer.train()
        grads[name] = capture.steps[0]
    assert grads["base"] and max_relative_difference(grads["base"], grads["copy"]) <= 1e-5


def test_base_reference_needs_peft(tmp_path):
    args = WeightedTrainingArguments(**training_args(str(tmp_path)), token_weighting="prior", reference_model="base")
    with pytest.raises(ValueError, match="has no PEFT adapters"):
        WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(8), data_collator=pad_collate)


def test_asft_equals_plain_pytorch_with_full_vocabulary_kl(tmp_path):
    """ASFT: Σ (sg(p) ℓ + λ KL(π_ref ‖ π_θ)) / n, the KL over the whole vocabulary (computed here from full logits)."""
    dataset = toy_dataset(6, seed=5).remove_columns(["token_weights"])
    model, reference = tiny_model(), tiny_model(seed=7)
    lam = 0.3
    num, n = 0.0, 0
    with torch.no_grad():
        for r in dataset.to_list():
            ids = torch.tensor([r["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            ref = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] != -100:
                    lp = logp[t - 1, r["labels"][t]].item()
                    kl = (ref[t - 1].exp() * (ref[t - 1] - logp[t - 1])).sum().item()
                    num += math.exp(lp) * -lp + lam * kl
                    n += 1
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), per_device_train_batch_size=6), token_weighting="asft", token_weighting_kwargs={"kl_weight": lam}
    )
    trainer = WeightedTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collate, reference_model=reference)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(num / n, rel=1e-5)


def test_asft_gradient_accumulation_invariance(tmp_path):
    from helpers_invariance import one_step_gradients

    config = dict(token_weighting="asft", token_weighting_kwargs={"kl_weight": 0.5}, reference_model=None)
    # a reference different from the policy, so the KL term has a gradient
    import helpers_invariance

    full = helpers_invariance.one_step_gradients(config, 8, 1, str(tmp_path / "a"), reference=tiny_model(seed=7))
    accumulated = one_step_gradients(config, 2, 4, str(tmp_path / "b"), reference=tiny_model(seed=7))
    assert max_relative_difference(accumulated, full) <= 1e-5


def test_score_dataset_resumes_after_interruption(tmp_path):
    """Finished shards are kept; a re-run scores only what is missing and gives the same column."""
    import os
    import shutil

    from hfweight.reference import score_dataset

    reference = tiny_model(seed=7)
    dataset = toy_dataset(8).remove_columns(["ref_logps"])
    first = score_dataset(reference, dataset, pad_collate, str(tmp_path), batch_size=2, shard_rows=3)
    shards = sorted(os.listdir(tmp_path / "shards"))
    assert len(shards) == 3
    kept = tmp_path / "shards" / shards[0]
    stamp = os.path.getmtime(kept / "dataset_info.json")
    shutil.rmtree(tmp_path / "shards" / shards[1])  # as if interrupted while scoring the second shard
    again = score_dataset(reference, dataset, pad_collate, str(tmp_path), batch_size=2, shard_rows=3)
    assert os.path.getmtime(kept / "dataset_info.json") == stamp
    assert again["ref_logps"] == first["ref_logps"]
    for row, scores in zip(dataset, first["ref_logps"]):
        assert len(scores) == len(row["input_ids"]) and scores[0] == 0.0


def test_sharded_parameter_detection():
    from types import SimpleNamespace

    from hfweight.glue import WeightingMixin

    def fake(zero_stage=None, fsdp=False):
        plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
        return SimpleNamespace(
            is_fsdp_enabled=fsdp,
            is_deepspeed_enabled=zero_stage is not None,
            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        )

    assert WeightingMixin._parameters_sharded(fake(fsdp=True))
    assert WeightingMixin._parameters_sharded(fake(zero_stage=3))
    assert not WeightingMixin._parameters_sharded(fake(zero_stage=2))
    assert not WeightingMixin._parameters_sharded(fake())
