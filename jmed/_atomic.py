"""One way to write files: a temporary file beside the target, flushed, renamed into place.

Every file jmed writes (images, landmarks, JSON, plots, loader cache entries) goes through
``atomic_path``: the content is written into a private folder
``.jmed-<host>-<pid>-<random>/`` in the target's folder, flushed to disk (``fsync``) and
renamed over the target (``os.replace``, atomic on POSIX within one file system), so a
reader sees the old file or the new one, never a part, and a failed write leaves the old
file intact. The folder is removed afterwards, also after an error.

A writer killed before it cleans up (``kill -9``, a power cut) leaves its folder behind;
the next write to the same folder removes such folders when their writer is gone: the
name says which host and process made it, and a folder is removed only when that host is
this one, that process no longer runs, and the folder is older than a minute (so a
writer that just started, or a process of another host sharing the folder, is never
disturbed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["PREFIX", "atomic_path", "remove_stale_temporaries", "write_bytes", "write_text"]

PREFIX = ".jmed-"
STALE_AFTER_S = 60.0


def _host() -> str:
    # '-' separates the fields of the folder name
    return socket.gethostname().replace("-", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (owned by someone else), or we cannot tell: keep it
    return True


def remove_stale_temporaries(folder: str | os.PathLike, *, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary folders of writers on this host that no longer run.

    Only folders named ``.jmed-<this host>-<pid>-*`` whose process is gone and that are
    older than ``older_than_s`` are removed; anything else is left alone. Returns the
    folders removed. Errors (a folder removed meanwhile, no permission) are ignored.
    """
    removed = []
    host = _host()
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        fields = entry.name[len(PREFIX) :].split("-")
        if len(fields) < 3 or fields[0] != host or not fields[1].isdigit():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or now - entry.stat().st_mtime < older_than_s:
                continue
        except OSError:
            continue
        if _pid_alive(int(fields[1])):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temporary_folder(folder: Path) -> Path:
    """A new private folder for temporaries in ``folder`` (stale ones swept first)."""
    if not folder.exists():
        raise FileNotFoundError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    remove_stale_temporaries(folder)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{_host()}-{os.getpid()}-", dir=folder))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path (same name as ``path``) to write; on success it is flushed
    and renamed to ``path``; on an error nothing changes at ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: the folder of ``path`` does not exist.
        NotADirectoryError: the parent of ``path`` is a file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file path")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    work = temporary_folder(path.parent)
    try:
        tmp = work / path.name
        try:
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"nothing was written for {path}")
            _fsync_file(tmp)
            os.replace(tmp, path)
        except OSError as err:  # name the target, not the temporary
            if err.errno is None:
                raise
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_bytes(
    path: str | os.PathLike, data: bytes | Callable[[], bytes], *, overwrite: bool = True
) -> Path:
    """Write ``data`` (or what the callable returns) to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data() if callable(data) else data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
