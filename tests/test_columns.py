"""Bad weight/domain columns fail with an error naming the column, the row and the fix; all-zero weights are defined."""

import math

import datasets
import pytest
import torch
from helpers import GradientCapture, pad_collate, tiny_model, toy_rows, training_args

from hfweight import WeightedTrainer, WeightedTrainingArguments
from hfweight.columns import ColumnSpec, WeightColumnError, WeightingCollator


def _trainer(tmp_path, rows, **weighting):
    args = WeightedTrainingArguments(**training_args(str(tmp_path)), **weighting)
    return WeightedTrainer(
        model=tiny_model(), args=args, train_dataset=datasets.Dataset.from_list(rows), data_collator=pad_collate
    )


def _rows_with(column, row, value):
    rows = toy_rows(8)
    rows[row][column] = value
    return rows


@pytest.mark.parametrize(
    "column,row,value,weighting,message",
    [
        ("sample_weight", 5, math.nan, "sample", r"Column 'sample_weight' has the value nan \(NaN or inf\) at row 5"),
        ("sample_weight", 3, math.inf, "sample", r"Column 'sample_weight' has the value inf \(NaN or inf\) at row 3"),
        ("sample_weight", 6, -0.5, "sample", r"Column 'sample_weight' has the value -0.5 \(negative; pass allow_negative"),
        ("sample_weight", 2, None, "sample", r"Column 'sample_weight' is missing a value \(null\) at row 2"),
        ("token_weights", 4, "short", "token", r"Column 'token_weights' has 2 entries but 'input_ids' has \d+ at row 4"),
        ("token_weights", 7, "nan", "token", r"Column 'token_weights' has the value nan \(NaN or inf\) at row 7"),
        ("token_weights", 1, "negative", "token", r"Column 'token_weights' has the value -1.0 \(negative.* at row 1"),
    ],
)
def test_bad_values_name_column_and_row(tmp_path, column, row, value, weighting, message):
    rows = toy_rows(8)
    n = len(rows[row]["input_ids"])
    if value == "short":
        value = [1.0, 1.0]
    elif value == "nan":
        value = [1.0] * (n - 1) + [math.nan]
    elif value == "negative":
        value = [1.0] * (n - 1) + [-1.0]
    rows[row][column] = value
    kwargs = {"sample_weighting": "static"} if weighting == "sample" else {"token_weighting": "static"}
    with pytest.raises(WeightColumnError, match=message):
        _trainer(tmp_path, rows, **kwargs)


def test_missing_column_names_setting_and_columns(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "sample_weight"} for r in toy_rows(8)]
    with pytest.raises(WeightColumnError, match=r"Column 'sample_weight' is required by sample_weighting='static'"):
        _trainer(tmp_path, rows, sample_weighting="static")
    rows = [{k: v for k, v in r.items() if k != "domain"} for r in toy_rows(8)]
    with pytest.raises(ValueError, match=r"mixture='static' needs the training dataset's domain column 'domain'"):
        _trainer(tmp_path, rows, mixture="static", mixture_mode="upweight")


def test_negative_weights_are_an_explicit_opt_in(tmp_path):
    trainer = _trainer(tmp_path, _rows_with("sample_weight", 6, -0.5), sample_weighting="static", allow_negative_weights=True)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_unknown_domain_weight_and_negative_domain_weight(tmp_path):
    with pytest.raises(ValueError, match=r"names unknown domain\(s\) \['poetry'\]; the dataset's domains are"):
        _trainer(tmp_path, toy_rows(8), mixture="static", mixture_mode="upweight", mixture_kwargs={"weights": {"poetry": 1}})
    with pytest.raises(ValueError, match=r"gives domain 'code' the weight -1"):
        WeightedTrainingArguments(
            **training_args(str(tmp_path)), mixture="static", mixture_mode="upweight", mixture_kwargs={"weights": {"code": -1}}
        )


def test_collator_checks_streaming_batches():
    """Streaming datasets are not scanned up front: the collator catches bad rows per batch."""
    spec = ColumnSpec(sample_weight=True, token_weights=True, domain=True)
    collator = WeightingCollator(pad_collate, spec, {"code": 0, "prose": 1, "math": 2})
    rows = toy_rows(4)
    batch = collator([dict(r) for r in rows])
    assert batch["hfw_token_weights"].shape == batch["input_ids"].shape
    n = len(rows[1]["input_ids"])
    assert torch.allclose(batch["hfw_token_weights"][1, :n], torch.tensor(rows[1]["token_weights"]))
    assert batch["hfw_domain"].tolist() == [0, 1, 2, 0]
    bad = [dict(r) for r in rows]
    bad[2]["sample_weight"] = math.nan
    with pytest.raises(WeightColumnError, match=r"'sample_weight' holds a value that is NaN or inf in row 2"):
        collator(bad)
    bad = [dict(r) for r in rows]
    bad[3]["domain"] = "poetry"
    with pytest.raises(WeightColumnError, match=r"Domain 'poetry' in column 'domain' is not one of the known domains"):
        collator(bad)
    bad = [dict(r) for r in rows]
    bad[0]["token_weights"] = bad[0]["token_weights"][:-1]
    with pytest.raises(WeightColumnError, match=r"has \d+ entries but 'input_ids' has \d+ in row 0 of the current batch"):
        collator(bad)


def test_left_padding_alignment():
    def left_pad(features):
        batch = pad_collate(features)
        for key, fill in (("input_ids", 0), ("labels", -100), ("attention_mask", 0)):
            out = torch.full_like(batch[key], fill)
            for i, f in enumerate(features):
                n = len(f["input_ids"])
                out[i, out.shape[1] - n :] = batch[key][i, :n]
            batch[key] = out
        return batch

    rows = toy_rows(3)
    batch = WeightingCollator(left_pad, ColumnSpec(token_weights=True))([dict(r) for r in rows])
    width = batch["input_ids"].shape[1]
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert torch.allclose(batch["hfw_token_weights"][i, width - n :], torch.tensor(r["token_weights"]))
        assert torch.all(batch["hfw_token_weights"][i, : width - n] == 0)


def test_all_zero_weights_give_zero_gradient_not_nan(tmp_path):
    """Documented behaviour: a step whose weights are all 0 has loss 0 and a zero gradient (no NaN)."""
    rows = [dict(r, sample_weight=0.0) for r in toy_rows(8)]
    model = tiny_model()
    capture = GradientCapture(model)
    args = WeightedTrainingArguments(**training_args(str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2), sample_weighting="static")
    trainer = WeightedTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), data_collator=pad_collate, callbacks=[capture])
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == 0.0
    assert all(torch.all(g == 0) for g in capture.steps[0].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- sample_weight must be one number per row ---------------------------------------------------------------------


def _with_sample_weights(values):
    rows = toy_rows(len(values))
    for row, value in zip(rows, values):
        row["sample_weight"] = value
    return rows


@pytest.mark.parametrize(
    "values,message",
    [
        # Text that is not a number: the column becomes strings; the error names the first non-number ("abc").
        (["1.0", "2", "abc", "1"], r"Column 'sample_weight' holds 'abc' \(str\); a sample weight must be a number .* "
         r"at row 2\. .*cast_column"),
        ([[1.0], [0.5], [2.0], [1.0]], r"Column 'sample_weight' holds a list, \[1\.0\] \(list\); a sample weight is one "
         r"number per row .*at row 0"),
        ([True, False, True, True], r"Column 'sample_weight' holds True \(bool\); a sample weight must be a number .*"
         r"at row 0"),
    ],
    ids=["text", "list", "bool"],
)
def test_non_numeric_sample_weight_is_refused_at_the_dataset_check(tmp_path, values, message):
    with pytest.raises(WeightColumnError, match=message):
        _trainer(tmp_path, _with_sample_weights(values), sample_weighting="static")


def test_collator_refuses_non_numeric_sample_weights_of_a_stream():
    """A stream is checked batch by batch: the same three mistakes, named with their row of the batch."""
    collator = WeightingCollator(pad_collate, ColumnSpec(sample_weight=True))
    for value, message in [
        ("abc", r"holds 'abc' \(str\) in row 2 of the current batch: not a number"),
        ([1.0, 2.0], r"holds \[1\.0, 2\.0\] \(list\) in row 2 of the current batch: a list; a sample weight is one"),
        (True, r"holds True \(bool\) in row 2 of the current batch: not a number"),
    ]:
        rows = _with_sample_weights([1.0, 2.0, value, 1])
        with pytest.raises(WeightColumnError, match=message):
            collator(rows)
    batch = collator(_with_sample_weights([1.0, 2, 0.5, 1]))  # ints are numbers
    assert batch["hfw_sample_weight"].tolist() == [1.0, 2.0, 0.5, 1.0]


def test_packed_sft_keeps_its_per_token_sample_weights(tmp_path):
    """With packing the SFT trainer expands each sample's weight to its tokens: that list form is accepted."""
    from helpers import sft_rows, tiny_tokenizer

    from hfweight import WeightedSFTConfig, WeightedSFTTrainer

    rows = [dict(r, sample_weight=float(1 + i % 3)) for i, r in enumerate(sft_rows(8))]
    args = WeightedSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, max_length=32,
                             logging_steps=1,
                             packing=True, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             sample_weighting="static")
    trainer = WeightedSFTTrainer(model=tiny_model(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tiny_tokenizer())
    assert trainer._column_spec.sample_weight_per_token
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
