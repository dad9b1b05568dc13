"""Progress bars for long work (inference, cache building, landmark training, downloads).

Every public entry point that can run for long takes ``progress: bool``; ``True`` shows a
tqdm bar on stderr. ``progress_bar`` is the one place that builds it, so every bar looks
and behaves alike and ``progress=False`` costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress_bar"]

T = TypeVar("T")


class _Silent:
    """The no-op stand-in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(
    enabled: bool,
    *,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
) -> Any:
    """A tqdm bar on stderr when ``enabled``, else a silent object with the same methods.

    Use it as a context manager and call ``update(n)``; it closes on exit.

    Args:
        enabled: show the bar.
        total: the number of steps (or bytes), ``None`` when unknown.
        desc: the text before the bar.
        unit: the name of one step.
        unit_scale: scale large counts with SI prefixes (bytes).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"progress must be True or False, got {enabled!r}")
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True, leave=True)


def track(
    items: Iterable[T], enabled: bool, *, total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Yield ``items``, advancing a progress bar (see ``progress_bar``) after each."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(enabled, total=total, desc=desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)
