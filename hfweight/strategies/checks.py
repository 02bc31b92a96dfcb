"""Argument checks shared by every strategy's constructor (token, sample, mixture and reward weighting).

Each check takes the value and ``what``: the argument's name as the user wrote it, so the error points at the config
line to fix. Two spellings are in use, one per config style:

- ``kwargs_field("mixture", "eta")`` → ``mixture_kwargs['eta']`` (mixture and reward weighting);
- ``strategy_field("sample_weighting", "loss", "temperature")`` → ``sample_weighting='loss': `temperature``` (token
  and sample weighting).

Every check returns the value converted (``float`` or ``int``) and raises ``ValueError`` with one message shape:
``<what> must be <condition>, got <value>.``. Numbers may be given as numeric strings (YAML reads ``1e-3`` as a
string); booleans are never numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def kwargs_field(kind: str, name: str) -> str:
    """``<kind>_kwargs['<name>']``: an entry of a ``*_kwargs`` dict (mixture, reward weighting)."""
    return f"{kind}_kwargs['{name}']"


def strategy_field(kind: str, strategy: str, name: str) -> str:
    """``<kind>='<strategy>': `<name>```: an argument of a named token or sample strategy."""
    return f"{kind}={strategy!r}: `{name}`"


def _as_float(value, what: str) -> float:
    """``value`` as a float: a real number or a numeric string, not a boolean, not NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise ValueError(f"{what} must be a number, got {value!r}.")
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {value!r}.") from None
    if math.isnan(out):
        raise ValueError(f"{what} must not be NaN.")
    return out


def number(value, what: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           finite: bool = True, hint: str = "") -> float:
    """A number ``≥ low`` (``> low`` with ``low_open``) and ``≤ high``; finite unless ``finite=False`` (then ±inf
    pass the bounds they satisfy, e.g. a temperature of ``inf``). ``hint`` follows the condition in the message."""
    out = _as_float(value, what)
    too_low = low is not None and (out < low or (low_open and out == low))
    too_high = high is not None and out > high
    if too_low or too_high or (finite and math.isinf(out)):
        bounds = [f"{'>' if low_open else '≥'} {low:g}"] if low is not None else []
        if high is not None:
            bounds.append(f"≤ {high:g}")
        condition = " ".join(part for part in ("a finite number" if finite else "", " and ".join(bounds)) if part)
        raise ValueError(f"{what} must be {condition}{hint}, got {out!r}.")
    return out


def in_range(value, what: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
             hint: str = "") -> float:
    """A number in the interval from ``low`` to ``high``, each end closed unless ``*_open`` (a fraction, a percent)."""
    out = _as_float(value, what)
    if out < low or out > high or (low_open and out == low) or (high_open and out == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{what} must be in {interval}{hint}, got {out!r}.")
    return out


def integer(value, what: str, minimum: int = 1) -> int:
    """An integer ``≥ minimum`` (a float with an integral value, such as ``2.0``, counts)."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or int(value) < minimum:
        raise ValueError(f"{what} must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def choice(value, what: str, options: Sequence[str], hint: str = "") -> str:
    """One of the strings ``options``; ``hint`` (what each option means) follows the value in the message."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{what} must be one of {list(options)}, got {value!r}{hint}.")
    return value


def flag(value, what: str) -> bool:
    """``True`` or ``False`` (not a truthy string or number)."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}.")
    return value


def is_finite_number(value) -> bool:
    """Whether ``value`` is a real, finite number (not a boolean): the test for each entry of a weights spec."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def spec_items(spec) -> list | None:
    """The ``(key, value)`` pairs of a per-domain or per-reward spec: a dict's items, or ``(index, value)`` for a list,
    tuple, tensor or array; ``None`` when ``spec`` is neither (the caller names what it expected)."""
    if isinstance(spec, Mapping):
        return list(spec.items())
    if isinstance(spec, Sequence | torch.Tensor | np.ndarray) and not isinstance(spec, str):
        return list(enumerate(spec.tolist() if hasattr(spec, "tolist") else spec))
    return None


def required_column(column, kind: str, column_name: str, holds: str):
    """``column`` (a static strategy's dataset column), or the error that says how to add it."""
    if column is None:
        raise ValueError(
            f"{kind}='static' needs a `{column_name}` column ({holds}) in the training dataset; add it or choose "
            f"another {kind}."
        )
    return column
