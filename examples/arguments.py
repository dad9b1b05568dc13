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


def check_unet_patches(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks shared by the U-Net examples, as usage errors naming the option:
    ``--patch-size`` a multiple of 4 and at most ``--volume-size``, ``--num-workers`` >= 0."""
    if args.patch_size % 4:
        parser.error(f"--patch-size must be a multiple of 4 (the U-Net pools twice), got {args.patch_size}")
    if args.patch_size > args.volume_size:
        parser.error(f"--patch-size ({args.patch_size}) must not exceed --volume-size ({args.volume_size})")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
