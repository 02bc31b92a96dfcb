"""The cached-reference workflow of recipes/tiny/pretrain_mixture_doremi.yaml through the entry points' functions:
score a reference once (``score_dataset`` writes a ``save_to_disk`` dataset with ``ref_logps``), then pretrain from
that saved dataset as from any other (``dataset_name: <dir>``), without a live reference model."""

from types import SimpleNamespace

import pytest
from helpers import cpu_run_args
from transformers import DataCollatorForLanguageModeling

from hfweight import WeightedTrainer, WeightedTrainingArguments
from hfweight.builtin import build_corpus, lm_dataset
from hfweight.entrypoints import load_causal_lm, load_hub_dataset, pretrain_data
from hfweight.reference import score_dataset

ROWS = 24


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny reference's ``ref_logps`` for 24 built-in rows, saved as ``score_reference`` saves them."""
    out = tmp_path_factory.mktemp("ref")
    reference, tokenizer = load_causal_lm("builtin:tiny", seed=0)
    rows = lm_dataset(tokenizer, build_corpus(seed=0)["train"].select(range(ROWS)), max_length=32)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    score_dataset(reference, rows, collator, str(out), batch_size=8, shard_rows=16)
    return str(out / "dataset"), tokenizer, rows


def _script_args(dataset_name, **overrides):
    """The pretrain entry point's script arguments (the fields ``pretrain_data`` reads)."""
    fields = dict(dataset_name=dataset_name, dataset_config=None, dataset_train_split="train",
                  dataset_eval_split="heldout", dataset_streaming=False, text_column="text", max_length=32,
                  max_train_samples=None, max_eval_samples_per_domain=4)
    return SimpleNamespace(**{**fields, **overrides})


def test_saved_dataset_loads_where_a_dataset_does(scored):
    path, _, rows = scored
    splits = load_hub_dataset(path)  # load_dataset alone: "saved using save_to_disk. Please use load_from_disk"
    assert list(splits) == ["train"] and len(splits["train"]) == ROWS
    assert splits["train"]["input_ids"] == rows["input_ids"]
    assert [len(r) for r in splits["train"]["ref_logps"]] == [len(r) for r in rows["input_ids"]]
    with pytest.raises(ValueError, match="has no configurations; drop `dataset_config='x'`"):
        load_hub_dataset(path, "x")


def test_score_then_pretrain_from_the_saved_dataset(scored, tmp_path):
    """DoReMi on the cached scores, no reference model: 2 steps from the saved dataset, used as it is (no text column
    to re-tokenize), the per-token ``ref_logps`` still aligned with ``input_ids``."""
    path, tokenizer, rows = scored
    args = WeightedTrainingArguments(
        **cpu_run_args(str(tmp_path), max_steps=2, learning_rate=1e-3),
        mixture="doremi", mixture_kwargs={"eta": 1.0},
    )
    train, eval_sets = pretrain_data(_script_args(path, max_train_samples=16), args, tokenizer)
    assert eval_sets == {}  # the saved dataset has one split
    assert len(train) == 16 and train["input_ids"] == rows["input_ids"][:16]
    assert {"ref_logps", "domain", "input_ids"} <= set(train.column_names)
    trainer = WeightedTrainer(model=load_causal_lm("builtin:tiny", seed=1)[0], args=args, train_dataset=train,
                              data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    assert trainer.state.global_step == 2
    probabilities = trainer.mixture.probabilities().tolist()
    assert probabilities != pytest.approx([1 / len(probabilities)] * len(probabilities))  # the excess loss moved it


def test_streamed_training_rows_are_capped_by_max_train_samples(scored):
    """``max_train_samples`` applies to a stream too (``take``), instead of being ignored."""
    path, tokenizer, rows = scored
    args = WeightedTrainingArguments(**cpu_run_args("unused"))
    train, _ = pretrain_data(_script_args(path, dataset_streaming=True, max_train_samples=5), args, tokenizer)
    streamed = list(train)
    assert len(streamed) == 5 and [r["input_ids"] for r in streamed] == rows["input_ids"][:5]


def test_untokenized_data_without_the_text_column_names_it(tmp_path):
    import datasets

    from hfweight.entrypoints import tokenize_for_lm

    data = datasets.Dataset.from_list([{"body": "a b", "domain": "code"}])
    args = WeightedTrainingArguments(**cpu_run_args(str(tmp_path)))
    with pytest.raises(ValueError, match=r"no text column 'text' \(columns: \['body', 'domain'\]\) and no `input_ids`"):
        tokenize_for_lm(data, None, _script_args("unused"), args)
