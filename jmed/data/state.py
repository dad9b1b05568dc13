"""Loader iterator states that any number of workers can restore."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#
# The batches do not depend on num_workers; only grain's state of the stage that hands the
# workers' elements to the main process does: with 0 workers ``{"next_index": n}``, with N
# workers an interleave of N slices (worker w computes elements w, w + N, ...) that the
# main process reads in turn. Both reduce to n, the number of elements received, which is
# what a saved state keeps; restoring rebuilds the stage's state for the new worker count.


def _received(node: Any) -> int | None:
    """Elements received from the workers, if ``node`` is the state of that stage."""
    if not isinstance(node, dict):
        return None
    if set(node) == {"next_index"} and isinstance(node["next_index"], int):
        return node["next_index"]
    if "iterators_in_use_states" in node and "next_index_in_cycle" in node:
        states = node["iterators_in_use_states"]
        if not all(isinstance(s, dict) and set(s) == {"next_index"} for s in states):
            return None
        total = sum(s["next_index"] for s in states)
        if node != {**node, **_stream_state(total, len(states))} and not any(node.get("exhausted", ())):
            return None  # not the round-robin layout assumed above
        return total
    return None


def _stream_state(received: int, num_workers: int) -> dict:
    if num_workers == 0:
        return {"next_index": received}
    per_worker = [received // num_workers + (w < received % num_workers) for w in range(num_workers)]
    return {
        "next_index_in_cycle": received % num_workers,
        "next_index_in_datasets": num_workers,
        "iterators_in_use_indices": list(range(num_workers)),
        "iterators_in_use_states": [{"next_index": n} for n in per_worker],
        "exhausted": [0] * num_workers,
        "future_states": {},
    }


def _map_stream_state(state: Any, convert: Callable[[int], Any]) -> tuple[Any, int] | None:
    """``state`` with the workers' stage replaced by ``convert(received)``, and ``received``;
    ``None`` if that stage is not found exactly once."""
    found = []

    def walk(node):
        received = _received(node)
        if received is not None:
            found.append(received)
            return convert(received)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    out = walk(state)
    return (out, found[0]) if len(found) == 1 else None


_STATE_FORMAT = "jmed-loader-state-1"
_RECEIVED = "subjects_received"


def _is_received_marker(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {_RECEIVED}
