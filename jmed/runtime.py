"""Process-level settings for jmed (and JAX on CPU in general).

On CPU, XLA allocates every output buffer with the C library's ``malloc``. With glibc's
defaults, a block larger than 32 MiB (one float32 volume of 197x233x189 is 35 MB) is
mapped afresh from the kernel on each call and unmapped when freed, so every transform
that writes a new volume pays for page faults on all of its pages, often more than the
computation itself (docs/performance.md). :func:`tune_host_allocator` raises the
mmap and trim thresholds so that such blocks are served from, and returned to, the heap
instead. The same setting speeds up NumPy and PyTorch code running in the process.

The price is memory: up to ``threshold`` bytes of freed memory may stay with the process
instead of going back to the system. The setting is process-wide and is never applied
on import; call it once at start-up (each worker process that runs transforms needs its
own call; the workers of jmed's loaders make it themselves when the process that built
the loader had made it). The environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` have the same effect when set before Python starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["applied_threshold", "tune_host_allocator"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_THRESHOLD = 2**31 - 1  # mallopt takes a C int
# the threshold applied in this process (None: glibc's defaults)
_applied: int | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # another C library (musl has no mallopt tuning of this kind)
    return libc


def tune_host_allocator(threshold: int = 2**30) -> bool:
    """Serve large host buffers from the heap instead of fresh page mappings (glibc).

    Sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``threshold`` bytes
    with ``mallopt``. See the module docstring for why and what it costs.

    Args:
        threshold: bytes, in ``[1 MiB, 2**31 - 1]``. Blocks smaller than this come from
            the heap, and up to this much free memory is kept by the process.

    Returns:
        True when the setting was applied; False when the C library is not glibc (macOS,
        Windows, musl), where the call changes nothing and logs why.

    Raises:
        ValueError: ``threshold`` outside the allowed range.
        RuntimeError: glibc refused the setting.
    """
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not 2**20 <= threshold <= _MAX_THRESHOLD
    ):
        raise ValueError(
            f"threshold must be an integer number of bytes in [2**20, 2**31 - 1], got {threshold!r}"
        )
    libc = _glibc()
    if libc is None:
        log.info("tune_host_allocator: the C library is not glibc; nothing changed")
        return False
    for option, name in ((_M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD"), (_M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(threshold)) != 1:
            done = "" if name == "M_MMAP_THRESHOLD" else " (M_MMAP_THRESHOLD is already set)"
            raise RuntimeError(
                f"glibc mallopt refused {name}={threshold}{done}; this glibc caps the threshold "
                "lower: try a smaller one"
            )
    global _applied
    _applied = threshold
    return True


def applied_threshold() -> int | None:
    """The threshold :func:`tune_host_allocator` applied in this process, else None."""
    return _applied
