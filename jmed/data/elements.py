"""Elements exchanged between pipeline stages: plain dicts of numpy arrays, batching.

Workers hand elements to the main process (through grain's shared memory); the main
process splits patch stacks, drops skipped subjects and stacks elements into batched
``Subject`` s.
"""

from __future__ import annotations

from collections.abc import Sequence
from multiprocessing import shared_memory
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jmed.image import Image, Subject


def _numeric(value: Any) -> bool:
    return not isinstance(value, (str, bytes)) and value is not None


def _element(subject: Subject, data: dict, affine: dict, **extra: Any) -> dict:
    """An element of ``subject``'s image kinds and metadata with the arrays given."""
    return {
        "data": data,
        "affine": affine,
        "kind": {n: im.kind for n, im in subject.items()},
        **extra,
        "metadata": {k: (np.asarray(v) if _numeric(v) else v) for k, v in subject.metadata.items()},
    }


def _subject_to_element(subject: Subject) -> dict:
    """A plain dict of numpy arrays and strings (cheap to pickle between processes)."""
    return _element(
        subject,
        # C order: grain passes C-contiguous arrays through shared memory, others by pickling
        {n: np.ascontiguousarray(im.data) for n, im in subject.items()},
        {n: np.asarray(im.affine) for n, im in subject.items()},
    )


def _collate(elements: Sequence[dict]) -> Subject:
    """Stack elements into a batched ``Subject`` (leading axis on every leaf)."""
    first = elements[0]
    images = {}
    for name, kind in first["kind"].items():
        shapes = {e["data"][name].shape for e in elements}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot batch image {name!r}: shapes differ {sorted(shapes)}; make shapes equal in "
                "preprocessing (e.g. crop or pad to a fixed shape)"
            )
        data = np.stack([e["data"][name] for e in elements])
        affine = np.stack([e["affine"][name] for e in elements])
        images[name] = Image.tree_unflatten(kind, (data, affine))
    metadata = {}
    for key in first["metadata"]:
        values = [e["metadata"].get(key) for e in elements]
        if all(_numeric(v) for v in values):
            metadata[key] = np.stack([np.asarray(v) for v in values])
        else:
            metadata[key] = np.array([str(v) for v in values])
    return Subject(images, metadata=metadata)


class _CollateTo:
    def __init__(self, as_jax: bool):
        self.as_jax = as_jax

    def __call__(self, elements: Sequence[dict]) -> Subject:
        batch = _collate(elements)
        if self.as_jax:
            batch = jax.tree.map(lambda x: jnp.asarray(x) if x.dtype.kind in "biuf" else x, batch)
        return batch


class _ToElement(grain.transforms.Map):
    def map(self, item):
        return None if item is None else _subject_to_element(item[1])


class _SplitPatches(grain.experimental.FlatMapTransform):
    """One element of ``n`` stacked patches -> ``n`` single-patch elements."""

    def __init__(self, max_fan_out: int):
        self.max_fan_out = max_fan_out

    def flat_map(self, element):
        if element is None:
            return []
        n = element["location"].shape[0]
        return [
            {
                "data": {k: v[i] for k, v in element["data"].items()},
                "affine": {k: v[i] for k, v in element["affine"].items()},
                "kind": element["kind"],
                "metadata": {**element["metadata"], "location": element["location"][i]},
            }
            for i in range(n)
        ]


class _DropNones(grain.experimental.FlatMapTransform):
    max_fan_out = 1

    def flat_map(self, element):
        return [] if element is None else [element]


class _FromWorkers(grain.transforms.Map):
    """Main process, on each element from the workers: count it (so that an error can
    name the subjects in flight), and unlink its shared memory at once.

    grain's workers hand arrays over in shared-memory blocks that the main process
    unlinks when the array is garbage collected, from a background thread; blocks still
    pending at exit were reported as leaked by Python's resource tracker. Unlinking
    right away frees the name (the mapping stays valid until the array is dropped), and
    the later collection only closes the mapping.
    """

    def __init__(self):
        self.received = 0
        # a progress bar advanced per element while the iterator waits for its first batch
        self.bar = None

    def map(self, element):
        self.received += 1
        if self.bar is not None:
            self.bar.update(1)
        _unlink_shared(element)
        return element


def _unlink_shared(node: Any) -> None:
    if isinstance(node, dict):
        for value in node.values():
            _unlink_shared(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _unlink_shared(value)
    elif isinstance(node, np.ndarray) and getattr(node, "_unlink_on_del", False):
        shm = getattr(node, "shm", None)
        if isinstance(shm, shared_memory.SharedMemory):
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
            node._unlink_on_del = False
