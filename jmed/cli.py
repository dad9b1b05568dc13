"""The ``jmed`` command.

Subcommands::

    jmed info PATH [--stats] [--label]
    jmed transform IN OUT NAME [--kwargs "degrees=10 scales=(0.9, 1.1)"] [--seed N] [--label] [--overwrite]
    jmed transform --list
    jmed plot PATH [--label SEG] -o OUT.png
    jmed landmarks PATHS... -o landmarks.npy [--mask MASK ...]
    jmed cache PATHS... --cache-dir DIR [--name NAME] [--label]
    jmed convert IN OUT [--chunks N [N N]] [--levels L] [--label] [--overwrite]

``transform`` applies any transform of ``jmed.transforms`` by name to one file, like
TorchIO's ``tiotr``; a random transform gets the key ``jax.random.key(seed)``, so the
result equals ``Transform(**kwargs)(jax.random.key(seed), image)`` in Python;
``transform --list`` prints the transforms it can apply. An input stored with integer
voxels and at most 256 distinct values (a label map, most likely) read without
``--label`` is transformed as an intensity image (interpolated into floats), with a
warning that says to pass ``--label``. ``convert`` writes a file once in another format,
e.g. ``.nii.gz`` to chunked NIfTI-Zarr (``.nii.zarr``, needs ``jmed[zarr]``), so that
patches are later read chunk by chunk (see ``jmed.io.convert``).

Exit status: 0 on success, 1 when an input is unusable (missing or damaged file, bad
transform name or keyword arguments, refused overwrite) or an output cannot be written
(missing folder, no permission, disk full, file too large), 2 on a malformed command
line. Every error and warning is one line on stderr (``jmed COMMAND: error: ...``),
without a traceback (set ``JMED_DEBUG=1`` to see one for an unexpected error). The input
file is never overwritten, and every output is written atomically (an existing output
survives a failed write). ``info`` reads only the header, through nibabel (it works on a
truncated file, and does not import JAX); ``info --stats`` reads the voxels.

Each command imports what it needs when it runs (JAX, matplotlib), so ``jmed --help`` and
``jmed info`` start quickly. A command is a ``cmd_NAME(args)`` function registered in
``build_parser`` with its arguments.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jmed import _header

__all__ = ["available_transforms", "main", "parse_kwargs"]


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


# --- header facts without JAX ------------------------------------------------------------------


class _Header:
    """What ``jmed.load(path, kind, lazy=True)`` reports about a file, read with nibabel
    and numpy only (``jmed.load`` would import JAX)."""

    def __init__(self, path: str, kind: str):
        import nibabel as nib
        import numpy as np

        text = str(path)
        if text.rstrip("/").lower().endswith(".zarr") or "://" in text:
            self._from_image(text, kind)  # a chunked store or a URL: through jmed.load
            return
        file = Path(path)
        if file.is_dir():
            raise CommandError(f"{file} is a directory; an image file (or a .zarr store) is needed")
        if not file.exists():
            raise CommandError(f"no such image file: {file}")
        ext = _header.extension(file)
        if ext not in _header.READ_EXTENSIONS:
            raise CommandError(
                f"{file}: unsupported extension {ext!r}; readable: {', '.join(_header.READ_EXTENSIONS)}"
            )
        try:
            img = nib.load(str(file))
        except Exception as err:  # nibabel raises many types for bad headers
            raise CommandError(f"{file}: cannot read image header ({type(err).__name__}: {err})") from err
        try:
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as err:
            raise CommandError(f"{file}: cannot compute the affine ({err})") from err
        # the checks of jmed.affine.check_affine
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
        if (
            affine.shape != (4, 4)
            or not np.all(np.isfinite(affine))
            or np.any(spacing == 0)
            or abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-6
        ):
            raise CommandError(f"{file}: unusable affine (not finite, or singular): {affine.tolist()}")
        header = img.header
        if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and int(header["qform_code"]) == 0 == int(
            header["sform_code"]
        ):
            warnings.warn(
                f"{file}: the header has neither a qform nor an sform (both codes 0); using "
                "nibabel's fallback affine (voxel sizes from pixdim, x flipped, centred on the "
                "volume); the orientation is unknown",
                UserWarning,
                stacklevel=2,
            )
        shape = [int(n) for n in img.shape]
        if len(shape) > 4 or len(shape) < 2:
            raise CommandError(
                f"{file}: image has {len(shape)} dimensions {tuple(shape)}; jmed reads 2D, 3D and 4D images"
            )
        if len(shape) == 4:
            shape.append(shape.pop(_header.channel_axis(img)))
        shape += [1] * (4 - len(shape))
        self.file_dtype = np.dtype(img.get_data_dtype())
        #: how the file stores its voxels, in words (``int16``, ``RGB``)
        self.stored = self.file_dtype.name
        if self.file_dtype.names:
            shape[3] = len(self.file_dtype.names)
            self.stored = "".join(self.file_dtype.names)
        if kind == "intensity":
            self.dtype = np.dtype(np.float32)
        elif self.file_dtype in (np.int64, np.uint64, np.uint32) or not (
            np.issubdtype(self.file_dtype, np.integer) or self.file_dtype == np.bool_
        ):
            self.dtype = np.dtype(np.int32)
        else:
            self.dtype = self.file_dtype
        proxy = img.dataobj
        slope = float(np.asarray(getattr(proxy, "slope", 1.0)))
        inter = float(np.asarray(getattr(proxy, "inter", 0.0)))
        #: stored as integers, read as they are stored (no scaling)
        self.integer = bool(np.issubdtype(self.file_dtype, np.integer)) and slope == 1.0 and inter == 0.0
        self.path, self.kind, self.affine, self.shape = str(path), kind, affine, tuple(shape)
        self.spacing = spacing
        self.origin = affine[:3, 3]
        self.orientation = "".join(nib.orientations.aff2axcodes(affine))

    def _from_image(self, path: str, kind: str) -> None:
        import numpy as np

        image = _load(path, kind, lazy=True)
        self.path, self.kind = path, kind
        self.affine = np.asarray(image.affine, np.float64)
        self.shape = tuple(int(n) for n in image.shape)
        self.spacing = np.asarray(image.spacing, np.float64)
        self.origin = self.affine[:3, 3]
        self.orientation = image.orientation
        self.dtype = self.file_dtype = np.dtype(image.dtype)
        self.stored = self.dtype.name
        self.integer = bool(np.issubdtype(self.dtype, np.integer))


# --- transforms ----------------------------------------------------------------------------------

# containers and wrappers take transforms or functions, which a command line cannot give
_NOT_FROM_THE_COMMAND_LINE = ("Compose", "OneOf", "SomeOf", "RandomApply", "Lambda", "Spatial")


def _is_abstract(cls: type) -> bool:
    """A base class meant to be subclassed (``Transform``, ``IntensityTransform``,
    ``LabelTransform``, ``SpatialTransform``): it leaves the method that does the work
    unimplemented."""
    from jmed.transforms.base import Transform
    from jmed.transforms.spatial import SpatialTransform

    if issubclass(cls, SpatialTransform):
        return cls.mapping is SpatialTransform.mapping
    return cls.apply is Transform.apply and cls.apply_image is Transform.apply_image


def available_transforms() -> list[str]:
    """Names of the transforms ``jmed transform`` can apply: the public, concrete
    transforms of ``jmed.transforms`` that take no other transform or function."""
    import inspect

    from jmed import transforms
    from jmed.transforms.base import Transform

    names = []
    for name in transforms.__all__:
        obj = getattr(transforms, name, None)
        if (
            inspect.isclass(obj)
            and issubclass(obj, Transform)
            and name not in _NOT_FROM_THE_COMMAND_LINE
            and not _is_abstract(obj)
        ):
            names.append(name)
    return sorted(names)


def _transform_class(name: str):
    from jmed import transforms

    available = available_transforms()
    if name not in available:
        hint = ""
        if name in getattr(transforms, "__all__", ()):
            hint = f"{name} cannot be applied from the command line; "
        raise CommandError(f"unknown transform {name!r}; {hint}available: {', '.join(available)}")
    return getattr(transforms, name)


class _ListTransforms(argparse.Action):
    """``--list``: print the transform names and exit (like ``--help``, before the
    positional arguments are checked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join(available_transforms()))
        parser.exit(0)


# --- checks shared by the commands --------------------------------------------------------------


def _check_output_folder(output: str) -> None:
    folder = Path(output).parent
    if not folder.exists():
        raise CommandError(f"cannot write {output}: folder {folder} does not exist")
    if not folder.is_dir():
        raise CommandError(f"cannot write {output}: {folder} is a file, not a folder")


def _check_overwrite(output: str, overwrite: bool) -> None:
    if Path(output).exists() and not overwrite:
        raise CommandError(f"{output} exists; pass --overwrite to replace it")


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _distinct_values(data: Any, limit: int) -> int | None:
    """The number of distinct values of integer-valued ``data`` if at most ``limit``, else None."""
    import numpy as np

    lo, hi = float(data.min()), float(data.max())
    if hi - lo >= 1 << 20:
        return None
    counts = np.bincount((np.asarray(data).ravel() - lo).astype(np.int64), minlength=1)
    distinct = int(np.count_nonzero(counts))
    return distinct if distinct <= limit else None


# --- commands ------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> None:
    import numpy as np

    kind = "label" if args.label else "intensity"
    header = _Header(args.path, kind)
    dtype = header.dtype.name
    if header.stored != dtype:
        dtype += f" (stored as {header.stored})"
    print(f"path:        {args.path}")
    print(f"kind:        {kind}")
    print(f"shape:       {header.shape} (x, y, z, channels)")
    print(f"spacing:     {tuple(round(float(s), 4) for s in header.spacing)} mm")
    print(f"origin:      {tuple(round(float(s), 4) for s in header.origin)} mm")
    print(f"orientation: {header.orientation}")
    print(f"dtype:       {dtype}")
    print("affine:\n" + np.array2string(header.affine, precision=4, suppress_small=True))
    if args.stats:
        image = _load(args.path, kind, lazy=True)
        try:
            data = np.asarray(image.data)
        except ValueError as err:
            raise CommandError(str(err)) from err
        p = np.percentile(data, [0.5, 50, 99.5])
        print(
            f"values:      min {data.min():.6g}  max {data.max():.6g}  mean {data.mean():.6g}  "
            f"std {data.std():.6g}  p0.5 {p[0]:.6g}  median {p[1]:.6g}  p99.5 {p[2]:.6g}"
        )
        if kind == "label":
            labels, counts = np.unique(data, return_counts=True)
            print("labels:      " + ", ".join(f"{v}: {c}" for v, c in zip(labels, counts)))


def cmd_transform(args: argparse.Namespace) -> None:
    if _same_file(args.input, args.output):
        raise CommandError(f"output {args.output} is the input file; refusing to overwrite it")
    _check_output_folder(args.output)
    _check_overwrite(args.output, args.overwrite)
    cls = _transform_class(args.name)
    kwargs = parse_kwargs(args.kwargs)
    try:
        transform = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise CommandError(f"{args.name}({args.kwargs or ''}): {err}") from err
    import jax

    import jmed

    try:
        key = jax.random.key(args.seed)
    except (OverflowError, ValueError, TypeError):
        raise CommandError(f"--seed must fit in a 64-bit integer, got {args.seed}") from None
    kind = "label" if args.label else "intensity"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jmed.load says the same about the header
        header = _Header(args.input, kind)
    image = _load(args.input, kind)
    if not args.label and header.integer:
        distinct = _distinct_values(image.data, 256)
        if distinct is not None:
            warnings.warn(
                f"{args.input} holds integers ({header.stored}, {distinct} distinct values) and is "
                f"read as an intensity image: {args.name} will produce floats (interpolated, for a "
                "spatial transform); pass --label if it is a label map",
                UserWarning,
                stacklevel=2,
            )
    key = key if transform.is_random else None
    try:
        out = transform(key, image)
    except (TypeError, ValueError, KeyError) as err:
        raise CommandError(f"{args.name} failed on {args.input}: {err}") from err
    try:
        jmed.save(out, args.output, overwrite=args.overwrite)
    except FileExistsError:
        raise CommandError(f"{args.output} exists; pass --overwrite to replace it") from None
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from err
    print(f"wrote {args.output}")


def cmd_plot(args: argparse.Namespace) -> None:
    _check_overwrite(args.output, args.overwrite)
    _check_output_folder(args.output)
    image = _load(args.path, "intensity")
    label = _load(args.label, "label") if args.label else None
    from jmed import plot

    plot.plot_image(image, label=label, output=args.output)
    print(f"wrote {args.output}")


def cmd_landmarks(args: argparse.Namespace) -> None:
    for path in list(args.paths) + list(args.mask or []):
        if not Path(path).is_file():
            raise CommandError(f"no such image file: {path}")
    if args.mask and len(args.mask) != len(args.paths):
        raise CommandError(
            f"--mask needs one mask per image: got {len(args.mask)} masks for {len(args.paths)} images"
        )
    _check_overwrite(args.output, args.overwrite)
    _check_output_folder(args.output)
    from jmed.transforms import normalization

    try:
        landmarks = normalization.train_histogram(
            list(args.paths), masks=list(args.mask) if args.mask else None, progress=True
        )
        normalization.save_landmarks(landmarks, args.output)
    except (ValueError, FileNotFoundError) as err:
        raise CommandError(str(err)) from err
    print(f"wrote {args.output}")


def cmd_cache(args: argparse.Namespace) -> None:
    for path in args.paths:
        if not Path(path).is_file():
            raise CommandError(f"no such image file: {path}")
    from jmed import data

    records = [{args.name: path} for path in args.paths]
    source = data.SubjectsSource(
        records, label_names=[args.name] if args.label else [], cache_dir=args.cache_dir
    )
    try:
        shapes = source.build_cache(progress=True)
    except (RuntimeError, ValueError) as err:
        raise CommandError(str(err)) from err
    for path, shape in zip(args.paths, shapes):
        print(f"{path}: {shape[args.name]} cached in {args.cache_dir}")


def cmd_convert(args: argparse.Namespace) -> None:
    from jmed import io

    if _same_file(args.input, args.output):
        raise CommandError(f"output {args.output} is the input file; refusing to overwrite it")
    _check_overwrite(args.output, args.overwrite)
    chunks = args.chunks[0] if len(args.chunks) == 1 else tuple(args.chunks)
    written = io.convert(
        args.input,
        args.output,
        kind="label" if args.label else "intensity",
        chunks=chunks,
        levels=args.levels,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"{args.input} -> {written}")


# --- the command line ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``jmed`` argument parser: one subparser per command, each with ``func`` set to
    its ``cmd_NAME`` function. A new command adds a subparser here."""
    parser = _Parser(prog="jmed", description="3D medical images for deep learning in JAX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="print header facts of an image file")
    p.add_argument("path")
    p.add_argument("--stats", action="store_true", help="also read the voxels and print value statistics")
    p.add_argument("--label", action="store_true", help="read as a label map")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("transform", help="apply a transform to an image file")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("name", help="transform class name, e.g. RandomAffine (see --list)")
    p.add_argument("--list", action=_ListTransforms, help="print the names of the transforms and exit")
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

    p = sub.add_parser(
        "convert", help="convert an image file once, e.g. .nii.gz to chunked NIfTI-Zarr (.nii.zarr)"
    )
    p.add_argument("input")
    p.add_argument("output", help="output path; its extension chooses the format")
    p.add_argument(
        "--chunks", type=int, nargs="+", default=[64], help="chunk size: one int or 3 ints (default 64)"
    )
    p.add_argument("--levels", type=int, help="pyramid levels of a chunked store (default: automatic)")
    p.add_argument("--label", action="store_true", help="the file is a label map")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    p.set_defaults(func=cmd_convert)
    return parser


def _error_line(err: BaseException) -> str:
    detail = str(err) or type(err).__name__
    if isinstance(err, MemoryError):
        detail = f"out of memory ({err or 'no details'})"
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in detail:
        # files and folders the user named: missing, read-only, full disk, file too large
        detail = f"{err.filename}: {detail}"
    if not isinstance(err, (CommandError, MemoryError, OSError, ValueError)):
        detail = f"unexpected {type(err).__name__}: {detail}"
    return " ".join(detail.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jmed`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = f"jmed {args.command}"

    def one_line(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"{command}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line
        try:
            args.func(args)
        except Exception as err:  # every error is one line (see the module docstring)
            if os.environ.get("JMED_DEBUG") and not isinstance(err, CommandError):
                raise
            print(f"{command}: error: {_error_line(err)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
