"""Compile once: JAX's persistent compilation cache, shared by loader workers and runs.

Each loader worker is a separate process, and without a cache every worker compiles
every program again, in every run. ``use_compilation_cache(folder)`` turns on JAX's
persistent compilation cache (``jax_compilation_cache_dir``) in this process for every
program, however small, so a second worker or a second run loads compiled programs
instead of compiling them. ``compile_once(jitted, *args)`` compiles a jitted function for
its arguments under a file lock named after the program, so that when several workers
need the same program at once one compiles it and the others load it from the cache.

The cache is keyed by JAX on the program, the JAX and XLA versions, the compile options
and the device, so a stale entry is never used; entries are written atomically by JAX.
Delete the folder to free the space.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

__all__ = ["compile_once", "default_cache_dir", "use_compilation_cache"]

logger = logging.getLogger(__name__)

_ENABLED: str | None = None
_EXECUTABLES: dict[Any, Any] = {}


def default_cache_dir() -> str:
    """``$JMED_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/jmed/xla`` (``~/.cache/jmed/xla``)."""
    folder = os.environ.get("JMED_COMPILATION_CACHE")
    if folder:
        return folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jmed", "xla")


def use_compilation_cache(folder: str | os.PathLike) -> bool:
    """Store every program this process compiles in ``folder`` and reuse them from there.

    Sets JAX's ``jax_compilation_cache_dir`` (and caches programs of any size and compile
    time). If JAX already uses another folder (set by the user), that one is kept.
    Returns True when ``folder`` is in use; False (with a warning in the log) when the
    folder cannot be created or JAX keeps another one.
    """
    global _ENABLED
    folder = os.path.abspath(os.fspath(folder))
    if _ENABLED == folder:
        return True
    current = jax.config.jax_compilation_cache_dir
    if current and os.path.abspath(current) != folder:
        logger.warning("JAX already caches compiled programs in %s; %s is not used", current, folder)
        return False
    try:
        os.makedirs(os.path.join(folder, "locks"), exist_ok=True)
    except OSError as err:
        logger.warning("cannot use %s for compiled programs (%s); compiling without a cache", folder, err)
        return False
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _ENABLED = folder
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: each process compiles for itself
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _signature(args: tuple) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves)


def compile_once(
    jitted: Callable, static: tuple, dynamic: tuple, *, name: str = "program"
) -> Callable[..., Any]:
    """The compiled executable of ``jitted(*static, *dynamic)`` for arguments like
    ``dynamic`` (``static``: its static positional arguments, hashable values).

    Compiled once per process for each (``static``, shapes and dtypes of ``dynamic``);
    with the compilation cache in use, under a lock shared by all processes, so a program
    another process is compiling is loaded from the cache when it is done. Programs that
    take more than 5 s to compile are logged (logger ``jmed.compilation``) with ``name``.
    Call the result with ``*dynamic``.
    """
    key = (jitted, static, _signature(dynamic))
    executable = _EXECUTABLES.get(key)
    if executable is not None:
        return executable
    start = time.perf_counter()
    lowered = jitted.lower(*static, *dynamic)
    if _ENABLED is None:
        executable = lowered.compile()
    else:
        digest = hashlib.sha256(lowered.as_text().encode()).hexdigest()[:32]
        with _file_lock(Path(_ENABLED) / "locks" / f"{digest}.lock"):
            executable = lowered.compile()
    seconds = time.perf_counter() - start
    if seconds > 5.0:
        logger.info("compiled %s for %s in %.1f s", name, _signature(dynamic)[1], seconds)
    _EXECUTABLES[key] = executable
    return executable
