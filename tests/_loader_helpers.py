"""Helpers shared by the loader tests (whole-volume and patch-first Queues)."""

import contextlib

import jax
import numpy as np


def collect(iterator, limit=None):
    """All batches (then close the iterator), or the next ``limit`` (left open)."""
    if limit is not None:
        return [next(iterator) for _ in range(limit)]
    with contextlib.closing(iterator):
        return list(iterator)


def assert_batches_equal(a, b):
    """Equal batch lists: the same tree structure, and every leaf equal in dtype and value."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            assert np.asarray(u).dtype == np.asarray(v).dtype
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
