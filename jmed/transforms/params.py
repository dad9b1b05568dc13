"""Parsing and drawing of transform parameters: one rule for every transform.

Ranges: a scalar ``d`` means the range ``(centre - d, centre + d)`` (with ``centre`` 0
for shifts and angles, 1 for scale factors); a pair ``(a, b)`` means ``U(a, b)`` and needs
``a <= b``. Per-axis forms: 3 values give one scalar rule per axis, 6 values give
``(a0, b0, a1, b1, a2, b2)``. Two exceptions, as in TorchIO: quantities that cannot be
negative (standard deviations, strengths) read a scalar ``d`` as ``U(0, d)``
(``parse_nonnegative_range``), and counts read ``d`` as an integer in ``{0, ..., d}``
(``parse_count_range``).

Every parser validates in the constructor of a transform and raises a ``ValueError``
naming the argument, the value received and what is allowed. Write a new transform's
constructor with these functions, and its ``sample`` with ``uniform``:

Examples:
    >>> from jmed.transforms import params
    >>> params.parse_range(10, "degrees")
    (-10.0, 10.0)
    >>> params.parse_range(0.1, "scales", centre=1.0)
    (0.9, 1.1)
    >>> params.parse_nonnegative_range(0.25, "std")
    (0.0, 0.25)
    >>> params.parse_range_per_axis((1, 2, 3), "translation").tolist()
    [[-1.0, 1.0], [-2.0, 2.0], [-3.0, 3.0]]
    >>> params.int_triple(8, "patch_size")
    (8, 8, 8)
    >>> params.check_choice("nearest", "label_interpolation", ("nearest", "linear"))
    'nearest'
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed import _checks
from jmed._checks import check_choice, is_int, is_traced

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "AxesLike",
    "CountRangeLike",
    "FloatTripleLike",
    "ImageNames",
    "IntTripleLike",
    "PerAxisRangeLike",
    "RangeLike",
    "as_axes",
    "as_floating",
    "as_positive_int",
    "check_choice",
    "check_output_size",
    "check_probability",
    "finite_number",
    "float_triple",
    "int_triple",
    "is_int",
    "is_number",
    "is_traced",
    "max_output_bytes",
    "parse_count_range",
    "parse_nonnegative_range",
    "parse_nonnegative_range_per_axis",
    "parse_range",
    "parse_range_per_axis",
    "set_max_output_bytes",
    "uniform",
]

#: A range argument: a number ``d`` or a ``(low, high)`` pair.
RangeLike: TypeAlias = float | tuple[float, float]
#: A per-axis range argument: a number, a pair, 3 numbers or pairs, or 6 numbers.
PerAxisRangeLike: TypeAlias = float | Sequence[float] | Sequence[tuple[float, float]]
#: A count range: an int ``d`` (``0..d``) or a ``(low, high)`` pair of ints.
CountRangeLike: TypeAlias = int | tuple[int, int]
#: An int for all three axes, or 3 ints.
IntTripleLike: TypeAlias = int | Sequence[int]
#: A number for all three axes, or 3 numbers.
FloatTripleLike: TypeAlias = float | Sequence[float]
#: Data axes: an int or a sequence of ints (``RandomFlip`` also takes anatomical names).
AxesLike: TypeAlias = int | str | Sequence[int | str]
#: Names of images of a subject (``include=`` / ``exclude=``).
ImageNames: TypeAlias = Sequence[str] | str | None

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


def is_number(x: Any) -> bool:
    """True for Python and numpy real numbers, False for ``bool`` (and for arrays)."""
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
    if is_number(value):
        if value < 0:
            raise ValueError(f"{name} as a single number must be >= 0, got {value}")
        low, high = centre - float(value), centre + float(value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(map(is_number, value)):
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
    if is_number(value) or (isinstance(value, Sequence) and len(value) == 2):
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
    if not is_number(value) or not np.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_probability(p: Any, name: str) -> float:
    """``p`` as a float; a ValueError naming ``name`` unless it is a number in ``[0, 1]``."""
    if not is_number(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def as_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` as an int; a ValueError naming ``name`` unless it is an integer ``>= minimum``."""
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


def parse_nonnegative_range(value: Any, name: str) -> tuple[float, float]:
    """A range of a quantity that cannot be negative (a standard deviation, a strength):
    ``d`` -> ``(0, d)``, ``(a, b)`` -> ``(a, b)``, all ``>= 0`` (TorchIO's rule)."""
    if is_number(value):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        value = (0.0, float(value))
    return parse_range(value, name, min_value=0.0)


def parse_nonnegative_range_per_axis(value: Any, name: str) -> np.ndarray:
    """1, 2, 3 or 6 values -> ``(3, 2)`` per-axis ``(low, high)`` with the rule of
    ``parse_nonnegative_range``."""
    if is_number(value) or (isinstance(value, Sequence) and len(value) == 2):
        return np.array([parse_nonnegative_range(value, name)] * 3)
    if isinstance(value, Sequence) and len(value) == 3:
        return np.array([parse_nonnegative_range(v, f"{name}[{i}]") for i, v in enumerate(value)])
    if isinstance(value, Sequence) and len(value) == 6:
        return np.array(
            [
                parse_nonnegative_range(tuple(value[2 * i : 2 * i + 2]), f"{name}[{2 * i}:{2 * i + 2}]")
                for i in range(3)
            ]
        )
    raise ValueError(f"{name} must be a number, a (low, high) pair, 3 or 6 values, got {value!r}")


def parse_count_range(value: Any, name: str) -> tuple[int, int]:
    """TorchIO's rule for counts: ``d`` -> ``{0..d}``, ``(a, b)`` -> ``{a..b}``; ints >= 0."""
    if is_int(value):
        value = (0, int(value))
    try:
        low, high = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a (low, high) pair of ints, got {value!r}") from None
    for v in (low, high):
        if not is_int(v):
            raise ValueError(f"{name} must be an int or a (low, high) pair of ints, got {value!r}")
    if low < 0 or high < low:
        raise ValueError(f"{name} must be >= 0 with low <= high, got {value!r}")
    return int(low), int(high)


def float_triple(value: Any, name: str) -> tuple[float, float, float]:
    """A finite number (used for all three axes) or 3 finite numbers, as floats."""
    items = (value,) * 3 if is_number(value) else None
    if items is None:
        try:
            items = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be one number or 3 numbers, got {value!r}") from None
    if len(items) != 3:
        raise ValueError(f"{name} must be one value or 3 values, got {value!r}")
    if not all(is_number(v) for v in items):
        raise ValueError(f"{name} must be numbers, got {value!r}")
    if not all(np.isfinite(float(v)) for v in items):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return tuple(float(v) for v in items)  # type: ignore[return-value]


def uniform(key: jax.Array, low: ArrayLike, high: ArrayLike, shape: Sequence[int] = ()) -> jax.Array:
    """float32 draws from ``U(low, high)`` (``low``/``high`` broadcast against ``shape``):
    the draw of every parsed range."""
    low, high = jnp.asarray(low, jnp.float32), jnp.asarray(high, jnp.float32)
    return jax.random.uniform(key, tuple(shape), jnp.float32) * (high - low) + low


def as_floating(x: ArrayLike) -> jax.Array:
    """``x`` as a JAX array, cast to float32 unless it is floating point already: the dtype
    rule of intensity transforms (integer input gives float32 output)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def int_triple(value: Any, name: str, *, minimum: int = 1) -> tuple[int, int, int]:
    """An int (used for all three axes) or 3 ints, each ``>= minimum`` (sizes, shapes,
    control-point counts).

    Raises:
        ValueError: naming ``name``, the value and what is allowed.
    """
    values = _checks.int_triple(value, name, minimum=-(2**63))
    if min(values) < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {what} (an int or 3 ints >= {minimum}), got {value!r}")
    return values
