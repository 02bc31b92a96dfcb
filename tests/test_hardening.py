"""Issue 14 defects 1 and 4–8: each test fails on the code before its fix (policy callables in checkpoints, Rho-1's
denominator, silently ignored fields, missing labels, TRL's SFT metrics, drop-in calls the parents take)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import pad_collate, tiny_model, toy_dataset, training_args
from helpers_mixture import NAMES, _trainer

# ---- 1. a policy mixture given a lambda or a closure survives checkpoint and resume ------------------------------


def _swinging_policy(period: int):
    """A closure (not importable, not picklable by reference): swings the mixture every `period` steps."""

    def policy(history):
        return [20, 1, 1] if (history[-1]["step"] // period) % 2 else [1, 1, 20]

    return policy


@pytest.mark.parametrize("kind", ["closure", "lambda"])
def test_policy_callable_survives_checkpoint_and_resume(tmp_path, kind):
    """Trainer pickles the arguments into every checkpoint (`training_args.bin`): a lambda/closure in mixture_kwargs
    used to kill the run at its first save. Now 4 steps straight equal 2 + checkpoint + resume + 2, and the pickled
    arguments record the callable's qualified name."""
    policy = _swinging_policy(1) if kind == "closure" else (lambda h: [20, 1, 1] if h[-1]["step"] % 2 else [1, 1, 20])

    def make(out, steps):
        return _trainer(out, toy_dataset(40), max_steps=steps, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, learning_rate=1e-2, optim="adamw_torch",
                        save_strategy="steps", save_steps=2, mixture="policy", mixture_mode="resample",
                        mixture_kwargs={"policy": policy})

    straight = make(tmp_path / "straight", 4)
    straight.train()
    make(tmp_path / "resumed", 2).train()
    saved = torch.load(tmp_path / "resumed" / "checkpoint-2" / "training_args.bin", weights_only=False)
    recorded = saved.mixture_kwargs["policy"]
    assert isinstance(recorded, str) and recorded.startswith(f"{__name__}:")
    assert ("<locals>.policy" if kind == "closure" else "<lambda>") in recorded
    resumed = make(tmp_path / "resumed", 4)
    assert resumed.args.mixture_kwargs["policy"] is policy  # the live arguments keep the callable
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))

    def logged(trainer):
        keys = ["loss"] + [f"mixture/{n}" for n in NAMES]
        return {h["step"]: tuple(h.get(k) for k in keys) for h in trainer.state.log_history if "loss" in h}

    expected, got = logged(straight), logged(resumed)
    assert {3, 4} <= set(got)  # steps 1-2 come back with the checkpoint's trainer state
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    assert resumed.mixture.history == straight.mixture.history


def test_copies_of_the_arguments_keep_the_callable(tmp_path):
    """Only pickling replaces a callable by its name: copy.copy / copy.deepcopy (used on arguments by trainers) keep
    it, and an importable policy pickles as itself."""
    from hfweight import WeightedTrainingArguments
    from hfweight.policies import upweight_high_loss

    closure = _swinging_policy(2)
    args = WeightedTrainingArguments(**training_args(str(tmp_path)), mixture="policy", mixture_kwargs={"policy": closure})
    assert copy.copy(args).mixture_kwargs["policy"] is closure
    assert copy.deepcopy(args).mixture_kwargs["policy"] is closure
    plain = WeightedTrainingArguments(
        **training_args(str(tmp_path)), mixture="policy", mixture_kwargs={"policy": upweight_high_loss}
    )
    assert pickle.loads(pickle.dumps(plain)).mixture_kwargs["policy"] is upweight_high_loss


# ---- 8. drop-in: every call the parent takes ------------------------------------------------------------------------


def _args_without_weighting(args) -> dict:
    from dataclasses import fields as dataclass_fields

    from hfweight.rl import RewardWeightingArguments

    ours = {f.name for f in dataclass_fields(RewardWeightingArguments)}
    return {k: v for k, v in args.to_dict().items() if k not in ours}


def _allow_default_bf16(monkeypatch):
    """TRL's default configs turn bf16 on, which TrainingArguments refuses on a machine without a bf16 GPU (for the
    parent as for us): let the check pass so both default configs can be built here."""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)


def _reset_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def test_sft_accepts_plain_training_arguments_like_the_parent(tmp_path):
    """SFTTrainer converts a plain TrainingArguments to an SFTConfig; WeightedSFTTrainer converts it to a
    WeightedSFTConfig with weighting off and trains bit for bit like the parent."""
    import datasets
    from helpers import sft_rows, tiny_tokenizer
    from transformers import TrainingArguments
    from trl import SFTTrainer

    from hfweight import WeightedSFTConfig, WeightedSFTTrainer

    data = datasets.Dataset.from_list(sft_rows(16))
    runs = {}
    for cls in (SFTTrainer, WeightedSFTTrainer):
        args = TrainingArguments(**training_args(str(tmp_path / cls.__name__), max_steps=2, learning_rate=1e-2))
        trainer = cls(model=tiny_model(), args=args, train_dataset=data, processing_class=tiny_tokenizer())
        trainer.train()
        runs[cls] = trainer
    ours, parent = runs[WeightedSFTTrainer], runs[SFTTrainer]
    assert type(ours.args) is WeightedSFTConfig and not ours.args.weighting_enabled
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (ours, parent)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    for (name, p), q in zip(ours.model.named_parameters(), parent.model.parameters()):
        assert torch.equal(p, q), name


def test_trainer_accepts_plain_training_arguments_like_the_parent(tmp_path):
    """WeightedTrainer(args=TrainingArguments(...)) runs with weighting off, bit for bit like transformers.Trainer."""
    from transformers import Trainer, TrainingArguments

    from hfweight import WeightedTrainer, WeightedTrainingArguments

    runs = {}
    for cls in (Trainer, WeightedTrainer):
        args = TrainingArguments(**training_args(str(tmp_path / cls.__name__), max_steps=2))
        trainer = cls(model=tiny_model(), args=args, train_dataset=toy_dataset(8), data_collator=pad_collate)
        trainer.train()
        runs[cls] = trainer
    assert type(runs[WeightedTrainer].args) is WeightedTrainingArguments
    for (name, p), q in zip(runs[WeightedTrainer].model.named_parameters(), runs[Trainer].model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("peft", [False, True])
def test_sft_with_args_none_builds_the_parents_default_config(tmp_path, monkeypatch, peft):
    import datasets
    from helpers import sft_rows, tiny_tokenizer
    from trl import SFTTrainer

    from hfweight import WeightedSFTConfig, WeightedSFTTrainer

    monkeypatch.chdir(tmp_path)  # the default config writes to ./<model>-SFT
    _allow_default_bf16(monkeypatch)
    data = datasets.Dataset.from_list(sft_rows(8))
    extra = {}
    if peft:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    parent = SFTTrainer(model=tiny_model(), args=None, train_dataset=data, processing_class=tiny_tokenizer(), **extra)
    ours = WeightedSFTTrainer(model=tiny_model(), args=None, train_dataset=data, processing_class=tiny_tokenizer(), **extra)
    assert type(ours.args) is WeightedSFTConfig and not ours.args.weighting_enabled and not ours.weighting_enabled
    assert _args_without_weighting(ours.args) == _args_without_weighting(parent.args)
    assert type(ours.model) is type(parent.model)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rl_with_args_none_or_a_plain_config_builds_the_weighted_config(tmp_path, monkeypatch, algo):
    from helpers import tiny_tokenizer
    from helpers_rl import REWARDS, prompt_dataset, rl_args
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer, WeightedRLOOConfig, WeightedRLOOTrainer

    parent_cls, parent_config, cls, config = {
        "grpo": (GRPOTrainer, GRPOConfig, WeightedGRPOTrainer, WeightedGRPOConfig),
        "rloo": (RLOOTrainer, RLOOConfig, WeightedRLOOTrainer, WeightedRLOOConfig),
    }[algo]
    monkeypatch.chdir(tmp_path)
    _allow_default_bf16(monkeypatch)
    common = dict(reward_funcs=list(REWARDS), train_dataset=prompt_dataset(), processing_class=tiny_tokenizer())
    tiny_model().save_pretrained(tmp_path / "tiny")  # RLOO's default beta > 0 loads a reference from the model's path
    try:
        for args in (None, parent_config(**rl_args(str(tmp_path / "plain")))):
            built = []
            for trainer_cls in (parent_cls, cls):
                _reset_accelerator_state()  # the default config's bf16 differs from the state earlier tests left
                built.append(trainer_cls(model=str(tmp_path / "tiny"), args=args, **common))
            parent, ours = built
            assert type(ours.args) is config and not ours.args.rl_weighting_enabled
            assert _args_without_weighting(ours.args) == _args_without_weighting(parent.args)
    finally:
        _reset_accelerator_state()


def test_grpo_without_reward_funcs_fails_like_the_parent(tmp_path):
    from helpers import tiny_tokenizer
    from helpers_rl import prompt_dataset, rl_args
    from trl import GRPOConfig, GRPOTrainer

    from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer

    for cls, config in ((GRPOTrainer, GRPOConfig), (WeightedGRPOTrainer, WeightedGRPOConfig)):
        with pytest.raises(ValueError, match="No reward source provided"):
            cls(tiny_model(), args=config(**rl_args(str(tmp_path))), train_dataset=prompt_dataset(),
                processing_class=tiny_tokenizer())


# ---- 5. fields that would be accepted and silently ignored ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"reference_model": "some/model"}, r"`reference_model='some/model'` has no effect in Weighted\w+Trainer"),
        ({"loss_normalization": "sample"}, r"`loss_normalization='sample'` has no effect"),
        ({"allow_negative_weights": True}, r"`allow_negative_weights=True` has no effect"),
        ({"reward_weighting": "saw", "reward_gradient_parameters": "lm_head"},
         r"`reward_gradient_parameters='lm_head'` only selects .* with reward_weighting='saw' it has no effect"),
        ({"reward_gradient_parameters": "lm_head"}, r"with reward_weighting=None it has no effect"),
    ],
)
@pytest.mark.parametrize("config", ["grpo", "rloo"])
def test_rl_configs_refuse_fields_they_ignore(tmp_path, config, overrides, message):
    from helpers_rl import rl_args

    from hfweight import WeightedGRPOConfig, WeightedRLOOConfig

    cls = {"grpo": WeightedGRPOConfig, "rloo": WeightedRLOOConfig}[config]
    with pytest.raises(ValueError, match=message):
        cls(**rl_args(str(tmp_path), **overrides))
    cls(**rl_args(str(tmp_path), reward_weighting="gradient", reward_gradient_parameters="lm_head"))  # where it applies


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(token_weighting="dft", reference_model="/does/not/exist"),
        dict(sample_weighting="static", reference_model="/does/not/exist"),
        dict(reference_model="/does/not/exist"),
    ],
)
def test_reference_model_without_a_strategy_that_reads_it(tmp_path, kwargs):
    """A reference no strategy uses would never be loaded, so a wrong path passed unnoticed: now an error naming the
    field, at config time and for the trainer argument."""
    from hfweight import WeightedTrainer, WeightedTrainingArguments

    with pytest.raises(ValueError, match=r"`reference_model='/does/not/exist'` is set but no configured strategy"):
        WeightedTrainingArguments(**training_args(str(tmp_path)), **kwargs)
    WeightedTrainingArguments(**training_args(str(tmp_path)), token_weighting="rho1", reference_model="/a/path")
    args = WeightedTrainingArguments(**training_args(str(tmp_path)), token_weighting="dft")
    with pytest.raises(ValueError, match=r"reference_model \(the trainer argument\)='LlamaForCausalLM'"):
        WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(8), data_collator=pad_collate,
                        reference_model=tiny_model())


def test_sample_normalization_without_a_weighting_is_refused(tmp_path):
    from hfweight import WeightedSFTConfig, WeightedTrainingArguments

    for cls in (WeightedTrainingArguments, WeightedSFTConfig):
        with pytest.raises(ValueError, match=r"`loss_normalization='sample'` has no effect without a weighting"):
            cls(**training_args(str(tmp_path)), loss_normalization="sample")


def test_declared_domains_for_a_dataset_with_a_domain_column(tmp_path, caplog):
    """mixture_kwargs['domains'] is read only for streams without the domains' names; with a map-style dataset's
    domain column it used to be dropped silently: a different list is an error, the same list a warning."""
    kwargs = dict(max_steps=1, mixture="static", mixture_mode="upweight")
    with pytest.raises(ValueError, match=r"mixture_kwargs\['domains'\]=\['code', 'poetry'\] differs from .*'domain'"):
        _trainer(tmp_path, toy_dataset(12), mixture_kwargs={"domains": ["code", "poetry"]}, **kwargs)
    with caplog.at_level("WARNING", logger="hfweight.glue.data"):
        _trainer(tmp_path, toy_dataset(12), mixture_kwargs={"domains": ["prose", "math", "code"]}, **kwargs)
    assert "mixture_kwargs['domains'] has no effect" in caplog.text


# ---- 6. a dataset without labels ------------------------------------------------------------------------------------


def test_batches_without_labels_get_a_clear_error(tmp_path):
    """No LM collator: the batches carry no `labels`. The error names them and the collator that adds them (it used
    to be a bare KeyError: 'labels' inside the loss code)."""
    from hfweight import WeightedTrainer, WeightedTrainingArguments

    def no_labels(features):
        batch = pad_collate(features)
        del batch["labels"]
        return batch

    data = toy_dataset(8).remove_columns(["labels"])
    args = WeightedTrainingArguments(**training_args(str(tmp_path)), token_weighting="static")
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=data, data_collator=no_labels)
    with pytest.raises(ValueError, match=r"needs `labels`.*DataCollatorForLanguageModeling"):
        trainer.train()


# ---- 4. Rho-1 normalizes over the kept tokens, with a column and in sample mode -------------------------------------


def _rho1_reference_loss(model, rows, micro: int, keep_percent: float, normalization: str, column: bool):
    """Plain PyTorch Rho-1 over one optimizer step: per micro-batch of `micro` rows, keep the top ceil(k%·n) valid
    tokens by excess loss ℓ − ℓ_ref; token mode Σ_kept c ℓ / Σ_kept c over the step, sample mode the mean over
    samples with a kept token of Σ_kept c ℓ / Σ_kept c within each sample (c = the token_weights column, or 1)."""
    import math

    numerator, denominator = 0.0, 0.0
    for start in range(0, len(rows), micro):
        terms = []  # (row, ℓ with graph, c, excess)
        for i in range(start, min(start + micro, len(rows))):
            r = rows[i]
            logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double(), -1)
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] != -100:
                    nll = -logp[t - 1, r["labels"][t]]
                    c = r["token_weights"][t] if column else 1.0
                    terms.append((i, nll, c, float(nll.detach()) + r["ref_logps"][t]))
        keep = math.ceil(len(terms) * keep_percent / 100)
        kept = sorted(terms, key=lambda x: -x[3])[:keep]
        if normalization == "token":
            numerator = numerator + sum(c * nll for _, nll, c, _ in kept)
            denominator += sum(c for _, _, c, _ in kept)
        else:
            for i in sorted({x[0] for x in kept}):
                mine = [x for x in kept if x[0] == i]
                numerator = numerator + sum(c * nll for _, nll, c, _ in mine) / sum(c for _, _, c, _ in mine)
                denominator += 1.0
    return numerator / denominator


@pytest.mark.parametrize(
    "normalization,column,micro,ga",
    [("token", True, 6, 1), ("sample", False, 6, 1), ("sample", True, 6, 1), ("token", True, 3, 2),
     ("sample", True, 3, 2)],
)
def test_rho1_normalizes_over_the_kept_tokens(tmp_path, normalization, column, micro, ga):
    """Loss and gradient of one Rho-1 step equal a plain-PyTorch computation: the denominator is the (column-weighted)
    count of kept tokens, not k% of the column over all tokens; exact across micro-batches (GA = 2 too)."""
    from helpers import GradientCapture

    from hfweight import WeightedTrainer, WeightedTrainingArguments

    dataset = toy_dataset(6, seed=5)
    if not column:
        dataset = dataset.remove_columns(["token_weights"])
    rows = toy_dataset(6, seed=5).to_list()
    model = tiny_model()
    reference_model = copy.deepcopy(model).double()
    expected = _rho1_reference_loss(reference_model, rows, micro, 60.0, normalization, column)
    expected.backward()
    capture = GradientCapture(model)
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), per_device_train_batch_size=micro, gradient_accumulation_steps=ga),
        token_weighting="rho1", token_weighting_kwargs={"keep_percent": 60.0}, loss_normalization=normalization,
    )
    trainer = WeightedTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collate,
                              callbacks=[capture])
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    for name, p in reference_model.named_parameters():
        torch.testing.assert_close(capture.steps[0][name].double(), p.grad, rtol=1e-4, atol=1e-7)


# ---- 7. TRL's SFT metrics with weighting on -------------------------------------------------------------------------


def test_sft_logs_trls_entropy_and_token_accuracy_with_weighting_on(tmp_path):
    """entropy, mean_token_accuracy and num_tokens are logged with weighting on, equal to TRL's for the same model and
    batches: at every step with all-one static weights (the training runs coincide), and at the first step (same
    parameters) with DFT, whose training then diverges."""
    import datasets
    from helpers import sft_rows, tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    from hfweight import WeightedSFTConfig, WeightedSFTTrainer

    rows = [dict(r, sample_weight=1.0) for r in sft_rows(24)]
    data = datasets.Dataset.from_list(rows)
    keys = ("entropy", "mean_token_accuracy", "num_tokens")
    common = dict(training_args(str(tmp_path), max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4,
                                gradient_accumulation_steps=2), max_length=24)

    def logged(cls, config, out, **weighting):
        args = config(**dict(common, output_dir=str(tmp_path / out)), **weighting)
        trainer = cls(model=tiny_model(), args=args, train_dataset=data, processing_class=tiny_tokenizer())
        trainer.train()
        return [{k: h.get(k) for k in keys} for h in trainer.state.log_history if "loss" in h]

    parent = logged(SFTTrainer, SFTConfig, "parent")
    assert len(parent) == 3 and all(v is not None for h in parent for v in h.values())
    ones = logged(WeightedSFTTrainer, WeightedSFTConfig, "ones", sample_weighting="static")
    for got, expected in zip(ones, parent):
        assert got == pytest.approx(expected, rel=1e-5)
    dft = logged(WeightedSFTTrainer, WeightedSFTConfig, "dft", token_weighting="dft")
    assert dft[0] == pytest.approx(parent[0], rel=1e-5)
    assert [h["num_tokens"] for h in dft] == [h["num_tokens"] for h in parent]
