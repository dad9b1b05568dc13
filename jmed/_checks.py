"""Argument checks and tracing tests shared by every module outside ``jmed.transforms``.

Transforms have the public ``jmed.transforms.params`` for their ranges and choices; the
loader, samplers, inference, buckets and ops use these, so that an int-or-3-ints argument
is read and refused the same way everywhere.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["check_choice", "int_triple", "is_int", "is_traced"]


def is_traced(*xs: Any) -> bool:
    """True when any of ``xs`` is a JAX tracer (inside ``jit``, ``vmap``, ``grad``, ...)."""
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def is_int(x: Any) -> bool:
    """True for Python and numpy integers, False for ``bool``."""
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, bool)


def int_triple(value: Any, name: str, *, minimum: int = 1) -> tuple[int, int, int]:
    """An int (used for all three axes) or 3 ints, each ``>= minimum``.

    Raises:
        ValueError: naming ``name``, the value and what is allowed.
    """
    if is_int(value):
        values = (int(value),) * 3
    elif isinstance(value, (Sequence, np.ndarray)) and len(value) == 3 and all(is_int(v) for v in value):
        values = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name} values must be >= {minimum}, got {value!r}")
    return values  # type: ignore[return-value]


def check_choice(value: Any, name: str, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``.

    Raises:
        ValueError: naming ``name``, the value and the allowed values.
    """
    try:
        ok = value in allowed
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value
