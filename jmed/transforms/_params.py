"""Parameter parsing shared by all transforms.

One rule everywhere: a scalar ``d`` means the range ``(centre - d, centre + d)`` (with
``centre`` 0 for shifts and angles, 1 for scale factors); a pair ``(a, b)`` means
``U(a, b)`` and needs ``a <= b``. Per-axis forms: 3 values give one scalar rule per axis,
6 values give ``(a0, b0, a1, b1, a2, b2)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_axes",
    "as_positive_int",
    "parse_range",
    "parse_range_per_axis",
    "check_probability",
]


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def parse_range(
    value: Any,
    name: str,
    *,
    centre: float = 0.0,
    min_value: float | None = None,
    max_value: float | None = None,
) -> tuple[float, float]:
    """Parse a scalar or a pair into ``(low, high)`` (see module docstring)."""
    if _is_number(value):
        if value < 0:
            raise ValueError(f"{name} as a single number must be >= 0, got {value}")
        low, high = centre - float(value), centre + float(value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(map(_is_number, value)):
        low, high = float(value[0]), float(value[1])
        if low > high:
            raise ValueError(f"{name} range must have low <= high, got {tuple(value)}")
    else:
        raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if min_value is not None and low < min_value:
        raise ValueError(f"{name} values must be >= {min_value}, got range ({low}, {high})")
    if max_value is not None and high > max_value:
        raise ValueError(f"{name} values must be <= {max_value}, got range ({low}, {high})")
    return low, high


def parse_range_per_axis(
    value: Any,
    name: str,
    *,
    centre: float = 0.0,
    min_value: float | None = None,
    max_value: float | None = None,
) -> np.ndarray:
    """Parse 1, 2, 3 or 6 values into an array ``(3, 2)`` of per-axis ``(low, high)``."""
    kw = dict(centre=centre, min_value=min_value, max_value=max_value)
    if _is_number(value) or (isinstance(value, Sequence) and len(value) == 2):
        low_high = parse_range(value, name, **kw)
        return np.array([low_high] * 3)
    if isinstance(value, Sequence) and len(value) == 3:
        return np.array([parse_range(v, f"{name}[{i}]", **kw) for i, v in enumerate(value)])
    if isinstance(value, Sequence) and len(value) == 6:
        return np.array(
            [
                parse_range(tuple(value[2 * i : 2 * i + 2]), f"{name}[{2 * i}:{2 * i + 2}]", **kw)
                for i in range(3)
            ]
        )
    raise ValueError(
        f"{name} must be a number, a (low, high) pair, 3 values (one per axis) or "
        f"6 values (low, high per axis), got {value!r}"
    )


def check_probability(p: Any, name: str) -> float:
    if not _is_number(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def as_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def as_axes(axes: Any, name: str = "axes", *, ndim: int = 3) -> tuple[int, ...]:
    """Normalise an int or a sequence of ints to a sorted tuple of distinct axes."""
    if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
        axes = (axes,)
    try:
        out = tuple(int(a) for a in axes)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of ints, got {axes!r}") from None
    for a in out:
        if not 0 <= a < ndim:
            raise ValueError(f"{name} must be in [0, {ndim - 1}], got {axes!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat an axis, got {axes!r}")
    return tuple(sorted(out))
