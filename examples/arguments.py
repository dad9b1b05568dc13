"""Command-line argument types shared by the examples.

Kept free of JAX: the examples parse their arguments before importing JAX, so that
``--devices`` can still set ``XLA_FLAGS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def positive(kind: type = int) -> Callable[[str], int | float]:
    """An argparse ``type`` accepting a positive ``int`` (or ``float``), with an error that
    names the expected kind and the text given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse
