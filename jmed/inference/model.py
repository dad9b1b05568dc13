"""The model program: one description of ``predict``, its arrays as arguments.

``sliding_window_inference`` compiles the model once per window-batch shape and shares
that program between calls. To do so it describes ``predict`` by a hashable value (code,
structure, static values) that keys the program, and passes the arrays it holds (weights)
as arguments, so new weights reuse the program and a mutated model is never stale.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jmed.inference._mesh import _batch_spec, _shard_map


class _Opaque(Exception):
    """``predict`` holds a value that can neither be described nor passed as an argument."""


class _Same:
    """Compares by identity; holding the object keeps its ``id`` from being reused."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return type(other) is _Same and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


# immutable values, described by their type and value
_VALUE_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    type,
    types.ModuleType,
    np.ufunc,
    np.dtype,
    np.generic,
    type(Ellipsis),
    jax.sharding.Mesh,
    jax.sharding.PartitionSpec,
    jax.sharding.Sharding,
)
# already-transformed functions (``jax.jit``, ``custom_jvp``, ...): jax fixes what they close
# over at their own first trace, so they are described by their identity
_TRANSFORMED_TYPES = (jax.stages.Wrapped, jax.custom_jvp, jax.custom_vjp)
_MAX_DEPTH = 32


def _is_nnx_module(obj) -> bool:
    nnx = sys.modules.get("flax.nnx")  # an NNX module can only exist once Flax NNX is imported
    module = getattr(nnx, "Module", None)
    return isinstance(module, type) and isinstance(obj, module)


def _split(obj, arrays: list, depth: int = 0) -> tuple:
    """A hashable description of ``obj``; its arrays are appended to ``arrays``.

    ``_build(description, iter(arrays))`` makes an equivalent object holding the given
    arrays, so the description keys a compiled program and the arrays are its arguments:
    jax arrays and the state of Flax NNX modules (``nnx.split``: graph definition in the
    description, state in ``arrays``) are arguments; numpy arrays and immutable Python
    values are described by value; functions by their code, globals and the description
    of their closure, defaults, ``functools.partial`` arguments or bound ``self``;
    registered pytrees by their structure and leaves. Anything else (an instance of an
    arbitrary class, which may change without notice) raises ``_Opaque``.
    """
    if depth > _MAX_DEPTH:
        raise _Opaque
    deeper = depth + 1
    if isinstance(obj, jax.Array):
        arrays.append(obj)
        return ("array",)
    if _is_nnx_module(obj):
        graphdef, state = sys.modules["flax.nnx"].split(obj)
        arrays.append(state)
        return ("nnx", graphdef)
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise _Opaque
        return ("ndarray", obj.dtype, obj.shape, obj.tobytes())
    if isinstance(obj, _VALUE_TYPES):
        # 1 == 1.0 == True and 0.0 == -0.0: the type and the text tell them apart
        text = repr(obj) if isinstance(obj, (float, complex, np.generic)) else None
        return ("value", type(obj), obj, text)
    if isinstance(obj, types.BuiltinFunctionType):
        if obj.__self__ is not None and not isinstance(obj.__self__, types.ModuleType):
            raise _Opaque  # a method bound to a (possibly mutable) object
        return ("value", type(obj), obj, None)
    if type(obj) in (tuple, list):
        return (type(obj).__name__, tuple(_split(v, arrays, deeper) for v in obj))
    if type(obj) is dict:
        if not all(isinstance(k, _VALUE_TYPES) for k in obj):
            raise _Opaque
        return ("dict", tuple((_split(k, arrays), _split(v, arrays, deeper)) for k, v in obj.items()))
    if isinstance(obj, types.FunctionType):
        try:
            cells = tuple(cell.cell_contents for cell in obj.__closure__ or ())
        except ValueError:  # an empty cell: a variable not assigned yet
            raise _Opaque from None
        return (
            "function",
            obj.__code__,
            _Same(obj.__globals__),
            obj.__name__,
            _split(obj.__defaults__ or (), arrays, deeper),
            _split(obj.__kwdefaults__ or {}, arrays, deeper),
            _split(cells, arrays, deeper),
        )
    if isinstance(obj, types.MethodType):
        return ("method", _split(obj.__func__, arrays, deeper), _split(obj.__self__, arrays, deeper))
    if type(obj) is functools.partial:
        return (
            "partial",
            _split(obj.func, arrays, deeper),
            _split(obj.args, arrays, deeper),
            _split(obj.keywords, arrays, deeper),
        )
    if isinstance(obj, _TRANSFORMED_TYPES):
        return ("same", _Same(obj))
    leaves, treedef = jax.tree.flatten(obj)
    if not (len(leaves) == 1 and leaves[0] is obj):  # a registered pytree node
        return ("pytree", treedef, tuple(_split(leaf, arrays, deeper) for leaf in leaves))
    cls = type(obj)
    if cls.__eq__ is not object.__eq__ and cls.__hash__ not in (None, object.__hash__):
        return ("value", cls, obj, None)  # a class with value semantics
    raise _Opaque


def _build(description: tuple, arrays: Iterator) -> Any:
    """The object ``description`` (from ``_split``) stands for, with the given arrays."""
    kind = description[0]
    if kind == "array":
        return next(arrays)
    if kind == "nnx":
        return sys.modules["flax.nnx"].merge(description[1], next(arrays))
    if kind == "ndarray":
        _, dtype, shape, data = description
        return np.frombuffer(data, dtype).reshape(shape)
    if kind == "value":
        return description[2]
    if kind == "same":
        return description[1].obj
    if kind == "tuple":
        return tuple(_build(d, arrays) for d in description[1])
    if kind == "list":
        return [_build(d, arrays) for d in description[1]]
    if kind == "dict":
        return {_build(k, arrays): _build(v, arrays) for k, v in description[1]}
    if kind == "function":
        _, code, globals_, name, defaults, kwdefaults, cells = description
        defaults = _build(defaults, arrays)
        kwdefaults = _build(kwdefaults, arrays)
        cells = tuple(types.CellType(value) for value in _build(cells, arrays))
        function = types.FunctionType(code, globals_.obj, name, defaults or None, cells or None)
        function.__kwdefaults__ = kwdefaults or None
        return function
    if kind == "method":
        function = _build(description[1], arrays)
        return types.MethodType(function, _build(description[2], arrays))
    if kind == "partial":
        function = _build(description[1], arrays)
        args = _build(description[2], arrays)
        return functools.partial(function, *args, **_build(description[3], arrays))
    if kind == "pytree":
        return jax.tree.unflatten(description[1], [_build(d, arrays) for d in description[2]])
    raise AssertionError(f"unknown description {kind!r}")  # pragma: no cover


def _model_program(predict_windows, mesh, axes, donate):
    """``jax.jit`` of ``predict_windows(arrays, windows)``; windows split over ``mesh``.

    With ``donate`` the windows are donated: a model whose output has the windows' shape
    and dtype may write it in their place.
    """
    if mesh is not None:
        batch_spec = _batch_spec(axes)
        mapped = _shard_map(
            predict_windows,
            mesh=mesh,
            in_specs=(jax.sharding.PartitionSpec(), batch_spec),
            out_specs=batch_spec,
        )
        predict_windows = functools.wraps(predict_windows)(mapped)
    return jax.jit(predict_windows, donate_argnums=(1,) if donate else ())


@functools.lru_cache(maxsize=32)
def _described_model(description, mesh, axes, donate):
    def predict_windows(arrays, windows):
        return _build(description, iter(arrays))(windows)

    return _model_program(predict_windows, mesh, axes, donate)


def _model(predict) -> tuple[Callable, tuple]:
    """``(model, arrays)``: ``model(mesh, axes, donate)(arrays, windows)`` predicts a window batch.

    When ``predict`` can be described (see ``_split``), the program is cached on its
    description, so it is compiled once per window-batch shape (``jax.jit``'s cache) and
    new arrays (weights) are new arguments. Otherwise it is compiled for this call only.
    """
    arrays = []
    try:
        description = _split(predict, arrays)
        hash(description)
    except (_Opaque, TypeError):

        def predict_windows(arrays, windows):
            return predict(windows)

        return functools.lru_cache(maxsize=None)(functools.partial(_model_program, predict_windows)), ()
    return functools.partial(_described_model, description), tuple(arrays)
