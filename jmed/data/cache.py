"""The decode-once cache: preprocessed volumes stored as ``.npy`` files, read memory-mapped.

An entry's key hashes the image files' content, the image names and kinds and a stable
description of the preprocessing; entries are checked when read and rebuilt when damaged
(see ``_Cache``). ``SubjectsSource(cache_dir=...)`` uses it; ``SubjectsSource.build_cache``
fills it ahead of training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jmed import _atomic
from jmed.image import Image

logger = logging.getLogger(__name__)

_CACHE_VERSION = "jmed-cache-2"


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_crc(data: np.ndarray) -> int:
    """CRC-32 of an array's bytes in memory order."""
    if data.flags.c_contiguous:
        flat = data
    elif data.flags.f_contiguous:
        flat = data.T
    else:
        flat = np.ascontiguousarray(data)
    if flat.size == 0:
        return 0
    return zlib.crc32(memoryview(flat.reshape(-1)).cast("B"))


def _seal(payload: Any) -> str:
    """A short checksum of a JSON value: an edited memo or geometry file no longer matches."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class _CacheEntryInvalid(Exception):
    pass


# entries whose voxel checksums were verified in this process: (path, size, mtime_ns) of
# each data file; the check runs once per entry and process, not on every read
_VERIFIED: set[tuple[str, int, int]] = set()


class _Cache:
    """Preprocessed volumes stored as ``.npy`` (read memory-mapped), one folder per entry.

    An entry's key hashes the content of every image file (SHA-256), the image names and
    kinds, and ``transform_key(preprocessing)`` (a stable description). File digests are
    memoised by (path, size, modification time), in sealed memo files (an edited or
    copied memo is detected and the file hashed again), so a hit reads no voxels of the
    image files. An entry's ``geometry.json`` records per image the kind, affine, shape,
    dtype and a CRC-32 of the voxels, and is sealed by a checksum. Reading an entry checks
    its geometry file, the names and kinds expected, each ``.npy`` header against the
    recorded shape and dtype and, once per process, the voxels against their CRC; an
    entry that fails is deleted with a warning naming it and rebuilt. Entries are written
    to a temporary folder and renamed into place, so a partial entry is never read.
    Writing is best effort: with a read-only or full cache folder a warning is logged
    (once per folder and process) and subjects are used uncached.
    """

    _warned: set[str] = set()

    def __init__(self, folder: str | os.PathLike, config: str):
        self.folder = Path(folder)
        self.config = config

    def warn_once(self, what: str, err: OSError) -> None:
        if str(self.folder) not in _Cache._warned:
            _Cache._warned.add(str(self.folder))
            logger.warning(
                "cannot write to the cache folder %s (%s: %s); continuing without caching",
                self.folder,
                what,
                err,
            )

    def _digest(self, path: Path) -> str:
        stat = path.stat()
        resolved = str(path.resolve())
        memo = self.folder / "files" / (hashlib.sha256(os.fsencode(resolved)).hexdigest() + ".json")
        signature = {"path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if memo.exists():
            try:
                stored = json.loads(memo.read_text())
                record = {k: stored[k] for k in ("path", "size", "mtime_ns", "sha256")}
                if stored["seal"] != _seal(record):
                    logger.warning("cache memo %s was altered; hashing %s again", memo, resolved)
                elif {k: record[k] for k in signature} == signature:
                    return record["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        digest = _hash_file(path)
        record = {**signature, "sha256": digest}
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            _atomic.write_text(memo, json.dumps({**record, "seal": _seal(record)}))
        except OSError as err:
            self.warn_once(f"memo {memo}", err)
        return digest

    def entry(self, images: Mapping[str, tuple[str, str]]) -> Path:
        parts = [_CACHE_VERSION, self.config]
        for name, (path, kind) in sorted(images.items()):
            parts.append(f"{name}:{kind}:{self._digest(Path(path))}")
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:40]
        return self.folder / key

    @staticmethod
    def read(entry: Path, kinds: Mapping[str, str]) -> dict[str, Image] | None:
        """The entry's images, ``None`` if absent; an invalid entry is deleted (warning)."""
        geometry = entry / "geometry.json"
        if not geometry.exists():
            return None
        try:
            return _Cache._read_checked(entry, kinds)
        except (_CacheEntryInvalid, OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("invalid cache entry %s (%s); deleting it and rebuilding", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    @staticmethod
    def _read_checked(entry: Path, kinds: Mapping[str, str]) -> dict[str, Image]:
        info = json.loads((entry / "geometry.json").read_text())
        if not isinstance(info, dict) or info.get("seal") != _seal(info.get("images")):
            raise _CacheEntryInvalid("geometry.json does not match its checksum")
        items = info["images"]
        if {name: item["kind"] for name, item in items.items()} != dict(kinds):
            raise _CacheEntryInvalid(
                f"it holds images {sorted(items)} of kinds "
                f"{[items[n]['kind'] for n in sorted(items)]}, expected {dict(sorted(kinds.items()))}"
            )
        images, checks = {}, []
        for name, item in items.items():
            path = entry / f"{name}.npy"
            data = np.load(path, mmap_mode="r")
            if list(data.shape) != item["shape"] or str(data.dtype) != item["dtype"]:
                raise _CacheEntryInvalid(
                    f"{path.name} holds {data.dtype} {data.shape}, recorded "
                    f"{item['dtype']} {tuple(item['shape'])}"
                )
            stat = path.stat()
            checks.append(((str(path), stat.st_size, stat.st_mtime_ns), name, data, item["crc32"]))
            images[name] = Image(data, np.array(item["affine"]), kind=item["kind"])
        for signature, name, data, crc in checks:
            if signature in _VERIFIED:
                continue
            if _content_crc(data) != crc:
                raise _CacheEntryInvalid(f"the voxels of {name}.npy do not match their checksum")
            _VERIFIED.add(signature)
        return images

    def write(self, entry: Path, images: Mapping[str, Image]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # a private folder of the shared atomic writer (temporaries of dead writers swept)
        tmp = _atomic.temporary_folder(self.folder)
        try:
            items = {}
            for name, image in images.items():
                data = np.asarray(image.data)
                np.save(tmp / f"{name}.npy", data)
                items[name] = {
                    "affine": np.asarray(image.affine, float).tolist(),
                    "kind": image.kind,
                    "shape": list(data.shape),
                    "dtype": str(data.dtype),
                    "crc32": _content_crc(data),
                }
            # geometry.json last: its presence marks a complete entry
            (tmp / "geometry.json").write_text(json.dumps({"images": items, "seal": _seal(items)}))
            try:
                os.rename(tmp, entry)
                # just written from these arrays: no need to verify their checksums on read
                for name in items:
                    stat = (entry / f"{name}.npy").stat()
                    _VERIFIED.add((str(entry / f"{name}.npy"), stat.st_size, stat.st_mtime_ns))
            except OSError:
                if (entry / "geometry.json").exists():  # a concurrent writer's complete entry
                    return
                if not entry.is_dir():
                    raise
                # an incomplete entry (no geometry.json) is never read; replace it, or
                # every later run would fail to store this subject
                shutil.rmtree(entry, ignore_errors=True)
                try:
                    os.rename(tmp, entry)
                except OSError:
                    if not (entry / "geometry.json").exists():
                        raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
