"""Checks before spawning worker processes (absl flags, the script's main guard)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; with recent jaxlib they must be parsed."""
    try:
        from absl import flags
    except ImportError:  # pragma: no cover - absl ships with grain
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _guard_message() -> str:
    return (
        "this script starts a jmed loader with worker processes at import time. Workers are "
        "spawned and import the main script again, so put the script's work under "
        '`if __name__ == "__main__":` (or pass num_workers=0)'
    )


def _check_main_guard() -> None:
    """Raise before spawning workers from a script that would start them again in each worker.

    A spawned worker imports the main script; code that is not under
    ``if __name__ == "__main__":`` runs again there and would start workers of its own
    (Python then fails in every worker with a long traceback). Detected in the main
    process from the script's source, and in a worker while it imports the script.
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(_guard_message())
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or not str(path).endswith(".py"):
        return  # interactive session, notebook, -c: nothing is imported again
    frame = sys._getframe(1)
    line = None
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
        frame = frame.f_back
    if line is None:
        return  # called from a function that the script's main block called
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare) and _compares_main(n)]
    if any(not isinstance(n.ops[0], (ast.Eq, ast.Is)) for n in compares):
        return  # a guard of another form (`if __name__ != "__main__": exit()`): trust it
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and node.body and any(n in compares for n in ast.walk(node.test)):
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.lineno):
                return
    raise RuntimeError(_guard_message())


def _compares_main(test: ast.Compare) -> bool:
    """Whether ``test`` compares ``__name__`` with ``"__main__"``."""
    if len(test.ops) != 1:
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return bool(names) and bool(consts)
