"""Shape buckets of a loader, planned from the subjects' headers (main process)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

from jmed import _progress, buckets
from jmed.data.source import SubjectsSource, _UnreadableHeader

logger = logging.getLogger(__name__)


class _ShapePlan(NamedTuple):
    """Shape buckets of a loader: ``volume_buckets`` for the subjects after preprocessing
    (the compiled augmentation and sampling), ``kernel_buckets`` for the resampling
    kernels inside preprocessing; ``multiple``: with no bucket planned for a shape
    (``volume_buckets`` empty), pad each axis up to a multiple of it."""

    volume_buckets: tuple[tuple[int, int, int], ...]
    kernel_buckets: tuple[tuple[int, int, int], ...]
    multiple: int

    def bucket(self, shape: tuple[int, int, int]) -> tuple[int, int, int] | None:
        if not self.volume_buckets:
            return tuple(1 if n == 1 else -(-n // self.multiple) * self.multiple for n in shape)
        return buckets.bucket_for(shape, self.volume_buckets)


def _plan_shapes(
    source: SubjectsSource,
    indices: Sequence[int],
    buckets_arg: Any,
    max_buckets: int,
    *,
    progress: bool = False,
) -> _ShapePlan:
    """The shape plan of a loader (main process; headers only); ``progress`` shows a bar
    over the headers read."""
    if buckets_arg != "auto":
        return _ShapePlan(tuple(buckets_arg), (), 32)
    volumes, kernels = [], []
    with _progress.progress_bar(
        progress, total=len(indices), desc="planning shape buckets", unit="subject"
    ) as bar:
        for index in indices:
            try:
                shape, recorded = source.predicted_shape(int(index))
            except _UnreadableHeader as err:
                logger.debug("left out of the shape plan: %s", err)
                continue
            except ValueError as err:
                logger.warning(
                    "%s; padding every volume to multiples of 32 voxels per axis instead of planned buckets",
                    err,
                )
                return _ShapePlan((), (), 32)
            finally:
                bar.update(1)
            volumes.append(shape)
            kernels.extend(recorded)
    if not volumes:
        return _ShapePlan((), (), 32)
    volume_buckets = tuple(buckets.plan_buckets(volumes, max_buckets=max_buckets))
    kernel_buckets: tuple = ()
    if kernels:
        inputs = buckets.plan_buckets([k[0] for k in kernels], max_buckets=2, min_gain=0.3)
        outputs = buckets.plan_buckets([k[1] for k in kernels], max_buckets=2, min_gain=0.3)
        kernel_buckets = tuple(dict.fromkeys(inputs + outputs))
    logger.info(
        "%d subject shapes -> volume buckets %s, resampling kernel buckets %s",
        len(set(volumes)),
        list(volume_buckets),
        list(kernel_buckets),
    )
    return _ShapePlan(volume_buckets, kernel_buckets, 32)


def _check_buckets(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"buckets must be 'auto', None or a sequence of shapes, got {value!r}")
    out = []
    for i, shape in enumerate(value):
        try:
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"buckets[{i}] must be 3 positive ints, got {value[i]!r}")
        out.append(shape)
    return tuple(out)
