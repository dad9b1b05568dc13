"""Parameter parsing shared by all transforms.

One rule everywhere: a scalar ``d`` means the range ``(centre - d, centre + d)`` (with
``centre`` 0 for shifts and angles, 1 for scale factors); a pair ``(a, b)`` means
``U(a, b)`` and needs ``a <= b``. Per-axis forms: 3 values give one scalar rule per axis,
6 values give ``(a0, b0, a1, b1, a2, b2)``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_axes",
    "as_positive_int",
    "parse_range",
    "parse_range_per_axis",
    "check_probability",
    "finite_number",
    "check_output_size",
    "max_output_bytes",
    "set_max_output_bytes",
]

# A volume larger than this is refused before anything is compiled or allocated: a
# mistyped spacing or size otherwise asks XLA for a buffer of tens of gigabytes, and the
# process aborts when the result is read instead of raising.
DEFAULT_MAX_OUTPUT_BYTES = 2**32
_max_output_bytes: int | None = None


def max_output_bytes() -> int:
    """The largest output volume (bytes, all channels) a transform may create.

    ``set_max_output_bytes(n)`` sets it; otherwise the environment variable
    ``JMED_MAX_OUTPUT_BYTES``; otherwise ``DEFAULT_MAX_OUTPUT_BYTES`` (4 GiB).
    """
    if _max_output_bytes is not None:
        return _max_output_bytes
    text = os.environ.get("JMED_MAX_OUTPUT_BYTES")
    if text:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"JMED_MAX_OUTPUT_BYTES must be an integer number of bytes, got {text!r}"
            ) from None
        if value < 1:
            raise ValueError(f"JMED_MAX_OUTPUT_BYTES must be >= 1, got {text!r}")
        return value
    return DEFAULT_MAX_OUTPUT_BYTES


def set_max_output_bytes(value: int | None) -> int | None:
    """Set the limit of ``max_output_bytes`` (``None``: back to the default); returns the
    previous setting."""
    global _max_output_bytes
    if value is not None:
        value = as_positive_int(value, "max_output_bytes")
    previous, _max_output_bytes = _max_output_bytes, value
    return previous


def check_output_size(who: str, shape: Sequence[int], *, channels: int = 1, itemsize: int = 4) -> None:
    """Raise a ValueError naming ``who``, ``shape`` and the limit when a volume of
    ``shape`` x ``channels`` items of ``itemsize`` bytes exceeds ``max_output_bytes()``."""
    nbytes = math.prod(int(n) for n in shape) * int(channels) * int(itemsize)
    limit = max_output_bytes()
    if nbytes > limit:
        raise ValueError(
            f"{who}: output shape {tuple(int(n) for n in shape)} x {int(channels)} channel(s) needs "
            f"{nbytes / 2**30:.3g} GiB, more than the limit of {limit / 2**30:.3g} GiB per volume "
            "(check the target size or spacing; raise the limit with "
            "jmed.transforms.set_max_output_bytes or JMED_MAX_OUTPUT_BYTES)"
        )


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


def finite_number(value: Any, name: str) -> float:
    """``value`` as a float; a ValueError naming ``name`` unless it is a finite real number."""
    if not _is_number(value) or not np.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


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
        items = tuple(axes)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of ints, got {axes!r}") from None
    if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in items):
        raise ValueError(f"{name} must be an int or a sequence of ints, got {axes!r}")
    out = tuple(int(a) for a in items)
    for a in out:
        if not 0 <= a < ndim:
            raise ValueError(f"{name} must be in [0, {ndim - 1}], got {axes!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat an axis, got {axes!r}")
    return tuple(sorted(out))
