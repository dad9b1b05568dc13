"""An accumulator on disk: sliding-window outputs written into a chunked NIfTI-Zarr store.

For outputs that do not fit in memory (a many-channel probability map of a large CT, a
whole-body label map at high resolution): windows are added into the chunks of a store
that is built beside the target and moved into place when complete (see
``jmed.chunked.ChunkedWriter``), so only a few chunks are in memory at a time. Needs
``pip install "jmed[zarr]"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from jmed import _checks
from jmed.image import Image
from jmed.inference.accumulators import OutputSpec

__all__ = ["ChunkedAccumulator"]


class ChunkedAccumulator:
    """Accumulates into a NIfTI-Zarr store at ``path``; ``finalize`` commits it and returns
    the output as a lazy ``Image`` read from the store.

    Window weights are normalised in advance, so the sum is the output: without ``argmax``
    windows are added straight into the output store (the part of each window inside
    the cropped output). With ``argmax`` the per-channel sums go to a scratch store
    (``levels=1``, never committed) and ``finalize`` writes their argmax slab by slab.
    Until ``finalize`` nothing exists at ``path``; an accumulator that is dropped or
    fails leaves no store behind (its temporary folder is removed by ``abort``).

    Use it through a factory: ``sliding_window_inference(...,
    accumulator=ChunkedAccumulator.at("seg.nii.zarr"))``.

    Args:
        spec: the output (see ``OutputSpec``).
        path: the ``.nii.zarr`` folder to write (local).
        chunks: voxels per chunk, an int or 3 ints.
        overwrite: replace an existing store at ``path`` when finalizing.
        progress: show a progress bar while ``finalize`` writes the argmax and the pyramid.
    """

    def __init__(
        self,
        spec: OutputSpec,
        path: str | os.PathLike,
        *,
        chunks: int | tuple[int, int, int] = 64,
        overwrite: bool = False,
        progress: bool = False,
    ):
        from jmed.chunked import ChunkedWriter

        if not isinstance(spec, OutputSpec):
            raise TypeError(f"spec must be an OutputSpec, got {type(spec).__name__}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        chunks = _checks.int_triple(chunks, "chunks")
        self.spec = spec
        self.progress = progress
        self._low = np.asarray([low for low, _ in spec.crop])
        self._size = tuple(int(length) for _, length in spec.crop)
        # NIfTI-Zarr stores no 16-bit floats: bfloat16/float16 accumulation is stored as float32
        sums_dtype = (
            np.dtype(np.float32)
            if np.dtype(spec.dtype).itemsize < 4 and not np.issubdtype(np.dtype(spec.dtype), np.integer)
            else np.dtype(spec.dtype)
        )
        out_channels, out_dtype = (
            (1, np.dtype(spec.label_dtype)) if spec.argmax else (spec.channels, sums_dtype)
        )
        self._out = ChunkedWriter(
            path,
            (*self._size, out_channels),
            out_dtype,
            spec.affine,
            kind=spec.kind,
            chunks=chunks,
            overwrite=overwrite,
        )
        self._sums = None
        if spec.argmax:
            target = Path(path)
            try:
                self._sums = ChunkedWriter(
                    target.with_name(f".{target.name}.sums.zarr"),
                    (*self._size, spec.channels),
                    sums_dtype,
                    spec.affine,
                    chunks=chunks,
                    levels=1,
                    overwrite=True,
                )
            except BaseException:
                self._out.abort()
                raise

    @classmethod
    def at(cls, path: str | os.PathLike, **kwargs: Any) -> Callable[[OutputSpec], ChunkedAccumulator]:
        """A factory for ``sliding_window_inference(..., accumulator=...)`` writing to ``path``
        (keyword arguments as the constructor's)."""
        return lambda spec: cls(spec, path, **kwargs)

    def aggregate(self, values: ArrayLike, starts: ArrayLike) -> None:
        """Add weighted windows ``(b, qx, qy, qz, channels)`` at output-space ``starts`` ``(b, 3)``."""
        values = np.asarray(values)
        starts = np.asarray(starts, np.int64) - self._low
        store = self._sums if self._sums is not None else self._out
        size = np.asarray(self._size)
        lo = np.maximum(starts, 0)
        hi = np.minimum(starts + np.asarray(values.shape[1:4]), size)
        inside = np.all(hi > lo, axis=1)  # windows entirely in the padding add nothing
        if not inside.any():
            return
        # one read and one write of the batch's bounding box: each chunk it touches is
        # decoded and encoded once per batch, not once per overlapping window
        box_lo, box_hi = lo[inside].min(axis=0), hi[inside].max(axis=0)
        box = store.read_region(tuple(box_lo), tuple(box_hi - box_lo))
        for start, value, a, b in zip(starts[inside], values[inside], lo[inside], hi[inside]):
            part = value[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start))]
            box[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, box_lo))] += part.astype(box.dtype)
        store.write_region(tuple(box_lo), box)

    def finalize(self) -> Image:
        """Commit the store and return it as a lazy ``Image`` (read from ``path``)."""
        from jmed.chunked import _chunk_boxes
        from jmed.io import load

        try:
            if self._sums is not None:
                for start, stop in _chunk_boxes(self._size, self._out.chunks):
                    size = tuple(b - a for a, b in zip(start, stop))
                    sums = self._sums.read_region(start, size)
                    labels = np.argmax(sums, axis=-1)[..., None].astype(self.spec.label_dtype)
                    self._out.write_region(start, labels)
                self._sums.abort()
            path = self._out.commit(progress=self.progress)
        except BaseException:
            self.abort()
            raise
        return load(path, kind=self.spec.kind)

    def abort(self) -> None:
        """Drop the stores being written; nothing is left at ``path``."""
        for writer in (self._out, self._sums):
            if writer is not None:
                writer.abort()
