"""Type tests the training settings share. A bool is not a number here, though Python's bool is an int: YAML reads
``true`` as True, which would otherwise pass as 1."""

from __future__ import annotations

import math


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value, finite: bool = False) -> bool:
    """An int or float, not a bool; NaN passes (callers' range checks refuse it), inf only unless ``finite``."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and (not finite or math.isfinite(value))


def check_count_or_none(value, name: str, none: str) -> None:
    """``value`` is an int >= 1 or None; ``none`` says how None is spelt and what it means, e.g. "null (one epoch)"
    in a recipe, "None (one epoch)" for an argument."""
    if value is not None and not (is_int(value) and value >= 1):
        raise ValueError(f"{name} must be an int >= 1 or {none}, got {value!r}")
