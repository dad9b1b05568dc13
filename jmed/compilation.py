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

Slow compilations are logged: every XLA compilation in the process that takes longer
than ``log_slow_compilations``'s threshold (5 s by default, or
``$JMED_COMPILE_LOG_SECONDS``) gives one WARNING on the logger ``jmed.compilation``, e.g.
``compiling the augmentation and sampling (Compose(RandomMotion, RandomNoise),
UniformSampler) for shape (181, 217, 181, 1) took 12.3 s`` for a program of the loader,
or ``compiling jit(train_step) took 31.0 s`` for a function jitted by the caller (JAX
names it after the Python function). WARNING is shown without any logging set-up, so a
long pause explains itself. Silence it with ``log_slow_compilations(None)``,
``JMED_COMPILE_LOG_SECONDS=off`` or
``logging.getLogger("jmed.compilation").setLevel(logging.ERROR)``. The listener is
installed when this module is imported, which happens on first use of ``jmed.<name>``
and by the loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

__all__ = ["compile_once", "default_cache_dir", "log_slow_compilations", "use_compilation_cache"]

logger = logging.getLogger(__name__)

_ENABLED: str | None = None
_EXECUTABLES: dict[Any, Any] = {}

#: the event JAX records (with the jitted function's name) for each XLA compilation
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_DEFAULT_LOG_SECONDS = 5.0


def _threshold_from_environment() -> float | None:
    text = os.environ.get("JMED_COMPILE_LOG_SECONDS", "").strip().lower()
    if not text:
        return _DEFAULT_LOG_SECONDS
    if text in ("off", "none", "never", "inf"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        logger.warning("JMED_COMPILE_LOG_SECONDS must be a number of seconds or 'off', got %r", text)
        return _DEFAULT_LOG_SECONDS
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


_LOG_SECONDS: float | None = _threshold_from_environment()
# compile_once logs its own programs with a better name; the JAX listener stays quiet then
_INSIDE = threading.local()


def log_slow_compilations(seconds: float | None = _DEFAULT_LOG_SECONDS) -> float | None:
    """Log every compilation that takes longer than ``seconds`` (``None``: log none).

    Messages go to the logger ``jmed.compilation`` at WARNING level, one line each,
    naming what was compiled and for which shapes when jmed compiled it (the loader), or
    the jitted function's name when the caller did. The default comes from
    ``$JMED_COMPILE_LOG_SECONDS`` (a number, or ``off``), else 5 s.

    Returns:
        The previous threshold, to restore it.
    """
    global _LOG_SECONDS
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError(f"seconds must be a number >= 0 or None, got {seconds!r}")
        seconds = float(seconds)
    previous, _LOG_SECONDS = _LOG_SECONDS, seconds
    return previous


def _is_slow(seconds: float) -> bool:
    return _LOG_SECONDS is not None and seconds > _LOG_SECONDS


def _on_duration(event: str, duration: float, **metadata: Any) -> None:
    if event != _BACKEND_COMPILE_EVENT or getattr(_INSIDE, "active", False) or not _is_slow(duration):
        return
    logger.warning("compiling %s took %.1f s", metadata.get("fun_name", "a program"), duration)


def _install_listener() -> None:
    global _INSTALLED
    if not _INSTALLED:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _INSTALLED = True


_INSTALLED = False

_install_listener()


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
    another process is compiling is loaded from the cache when it is done. A compilation
    slower than ``log_slow_compilations``'s threshold is logged (logger
    ``jmed.compilation``) with ``name``, the transforms and samplers in ``static`` and the
    shapes of the volumes in ``dynamic``. Call the result with ``*dynamic``.
    """
    key = (jitted, static, _signature(dynamic))
    executable = _EXECUTABLES.get(key)
    if executable is not None:
        return executable
    start = time.perf_counter()
    _INSIDE.active = True
    try:
        lowered = jitted.lower(*static, *dynamic)
        if _ENABLED is None:
            executable = lowered.compile()
        else:
            digest = hashlib.sha256(lowered.as_text().encode()).hexdigest()[:32]
            with _file_lock(Path(_ENABLED) / "locks" / f"{digest}.lock"):
                executable = lowered.compile()
    finally:
        _INSIDE.active = False
    seconds = time.perf_counter() - start
    if _is_slow(seconds):
        logger.warning("compiling %s took %.1f s", _describe(name, static, dynamic), seconds)
    _EXECUTABLES[key] = executable
    return executable


def _short(obj: Any) -> str | None:
    """``RandomMotion``, ``Compose(RandomAffine, RandomNoise)``: jmed objects by class."""
    if not type(obj).__module__.startswith("jmed."):
        return None
    children = getattr(obj, "transforms", None)
    if isinstance(children, (tuple, list)) and children:
        inner = [_short(child) or type(child).__name__ for child in children]
        return f"{type(obj).__name__}({', '.join(inner)})"
    return type(obj).__name__


def _describe(name: str, static: tuple, dynamic: tuple) -> str:
    """``name (transforms...) for shape (x, y, z, c)``."""
    parts = [text for text in map(_short, static) if text]
    shapes = []
    for leaf in jax.tree.leaves(dynamic):
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) >= 3 and shape not in shapes:
            shapes.append(shape)
    text = name + (f" ({', '.join(parts)})" if parts else "")
    if shapes:
        text += " for shape" + ("s " if len(shapes) > 1 else " ") + ", ".join(map(str, shapes))
    return text
