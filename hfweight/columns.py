"""Weight and domain columns: validation with errors that name the row, and collation next to the model inputs.

The columns (docs/methods.md#columns): ``domain`` (str or int; the name is configurable), ``sample_weight`` (float per
row), ``token_weights`` (floats aligned with ``input_ids``) and ``ref_logps`` (reference log-probabilities aligned with
``input_ids``; entry ``j`` scores token ``j`` given the tokens before it, entry 0 is unused).

Two layers of checks:

- :func:`validate_dataset` scans a map-style ``datasets.Dataset`` once, with Arrow compute (fast on millions of rows),
  before training starts, so an error names the dataset row and the fix.
- :class:`WeightingCollator` re-checks each batch cheaply, which is what catches bad rows of a streaming dataset.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .config import REF_LOGPS_COLUMN, SAMPLE_WEIGHT_COLUMN, TOKEN_WEIGHTS_COLUMN

# Keys under which the collator hands weighting data to the trainer; stripped before the model's forward.
BATCH_PREFIX = "hfw_"
BATCH_SAMPLE_WEIGHT = "hfw_sample_weight"
BATCH_TOKEN_WEIGHTS = "hfw_token_weights"
BATCH_REF_LOGPS = "hfw_ref_logps"
BATCH_DOMAIN = "hfw_domain"


class WeightColumnError(ValueError):
    """A weight or domain column is missing, misaligned or holds a bad value."""


@dataclass
class ColumnSpec:
    """Which columns the configured strategies read, and how strictly."""

    sample_weight: bool = False
    token_weights: bool = False
    ref_logps: bool = False
    domain: bool = False
    domain_column: str = "domain"
    allow_negative: bool = False
    sample_weight_per_token: bool = False
    """Whether ``sample_weight`` arrives as one copy per token (the SFT trainer's packing expands it so); otherwise a
    list-valued ``sample_weight`` is an error."""
    required: set[str] = field(default_factory=set)
    """Columns that must be present (the others are used when present)."""
    required_by: dict[str, str] = field(default_factory=dict)
    """For error messages: which setting requires each required column."""

    @property
    def names(self) -> list[str]:
        out = []
        if self.sample_weight:
            out.append(SAMPLE_WEIGHT_COLUMN)
        if self.token_weights:
            out.append(TOKEN_WEIGHTS_COLUMN)
        if self.ref_logps:
            out.append(REF_LOGPS_COLUMN)
        if self.domain:
            out.append(self.domain_column)
        return out


# ---- dataset-level validation ---------------------------------------------------------------------------------------


def _first_row(mask: pa.Array | np.ndarray) -> int | None:
    """Index of the first True in a boolean array, or None."""
    arr = mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array) else mask
    arr = np.asarray(arr, dtype=bool)
    hits = np.flatnonzero(arr)
    return int(hits[0]) if hits.size else None


def _check_values(values: np.ndarray, column: str, allow_negative: bool, upper: float | None = None) -> tuple[int, str]:
    """Return (first bad position, reason) among float values, or (-1, "")."""
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return i, f"{values[i]} (NaN or inf)"
    if not allow_negative:
        neg = values < 0
        if neg.any():
            i = int(np.flatnonzero(neg)[0])
            return i, f"{values[i]} (negative; pass allow_negative_weights=True to opt in)"
    if upper is not None:
        high = values > upper
        if high.any():
            i = int(np.flatnonzero(high)[0])
            return i, f"{values[i]} (a log-probability must be ≤ 0)"
    return -1, ""


def _is_number_type(arrow_type: pa.DataType) -> bool:
    """Integers and floats: what a weight may be (booleans are not: True/False as weights is almost surely a
    mislabeled keep/drop flag, and silently reading them as 1/0 would hide it)."""
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def _is_number(value: Any) -> bool:
    """An int or float (numpy's too), not a bool: the Python-side twin of :func:`_is_number_type`."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _describe_value(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def sample_weight_type_problem(column: pa.ChunkedArray, per_token: bool) -> tuple[int, str] | None:
    """``(row, what is wrong)`` when ``sample_weight`` is not one number per row (nor, with ``per_token``, a list of
    numbers per row), else None. The row is the first whose value is not a number."""
    arrow_type = column.type
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        if not per_token:
            row = _first_row(column.is_valid().combine_chunks())
            return row, (
                f"a list, {_describe_value(column[row].as_py())}; a sample weight is one number per row (per-token "
                "weights go in the `token_weights` column)"
            )
        arrow_type = arrow_type.value_type
        if _is_number_type(arrow_type):
            return None
        return 0, f"a list of {arrow_type} values; a sample weight is a number"
    if _is_number_type(arrow_type):
        return None
    values = column.to_pylist()
    row = next((i for i, v in enumerate(values) if v is not None), 0)
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        row = next((i for i, v in enumerate(values) if v is not None and not _parses_as_float(v)), row)
    return row, f"{_describe_value(values[row])}; a sample weight must be a number (int or float)"


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _flat_floats(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten a list<float> column; return (values, the row of each value)."""
    arr = column.combine_chunks()
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float64)
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
    return values, parents


def validate_dataset(dataset: Any, spec: ColumnSpec, input_column: str = "input_ids", batch_size: int = 65536) -> None:
    """Scan the weight/domain columns of a map-style ``datasets.Dataset`` and raise on the first bad row.

    Errors (:class:`WeightColumnError`) name the column, the dataset row and what would fix it. Streaming datasets are
    checked batch by batch by the collator instead.
    """
    columns = set(dataset.column_names)
    for name in sorted(spec.required):
        if name not in columns:
            raise WeightColumnError(
                f"Column {name!r} is required by {spec.required_by.get(name, 'the weighting config')} but the training "
                f"dataset has only {sorted(columns)}. Add the column, or change the setting."
            )
    checked = [name for name in spec.names if name in columns]
    if not checked:
        return
    need_lengths = any(n in columns for n in (TOKEN_WEIGHTS_COLUMN, REF_LOGPS_COLUMN))
    if need_lengths and input_column not in columns:
        raise WeightColumnError(
            f"Per-token columns are aligned with {input_column!r}, which the training dataset lacks; tokenize it first "
            "(the SFT trainer does this for you)."
        )
    read = checked + ([input_column] if need_lengths else [])
    offset = 0
    for table in dataset.select_columns(read).with_format("arrow").iter(batch_size=batch_size):
        for name in checked:
            column = table[name]
            nulls = _first_row(column.is_null().combine_chunks())
            if nulls is not None:
                raise WeightColumnError(
                    f"Column {name!r} is missing a value (null) at row {offset + nulls}; give every row a value."
                )
            if name == spec.domain_column:
                continue
            if name == SAMPLE_WEIGHT_COLUMN:
                problem = sample_weight_type_problem(column, spec.sample_weight_per_token)
                if problem is not None:
                    row, why = problem
                    raise WeightColumnError(
                        f"Column {name!r} holds {why}, at row {offset + row}. Fix that row, or convert the column "
                        f"(e.g. dataset.cast_column({name!r}, datasets.Value('float32')) for numbers stored as text)."
                    )
                if pa.types.is_list(column.type):  # expanded to one value per token for packing
                    values, rows = _flat_floats(column)
                else:
                    values = column.combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)
                    rows = np.arange(len(values))
                i, why = _check_values(values, name, spec.allow_negative)
                if i >= 0:
                    raise WeightColumnError(
                        f"Column {name!r} has the value {why} at row {offset + int(rows[i])}; sample weights must be "
                        "finite and ≥ 0. Fix or drop that row."
                    )
                continue
            # token_weights / ref_logps: one value per input token
            lengths = pc.list_value_length(column.combine_chunks()).to_numpy(zero_copy_only=False)
            expected = pc.list_value_length(table[input_column].combine_chunks()).to_numpy(zero_copy_only=False)
            mismatch = _first_row(lengths != expected)
            if mismatch is not None:
                raise WeightColumnError(
                    f"Column {name!r} has {lengths[mismatch]} entries but {input_column!r} has {expected[mismatch]} at "
                    f"row {offset + mismatch}; per-token columns must align one-to-one with {input_column!r}."
                )
            values, parents = _flat_floats(column)
            if name == REF_LOGPS_COLUMN:
                i, why = _check_values(values, name, allow_negative=True, upper=1e-4)
            else:
                i, why = _check_values(values, name, spec.allow_negative)
            if i >= 0:
                raise WeightColumnError(
                    f"Column {name!r} has the value {why} at row {offset + int(parents[i])}; fix or drop that row."
                )
        offset += table.num_rows


# ---- domains ------------------------------------------------------------------------------------------------------


def discover_domains(dataset: Any, column: str) -> tuple[list, torch.Tensor]:
    """Sorted distinct domain values of a map-style dataset and their row counts.

    Returns:
        ``(values, counts)``: values as they appear in the column (str or int), sorted; counts as a float64 tensor.
    """
    table = dataset.select_columns([column]).with_format("arrow")[:]
    counts = pc.value_counts(table[column].combine_chunks())
    values = counts.field("values").to_pylist()
    sizes = counts.field("counts").to_pylist()
    order = sorted(range(len(values)), key=lambda i: (str(type(values[i])), values[i]))
    return [values[i] for i in order], torch.tensor([sizes[i] for i in order], dtype=torch.float64)


# ---- collation ----------------------------------------------------------------------------------------------------


def _placement(batch: dict, lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of each example's tokens in the collated batch.

    Padded batches: one example per row, starting at 0 (right padding) or at ``T − L`` (left padding, read from the
    attention mask). Padding-free batches (TRL's ``padding_free``/packing: every example concatenated into one row):
    consecutive runs of one row.
    """
    rows, width = batch["input_ids"].shape
    if rows == 1 and len(lengths) > 1:
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        if starts[-1] + lengths[-1] > width:
            raise WeightColumnError("The padding-free batch is shorter than its examples; per-token weights would misalign.")
        return [(0, start, length) for start, length in zip(starts, lengths)]
    mask = batch.get("attention_mask")
    placement = []
    for i, length in enumerate(lengths):
        if length > width:
            raise WeightColumnError(
                f"Row {i} of this batch has {length} tokens but the collated batch is {width} wide: the collator "
                "truncated it, so per-token weights would misalign. Truncate the dataset before training instead."
            )
        left_padded = mask is not None and length < width and int(mask[i, 0]) == 0
        placement.append((i, width - length if left_padded else 0, length))
    return placement


def _check_tensor(values: torch.Tensor, column: str, allow_negative: bool, upper: float | None = None) -> None:
    bad = ~torch.isfinite(values)
    reason = "NaN or inf"
    if not bad.any() and not allow_negative:
        bad, reason = values < 0, "negative (pass allow_negative_weights=True to opt in)"
    if not bad.any() and upper is not None:
        bad, reason = values > upper, "above 0 (a log-probability must be ≤ 0)"
    if bad.any():
        row = int(bad.nonzero()[0][0])
        raise WeightColumnError(f"Column {column!r} holds a value that is {reason} in row {row} of the current batch.")


class WeightingCollator:
    """Wraps the trainer's collator: strips the weight/domain columns from each feature, collates the rest with the
    wrapped collator, then adds the columns back as tensors under ``hfw_*`` keys, aligned with the padded batch.

    Args:
        inner: The collator being wrapped.
        spec: Which columns to carry.
        domain_index: Maps each domain value to its index; an unknown value is an error naming it.
    """

    def __init__(self, inner: Callable, spec: ColumnSpec, domain_index: dict | None = None):
        self.inner = inner
        self.spec = spec
        self.domain_index = domain_index or {}

    def __call__(self, features: list[dict]) -> dict:
        names = self.spec.names
        extras = [{k: f[k] for k in names if k in f} for f in features]
        stripped = [{k: v for k, v in f.items() if k not in names} for f in features]
        batch = self.inner(stripped)
        if not extras or not extras[0]:
            return batch
        present = set(extras[0])
        for i, e in enumerate(extras):
            if set(e) != present:
                raise WeightColumnError(
                    f"Row {i} of this batch has weight columns {sorted(e)} but row 0 has {sorted(present)}; every row "
                    "needs the same columns."
                )
        placement = None  # computed on first use: where each row's tokens sit in the collated batch
        for column, key in self._columns():
            if column not in present:
                continue
            values = [e[column] for e in extras]
            if column == SAMPLE_WEIGHT_COLUMN:
                self._check_sample_weights(values)
            if isinstance(values[0], (list, tuple)):
                if placement is None:
                    placement = _placement(batch, [len(f["input_ids"]) for f in stripped])
                out = self._per_token(column, values, placement, batch["input_ids"].shape)
            elif column == self.spec.domain_column:
                out = torch.tensor([self._domain(v) for v in values], dtype=torch.long)
            else:
                out = torch.tensor([float(v) for v in values], dtype=torch.float32)
            if column == REF_LOGPS_COLUMN:
                _check_tensor(out, column, allow_negative=True, upper=1e-4)
            elif column != self.spec.domain_column:
                _check_tensor(out, column, self.spec.allow_negative)
            batch[key] = out
        return batch

    def _check_sample_weights(self, values: list) -> None:
        """Each row's ``sample_weight`` is a number (a list of numbers only where packing expanded it per token)."""
        for row, value in enumerate(values):
            if isinstance(value, (list, tuple)):
                if not self.spec.sample_weight_per_token:
                    problem = "a list; a sample weight is one number per row (per-token weights go in `token_weights`)"
                elif all(_is_number(v) for v in value):
                    continue
                else:
                    problem = "a list holding something other than numbers"
            elif _is_number(value):
                continue
            else:
                problem = "not a number (int or float)"
            raise WeightColumnError(
                f"Column {SAMPLE_WEIGHT_COLUMN!r} holds {_describe_value(value)} in row {row} of the current batch: "
                f"{problem}. Fix that row."
            )

    def _columns(self) -> list[tuple[str, str]]:
        return [
            (SAMPLE_WEIGHT_COLUMN, BATCH_SAMPLE_WEIGHT),
            (TOKEN_WEIGHTS_COLUMN, BATCH_TOKEN_WEIGHTS),
            (REF_LOGPS_COLUMN, BATCH_REF_LOGPS),
            (self.spec.domain_column, BATCH_DOMAIN),
        ]

    def _per_token(self, column: str, values: list, placement: list[tuple[int, int, int]], shape) -> torch.Tensor:
        """Lay per-token lists out like the collated ``input_ids`` (padded rows, or one padding-free row)."""
        is_domain = column == self.spec.domain_column
        out = torch.zeros(shape, dtype=torch.long if is_domain else torch.float32)
        for i, (value, (row, start, length)) in enumerate(zip(values, placement)):
            if len(value) != length:
                raise WeightColumnError(
                    f"Column {column!r} has {len(value)} entries but 'input_ids' has {length} in row {i} of the "
                    "current batch; per-token columns must align one-to-one with 'input_ids'."
                )
            if is_domain:
                value = [self._domain(v) for v in value]
            out[row, start : start + length] = torch.as_tensor(value, dtype=out.dtype)
        return out

    def _domain(self, value) -> int:
        try:
            return self.domain_index[value]
        except KeyError:
            raise WeightColumnError(
                f"Domain {value!r} in column {self.spec.domain_column!r} is not one of the known domains "
                f"{list(self.domain_index)}; declare it (mixture_kwargs['domains']) or fix the row."
            ) from None
        except TypeError:
            raise WeightColumnError(
                f"Column {self.spec.domain_column!r} holds {value!r}; a domain must be a string or an integer."
            ) from None
