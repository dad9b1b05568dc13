"""The ``jmed`` command.

Subcommands::

    jmed info PATH [--stats] [--label]
    jmed transform IN OUT NAME [--kwargs "degrees=10 scales=(0.9, 1.1)"] [--seed N] [--label] [--overwrite]
    jmed plot PATH [--label SEG] -o OUT.png
    jmed landmarks PATHS... -o landmarks.npy [--mask MASK ...]
    jmed cache PATHS... --cache-dir DIR [--name NAME] [--label]

``transform`` applies any transform of ``jmed.transforms`` by name to one file, like
TorchIO's ``tiotr``; a random transform gets the key ``jax.random.key(seed)``, so the
result equals ``Transform(**kwargs)(jax.random.key(seed), image)`` in Python. Exit status:
0 on success, 1 when an input is unusable (missing or damaged file, bad transform name or
keyword arguments, refused overwrite) or an output cannot be written (missing folder, no
permission, disk full, file too large), 2 on a malformed command line; every error is one
line on stderr, without a traceback. The input file is never overwritten, and every output
is written atomically (an existing output survives a failed write). ``info`` reads only
the header (it works on a truncated file); ``info --stats`` reads the voxels.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "parse_kwargs"]


class CommandError(Exception):
    """An error to report to the user with exit status 1."""


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``"a=1 b=(2, 3) c=linear"`` into ``{"a": 1, "b": (2, 3), "c": "linear"}``.

    Values are Python literals; anything that is not a literal is taken as a string.
    """
    if not text:
        return {}
    out: dict[str, Any] = {}
    tokens: list[str] = []
    depth = 0
    quote = ""
    current = ""
    for char in text.strip():
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char.isspace() and depth == 0 and not quote:
            if current:
                tokens.append(current)
            current = ""
        else:
            current += char
    if current:
        tokens.append(current)
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep or not name.isidentifier():
            raise CommandError(f"--kwargs: expected NAME=VALUE, got {token!r}")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


def _load(path: str, kind: str, *, lazy: bool = False):
    import jmed

    try:
        return jmed.load(path, kind=kind, lazy=lazy)
    except (FileNotFoundError, IsADirectoryError, ValueError) as err:
        raise CommandError(str(err)) from err


def _transform_class(name: str):
    from jmed import transforms
    from jmed.transforms.base import Transform

    candidate = getattr(transforms, name, None)
    if not (inspect.isclass(candidate) and issubclass(candidate, Transform)):
        available = sorted(
            n
            for n in getattr(transforms, "__all__", dir(transforms))
            if inspect.isclass(getattr(transforms, n, None))
            and issubclass(getattr(transforms, n), Transform)
            and n
            not in ("Transform", "IntensityTransform", "Compose", "OneOf", "SomeOf", "RandomApply", "Lambda")
        )
        raise CommandError(f"unknown transform {name!r}; available: {', '.join(available)}")
    return candidate


def _check_output_folder(output: str) -> None:
    folder = Path(output).parent
    if not folder.exists():
        raise CommandError(f"cannot write {output}: folder {folder} does not exist")
    if not folder.is_dir():
        raise CommandError(f"cannot write {output}: {folder} is a file, not a folder")


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def cmd_info(args: argparse.Namespace) -> None:
    image = _load(args.path, "label" if args.label else "intensity", lazy=not args.stats)
    affine = np.asarray(image.affine)
    print(f"path:        {args.path}")
    print(f"kind:        {image.kind}")
    print(f"shape:       {image.shape} (x, y, z, channels)")
    print(f"spacing:     {tuple(round(float(s), 4) for s in image.spacing)} mm")
    print(f"origin:      {tuple(round(float(s), 4) for s in image.origin)} mm")
    print(f"orientation: {image.orientation}")
    print(f"dtype:       {image.dtype}")
    print("affine:\n" + np.array2string(affine, precision=4, suppress_small=True))
    if args.stats:
        try:
            data = np.asarray(image.data)
        except ValueError as err:
            raise CommandError(str(err)) from err
        p = np.percentile(data, [0.5, 50, 99.5])
        print(
            f"values:      min {data.min():.6g}  max {data.max():.6g}  mean {data.mean():.6g}  "
            f"std {data.std():.6g}  p0.5 {p[0]:.6g}  median {p[1]:.6g}  p99.5 {p[2]:.6g}"
        )
        if image.kind == "label":
            labels, counts = np.unique(data, return_counts=True)
            print("labels:      " + ", ".join(f"{v}: {c}" for v, c in zip(labels, counts)))


def cmd_transform(args: argparse.Namespace) -> None:
    import jax

    import jmed

    if _same_file(args.input, args.output):
        raise CommandError(f"output {args.output} is the input file; refusing to overwrite it")
    _check_output_folder(args.output)
    cls = _transform_class(args.name)
    kwargs = parse_kwargs(args.kwargs)
    try:
        transform = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise CommandError(f"{args.name}({args.kwargs or ''}): {err}") from err
    try:
        key = jax.random.key(args.seed)
    except (OverflowError, ValueError, TypeError):
        raise CommandError(f"--seed must fit in a 64-bit integer, got {args.seed}") from None
    image = _load(args.input, "label" if args.label else "intensity")
    key = key if transform.is_random else None
    try:
        out = transform(key, image)
    except (TypeError, ValueError, KeyError) as err:
        raise CommandError(f"{args.name} failed on {args.input}: {err}") from err
    try:
        jmed.save(out, args.output, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from err
    print(f"wrote {args.output}")


def cmd_plot(args: argparse.Namespace) -> None:
    from jmed import plot

    image = _load(args.path, "intensity")
    label = _load(args.label, "label") if args.label else None
    if Path(args.output).exists() and not args.overwrite:
        raise CommandError(f"{args.output} exists; pass --overwrite to replace it")
    _check_output_folder(args.output)
    plot.plot_image(image, label=label, output=args.output)
    print(f"wrote {args.output}")


def cmd_landmarks(args: argparse.Namespace) -> None:
    from jmed.transforms import normalization

    for path in list(args.paths) + list(args.mask or []):
        if not Path(path).is_file():
            raise CommandError(f"no such image file: {path}")
    if args.mask and len(args.mask) != len(args.paths):
        raise CommandError(
            f"--mask needs one mask per image: got {len(args.mask)} masks for {len(args.paths)} images"
        )
    if Path(args.output).exists() and not args.overwrite:
        raise CommandError(f"{args.output} exists; pass --overwrite to replace it")
    _check_output_folder(args.output)
    try:
        landmarks = normalization.train_histogram(
            list(args.paths), masks=list(args.mask) if args.mask else None, progress=True
        )
        normalization.save_landmarks(landmarks, args.output)
    except (ValueError, FileNotFoundError) as err:
        raise CommandError(str(err)) from err
    print(f"wrote {args.output}")


def cmd_cache(args: argparse.Namespace) -> None:
    from jmed import data

    for path in args.paths:
        if not Path(path).is_file():
            raise CommandError(f"no such image file: {path}")
    records = [{args.name: path} for path in args.paths]
    source = data.SubjectsSource(
        records, label_names=[args.name] if args.label else [], cache_dir=args.cache_dir
    )
    for i, path in enumerate(args.paths):
        try:
            subject = source[i]
        except (RuntimeError, ValueError) as err:
            raise CommandError(str(err)) from err
        print(f"{path}: {subject[args.name].shape} cached in {args.cache_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jmed", description="3D medical images for deep learning in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print header facts of an image file")
    p.add_argument("path")
    p.add_argument("--stats", action="store_true", help="also read the voxels and print value statistics")
    p.add_argument("--label", action="store_true", help="read as a label map")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("transform", help="apply a transform to an image file")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("name", help="transform class name, e.g. RandomAffine")
    p.add_argument("--kwargs", help='keyword arguments, e.g. "degrees=10 scales=(0.9, 1.1)"')
    p.add_argument("--seed", type=int, default=0, help="seed of the key for random transforms (default 0)")
    p.add_argument("--label", action="store_true", help="read the input as a label map")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("plot", help="orthogonal slices of an image (with a label overlay) to a PNG")
    p.add_argument("path")
    p.add_argument("--label", help="label map to overlay")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("landmarks", help="train histogram standardisation landmarks")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--output", required=True, help="landmarks file (.npy or .json)")
    p.add_argument("--mask", nargs="+", help="one mask per image (optional)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_landmarks)

    p = sub.add_parser("cache", help="decode volumes once into a loader cache folder (no preprocessing)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--name", default="image", help="image name in the loader's records (default 'image')")
    p.add_argument("--label", action="store_true", help="the files are label maps")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jmed`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CommandError as err:
        print(f"jmed {args.command}: error: {err}", file=sys.stderr)
        return 1
    except MemoryError as err:
        print(f"jmed {args.command}: error: out of memory ({err or 'no details'})", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        # files and folders the user named: missing, read-only, full disk, file too large
        detail = str(err) or type(err).__name__
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in detail:
            detail = f"{err.filename}: {detail}"
        print(f"jmed {args.command}: error: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
