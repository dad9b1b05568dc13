"""``LoaderIterator``: the loaders' grain ``DatasetIterator`` (state saving, worker faults)."""

from __future__ import annotations

import atexit
import gc
import weakref
from typing import Any

import grain

from jmed.data.state import (
    _RECEIVED,
    _STATE_FORMAT,
    _is_received_marker,
    _map_stream_state,
    _stream_state,
)
from jmed.image import Subject

__all__ = ["LoaderIterator"]


def _wait_for_shared_memory_release(timeout: float = 5.0) -> None:
    """Wait until grain has closed and unlinked the shared memory of the arrays collected
    so far (it does so from one background thread, in order)."""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # another grain layout: nothing known to wait for
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        try:
            pool.apply_async(int).wait(timeout)
        except (ValueError, RuntimeError):  # the pool is already shut down
            pass


# iterators not yet closed: closed at exit, while the interpreter is intact, so that the
# workers' shared-memory blocks are unlinked and the arrays mapping them released
_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN_ITERATORS):
        try:
            iterator._close(keep_state=False)
        except Exception:  # exiting anyway
            pass


class LoaderIterator(grain.DatasetIterator):
    """Iterator over batches: a grain ``DatasetIterator``, closed (workers stopped) when
    exhausted.

    Workers start when the iterator is created, so their start-up overlaps with whatever
    the caller does before asking for the first batch. ``get_state()`` returns a small
    JSON-compatible dict; ``set_state(state)`` on a fresh iterator of an identically
    configured loader continues exactly from that point, whatever the number of workers
    of either (the batches do not depend on it). Call ``close()`` (or use it as a context
    manager) to stop workers early.

    Being a grain ``DatasetIterator``, it is saved and restored by grain's orbax
    checkpoint handler along with a model's state::

        ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            loader=grain.checkpoint.CheckpointSave(iterator),
        )

    and ``grain.checkpoint.CheckpointRestore(iter(loader))`` to resume (see
    docs/loader.md).

    A worker process that dies (killed by the OS, typically for lack of memory) raises a
    ``RuntimeError`` naming the subjects it may have been processing.
    """

    def __init__(self, iterator: grain.DatasetIterator, loader: Any = None, counter: Any = None):
        # no grain parents: this iterator owns ``iterator`` and drops it on close (see _close)
        super().__init__()
        self._iterator = iterator
        self._loader = loader
        self._counter = counter
        self._first_batch_bar = None
        # start every worker now, as PyTorch's DataLoader does, so that their start-up
        # (imports, compilation) overlaps with the caller's; grain alone would start each
        # worker only once the previous one has delivered its first element
        self._iterator.start_prefetch()
        self._final_state = None
        self._delivered = False
        _OPEN_ITERATORS.add(self)

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> Subject:
        if self._iterator is None:
            raise StopIteration
        if not self._delivered:
            self._show_start_up()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.close()
            raise
        except RuntimeError as err:
            if "terminated unexpectedly" not in str(err) or self._loader is None or self._counter is None:
                raise
            self._close(keep_state=False)
            raise RuntimeError(self._worker_died_message(err)) from err
        finally:
            self._end_start_up()
        self._delivered = True
        return batch

    def _show_start_up(self) -> None:
        """With ``progress=True``, a bar over the subjects prepared for the first batch."""
        loader = self._loader
        if loader is None or self._counter is None or not getattr(loader, "progress", False):
            return
        from jmed import _progress

        self._first_batch_bar = _progress.progress_bar(
            True,
            total=loader._subjects_for_first_batch(),
            desc=f"first batch ({loader.num_workers} workers)",
            unit="subject",
        )
        self._counter.bar = self._first_batch_bar

    def _end_start_up(self) -> None:
        bar, self._first_batch_bar = self._first_batch_bar, None
        if bar is not None:
            self._counter.bar = None
            bar.close()

    def start_prefetch(self) -> None:
        """Start the workers (they start when the iterator is created; idempotent)."""
        if self._iterator is not None:
            self._iterator.start_prefetch()

    def __del__(self) -> None:
        # a forgotten iterator is closed at exit (``_close_open_iterators``) or by grain's
        # own iterator when collected, never from inside a garbage collection
        pass

    def _worker_died_message(self, err: Exception) -> str:
        loader = self._loader
        received = self._counter.received
        subjects = loader._in_flight(received)
        described = "; ".join(loader.source.describe(i) for i in subjects) or "none (end of the stream)"
        return (
            f"a loader worker process died ({err}) while preparing element {received} of the "
            f"subject stream; it was processing one of the subjects {described}. A worker "
            "killed by the operating system (exit code -9, SIGKILL) has usually run out of "
            "memory: lower num_workers or worker_buffer_size, preprocess to smaller volumes, "
            "check loader.get_max_memory_pretty() against the memory limit, and see the kernel "
            "log (dmesg) for the out-of-memory killer; with another exit code, the worker's own "
            "error is printed above"
        )

    def get_state(self) -> dict:
        """The position, as a JSON-compatible dict that any worker count can restore."""
        if self._iterator is None:
            if self._final_state is None:
                raise RuntimeError("this iterator was closed after an error; it has no state to save")
            return self._final_state
        return self._portable_state(self._iterator.get_state())

    def _portable_state(self, state: dict) -> dict:
        mapped = _map_stream_state(state, lambda received: {_RECEIVED: received})
        num_workers = None if self._loader is None else self._loader.num_workers
        if mapped is None:  # a grain state layout this version does not know: keep it as is
            return {"format": _STATE_FORMAT, "num_workers": num_workers, "pipeline": state}
        return {"format": _STATE_FORMAT, "num_workers": num_workers, "pipeline": mapped[0]}

    def set_state(self, state: dict) -> None:
        """Continue from ``state`` (from ``get_state``, saved with any worker count).

        Raises:
            ValueError: ``state`` is not a loader state, or it was saved in a layout that
                only a loader with the same number of workers can restore and the
                counts differ.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from get_state(), got {type(state).__name__}")
        if self._iterator is None:
            raise RuntimeError("this iterator is closed; call set_state on a new iter(loader)")
        num_workers = None if self._loader is None else self._loader.num_workers
        if state.get("format") == _STATE_FORMAT:
            pipeline = state["pipeline"]
            saved_workers = state.get("num_workers")
        else:  # a raw grain state (saved by earlier versions)
            pipeline, saved_workers = state, None
        received = []

        def restore(node):
            if _is_received_marker(node):
                received.append(int(node[_RECEIVED]))
                return _stream_state(received[-1], num_workers or 0)
            if isinstance(node, dict):
                return {k: restore(v) for k, v in node.items()}
            return node

        grain_state = restore(pipeline)
        if not received:
            mapped = _map_stream_state(pipeline, lambda n: _stream_state(n, num_workers or 0))
            if mapped is not None:
                grain_state, position = mapped
                received.append(position)
            elif saved_workers is not None and num_workers is not None and saved_workers != num_workers:
                raise ValueError(
                    f"this state was saved by a loader with num_workers={saved_workers} in a layout "
                    f"that only num_workers={saved_workers} can restore; this loader has "
                    f"num_workers={num_workers}"
                )
        self._iterator.set_state(grain_state)
        if received and self._counter is not None:
            self._counter.received = received[0]

    def close(self) -> None:
        """Stop the workers and release the data held for batches not yet delivered;
        ``get_state()`` still returns the position reached."""
        self._close(keep_state=True)

    def _close(self, keep_state: bool) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is None:
            return
        self._closed = True
        if keep_state:
            try:
                self._final_state = self._portable_state(iterator.get_state())
            except Exception:  # a broken pipeline has no position to keep
                self._final_state = None
        _OPEN_ITERATORS.discard(self)
        iterator.close()
        # grain's iterators hold arrays received ahead from the workers in reference
        # cycles: collect them now (not at interpreter shutdown, where their finaliser
        # fails) and let grain finish unlinking their shared memory
        del iterator
        gc.collect()
        _wait_for_shared_memory_release()

    def __enter__(self) -> LoaderIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
