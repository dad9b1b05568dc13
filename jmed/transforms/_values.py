"""Value semantics of transforms and samplers: immutability, equality, hashing, stable keys.

A ``Value`` is configured in its constructor and never changes afterwards: setting or
deleting an attribute once ``__init__`` has returned raises ``AttributeError``. Its
identity is its type plus a canonical, hashable form of its public attributes (names not
starting with ``_``): arrays, lists, dicts and sets become tuples, functions become their
module, qualified name, a digest of their code and the canonical form of their closure,
defaults and the module globals they read. Two values with the same identity compare
equal and hash alike, so equal configurations share ``jax.jit`` programs (transforms and
samplers are static arguments) and cache entries.

The canonical form is also written as a string that is the same in every process and
run (``stable_key``). A part of a configuration without such a form (an object of a type
whose meaningful state cannot be told from the outside, a tracer) is equal only to
itself, and refuses to key a cache.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import numbers
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_CONSTRUCTING = "_constructing"
_STATE = "_value_cache"


class _Opaque:
    """A configuration part without a stable form: equal only to itself."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Opaque) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _name(obj: Any) -> Any:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}.{_name(obj) or type(obj).__qualname__}"


def _resolves(value: Any) -> bool:
    """Whether ``value`` is what its module's attribute path ``__qualname__`` names."""
    module = sys.modules.get(getattr(value, "__module__", None) or "")
    qualname = _name(value)
    if module is None or not isinstance(qualname, str) or "<" in qualname:
        return False
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return obj is value


def _const_repr(value: Any) -> str:
    if isinstance(value, types.CodeType):
        return _code_digest(value)
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_const_repr(v) for v in value) + ")"
    if isinstance(value, (frozenset, set)):
        # the iteration order of a set of strings changes with the hash seed
        return "{" + ",".join(sorted(_const_repr(v) for v in value)) + "}"
    return f"{type(value).__name__}:{value!r}"


def _code_digest(code: types.CodeType) -> str:
    """Digest of what a code object does (not where it is): bytecode, constants, names."""
    h = hashlib.blake2b(digest_size=8)
    header = (
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
        code.co_names,
        code.co_freevars,
    )
    h.update(repr(header).encode())
    h.update(code.co_code)
    h.update(_const_repr(code.co_consts).encode())
    return h.hexdigest()


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


class _Canonicaliser:
    """Builds canonical forms; records the parts that have no stable form."""

    def __init__(self) -> None:
        self.unstable: list[tuple[str, Any]] = []
        self._active: set[int] = set()

    def __call__(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (str, bytes)):
            return value
        if isinstance(value, np.generic):  # before float: np.float64 is one, but not weakly typed
            return ("scalar", value.dtype.name, value.tobytes().hex())
        if isinstance(value, bool):
            return ("bool", value)
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            # weak-typed Python floats and ints give different programs: keep them apart
            return ("float", "nan" if value != value else value)
        if isinstance(value, complex):
            return ("complex", self(value.real, path), self(value.imag, path))
        if isinstance(value, Value):
            key, unstable, _ = value._value_state()
            self.unstable.extend((path + p, v) for p, v in unstable)
            return key
        if isinstance(value, jax.core.Tracer):
            return self._opaque(value, path)
        if isinstance(value, (np.ndarray, jax.Array)):
            try:
                array = np.asarray(value)
            except Exception:  # e.g. typed PRNG keys
                return self._opaque(value, path)
            return self._array(array, path)
        if isinstance(value, np.dtype):
            return ("dtype", value.name)
        if isinstance(value, type):
            return ("type", _qualified(value))
        if isinstance(value, types.ModuleType):
            return ("module", value.__name__)
        if isinstance(value, enum.Enum):
            return ("enum", _qualified(type(value)), value.name)
        if isinstance(value, (tuple, list)):
            if id(value) in self._active:
                return ("cycle",)
            self._active.add(id(value))
            try:
                items = tuple(self(v, f"{path}[{i}]") for i, v in enumerate(value))
            finally:
                self._active.discard(id(value))
            if type(value) in (tuple, list):
                return ("seq", *items)
            return ("tuple", _qualified(type(value)), *items)  # named tuples
        if isinstance(value, Mapping):
            if id(value) in self._active:
                return ("cycle",)
            self._active.add(id(value))
            try:
                items = tuple(
                    (self(k, f"{path}[{k!r}]"), self(v, f"{path}[{k!r}]")) for k, v in value.items()
                )
            finally:
                self._active.discard(id(value))
            return ("map", *items)
        if isinstance(value, (set, frozenset)):
            items = [self(v, f"{path}{{}}") for v in value]
            return ("set", *sorted(items, key=_sort_key))
        if isinstance(value, os.PathLike):
            return ("path", os.fspath(value))
        if isinstance(value, types.FunctionType):
            return self._function(value, path)
        if isinstance(value, functools.partial):
            return (
                "partial",
                self(value.func, f"{path}.func"),
                self(value.args, f"{path}.args"),
                self(value.keywords, f"{path}.keywords"),
            )
        if isinstance(value, types.MethodType):
            return ("method", self(value.__self__, f"{path}.__self__"), self(value.__func__, path))
        if isinstance(value, np.ufunc):
            return ("ufunc", value.__name__)
        if _resolves(value):
            return ("global", _qualified(value))
        if dataclasses.is_dataclass(value):
            fields = tuple(
                (f.name, self(getattr(value, f.name), f"{path}.{f.name}")) for f in dataclasses.fields(value)
            )
            return ("dataclass", _qualified(type(value)), *fields)
        wrapped = getattr(value, "__wrapped__", None)
        if isinstance(wrapped, types.FunctionType):  # e.g. jax.jit of a local function
            return ("wrapped", _qualified(type(value)), self._function(wrapped, f"{path}.__wrapped__"))
        if isinstance(value, numbers.Number):  # Decimal, Fraction: exact reprs
            return ("number", _qualified(type(value)), repr(value))
        # no way to tell from the outside which state makes such an object what it is
        return self._opaque(value, path)

    def _opaque(self, value: Any, path: str) -> _Opaque:
        self.unstable.append((path, value))
        return _Opaque(value)

    def _array(self, array: np.ndarray, path: str) -> tuple:
        if array.dtype == object:
            return ("array", "object", array.shape, self(array.tolist(), path))
        digest = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()
        return ("array", array.dtype.name, array.shape, digest)

    def _function(self, fn: types.FunctionType, path: str) -> tuple:
        if id(fn) in self._active:
            return ("recursive", _qualified(fn))
        self._active.add(id(fn))
        try:
            code = fn.__code__
            closure = []
            for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
                try:
                    contents = cell.cell_contents
                except ValueError:  # a cell not yet filled
                    closure.append((name, ("empty",)))
                    continue
                closure.append((name, self(contents, f"{path}[closure {name!r}]")))
            return (
                "function",
                _qualified(fn),
                _code_digest(code),
                ("closure", *closure),
                self(fn.__defaults__ or (), f"{path}.__defaults__"),
                self(fn.__kwdefaults__ or {}, f"{path}.__kwdefaults__"),
                ("globals", *self._globals(fn, code)),
            )
        finally:
            self._active.discard(id(fn))

    def _globals(self, fn: types.FunctionType, code: types.CodeType) -> list[tuple[str, Any]]:
        """The module globals the code reads (constants, helper functions of the same
        module); a global without a stable form counts by its name only, since a module
        attribute is found by name in every process."""
        out = []
        for name in sorted(_global_names(code)):
            if name not in fn.__globals__:
                continue  # an attribute name, a builtin or a global defined later
            value = fn.__globals__[name]
            if isinstance(value, types.ModuleType):
                out.append((name, ("module", value.__name__)))
                continue
            if isinstance(value, types.FunctionType) and value.__module__ != fn.__module__:
                out.append((name, ("global", _qualified(value))))
                continue
            mark = len(self.unstable)
            form = self(value, name)
            if len(self.unstable) > mark:
                del self.unstable[mark:]
                form = ("named", _qualified(type(value)))
            out.append((name, form))
        return out


def _sort_key(form: Any) -> str:
    try:
        return _to_string(form)
    except ValueError:
        return repr(form)


def _to_string(form: Any) -> str:
    """The canonical form as text, the same in every process; ``ValueError`` where a part
    has none."""
    if isinstance(form, tuple):
        return "(" + ",".join(_to_string(v) for v in form) + ")"
    if isinstance(form, _Opaque):
        raise ValueError(type(form.value).__qualname__)
    return repr(form)


def _digest(form: Any) -> str:
    """Short digest of a canonical form; unstable parts count by their type name."""

    def text(f):
        if isinstance(f, tuple):
            return "(" + ",".join(text(v) for v in f) + ")"
        if isinstance(f, _Opaque):
            return f"<{type(f.value).__qualname__}>"
        return repr(f)

    return hashlib.blake2b(text(form).encode(), digest_size=4).hexdigest()


def display(value: Any) -> str:
    """``repr`` without memory addresses: functions show their qualified name and a
    digest of their code, closure, defaults and globals."""
    if isinstance(value, types.FunctionType):
        canon = _Canonicaliser()
        form = canon(value, "")
        label = f"<function {_qualified(value)} #{_digest(form)}"
        if canon.unstable:
            label += ", not stable"
        return label + ">"
    if isinstance(value, functools.partial):
        parts = [display(value.func), *(display(a) for a in value.args)]
        parts += [f"{k}={display(v)}" for k, v in value.keywords.items()]
        return f"functools.partial({', '.join(parts)})"
    if type(value) is list:
        return "[" + ", ".join(display(v) for v in value) + "]"
    if type(value) is tuple:
        inner = ", ".join(display(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if type(value) is dict:
        return "{" + ", ".join(f"{display(k)}: {display(v)}" for k, v in value.items()) + "}"
    if not isinstance(value, (Value, type)) and callable(value):
        if _resolves(value):
            return _qualified(value)
        wrapped = getattr(value, "__wrapped__", None)
        if isinstance(wrapped, types.FunctionType):
            return f"<{type(value).__qualname__} of {display(wrapped)}>"
    return repr(value)


def stable_key(value: Any) -> str:
    """The canonical form of ``value`` as text that is the same in every process and run.

    Raises:
        ValueError: a part of ``value`` has no stable form; the message names it.
    """
    if isinstance(value, Value):
        form, unstable, _ = value._value_state()
        root = type(value).__name__
    else:
        canon = _Canonicaliser()
        form, unstable = canon(value, ""), canon.unstable
        root = getattr(value, "__qualname__", type(value).__name__)
    if unstable:
        path, part = unstable[0]
        text = repr(part)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(
            f"{root} cannot key a cache: {root}{path} is a {type(part).__qualname__} ({text}) with no "
            "identity that is the same in every process (an object of a type with no canonical "
            "form, or a traced value); configure with plain values (numbers, strings, tuples, arrays, other "
            "transforms) and module-level functions, e.g. functools.partial(module_function, "
            "factor=2.0) instead of a closure over the object"
        )
    return _to_string(form)


def _freezing(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        state = self.__dict__
        depth = state.get(_CONSTRUCTING, 0)
        state[_CONSTRUCTING] = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            if depth:
                state[_CONSTRUCTING] = depth
            else:
                del state[_CONSTRUCTING]

    __init__._freezes = True
    return __init__


class Value:
    """Immutable after construction; equal and hashed by type and public attributes."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_freezes", False):
            cls.__init__ = _freezing(init)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get(_CONSTRUCTING):
            raise AttributeError(
                f"{type(self).__name__} is immutable: cannot set {name!r} after construction; "
                f"build a new {type(self).__name__} with the configuration you want"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if not self.__dict__.get(_CONSTRUCTING):
            raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")
        object.__delattr__(self, name)

    def _value_state(self) -> tuple[tuple, tuple[tuple[str, Any], ...], int]:
        """``(canonical form, unstable parts as (path, object), hash)``, computed once."""
        state = self.__dict__.get(_STATE)
        if state is not None:
            return state
        canon = _Canonicaliser()
        fields = tuple(
            (name, canon(value, f".{name}"))
            for name, value in sorted(vars(self).items())
            if not name.startswith("_")
        )
        form = (_qualified(type(self)), *fields)
        state = (form, tuple(canon.unstable), hash(form))
        if not self.__dict__.get(_CONSTRUCTING):  # a half-built value may still change
            self.__dict__[_STATE] = state
        return state

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        return self._value_state()[0] == other._value_state()[0]

    def __hash__(self) -> int:
        return self._value_state()[2]

    def __getstate__(self) -> dict[str, Any]:
        # string hashes differ between processes: never carry the cached hash along
        return {k: v for k, v in self.__dict__.items() if k not in (_STATE, _CONSTRUCTING)}
