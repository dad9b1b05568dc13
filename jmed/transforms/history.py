"""Transform histories: read them, print them, replay them as one transform.

Calling a transform on a ``Subject`` appends ``(transform, params)`` to
``subject.history`` (see ``jmed.transforms.base``). The history stays data; this module
gives it a readable form and turns it back into a transform:

- ``describe_history(subject)``: one ``HistoryStep`` per transform applied, with its
  sampled parameters by name, in physical units (degrees, millimetres, factors).
  Compositions are unfolded: the steps of a ``Compose`` are listed one by one, the
  children of ``RandomApply``, ``OneOf`` and ``SomeOf`` one level deeper, those a random
  choice left out marked as not applied.
- ``format_history(subject)``: the same as text, one line per step, e.g.
  ``RandomAffine(scales=(1.030, 0.980, 1.000), degrees=(4.10, -2.00, 0.50),
  translation_mm=(0.00, 0.00, 0.00))``. ``Subject.history_summary()`` returns it.
- ``ReplayHistory(history)``: a deterministic transform that applies the recorded steps
  with their recorded params (TorchIO's ``get_composed_history``; what
  ``Subject.get_composed_history()`` returns). Applied to the subject the history was
  recorded on, it gives the transformed subject exactly.

Parameter names follow the transforms' own params, with the unit appended where there
is one (``translation_mm``, ``std_mm``, ``max_displacement_mm``); angles are in degrees.
Arrays of more than 12 values (patch locations, bias-field coefficients of high
orders) are summarised by their count and range. Random seeds (noise) are not shown.
Params recorded under ``vmap`` (a batch) are shown as nested lists, one entry per item.

Examples:
    >>> import jax, jmed
    >>> import jmed.transforms as T
    >>> from jmed.transforms.history import format_history
    >>> subject = jmed.datasets.phantom(0, shape=(16, 16, 16))
    >>> out = T.RandomAffine(scales=(1.1, 1.1), degrees=(10, 10))(jax.random.key(0), subject)
    >>> print(format_history(out))
    RandomAffine(scales=(1.100, 1.100, 1.100), degrees=(10.00, 10.00, 10.00), translation_mm=(0.00, 0.00, 0.00))
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jmed._checks import is_traced
from jmed.image import Image, Subject
from jmed.transforms import intensity, mri, preprocessing, spatial
from jmed.transforms.base import _NOT_INVERTIBLE, Compose, OneOf, RandomApply, SomeOf, Transform

__all__ = ["HistoryStep", "ReplayHistory", "describe_history", "format_history"]

# arrays with more values than this are summarised (count and range) when printed
_MAX_SHOWN = 12

# decimals shown per parameter name; other numbers are shown with 4 significant digits
_DECIMALS = {
    "scales": 3,
    "degrees": 2,
    "translation_mm": 2,
    "max_displacement_mm": 2,
    "std_mm": 2,
    "downsampling": 3,
    "gamma": 3,
    "multiplier": 3,
    "factor": 3,
    "times": 3,
}


class HistoryStep(NamedTuple):
    """One transform of a history, as ``describe_history`` lists it.

    Attributes:
        name: the transform's class name.
        values: its sampled parameters by name (numbers, tuples, numpy arrays; physical
            units as the names say), or ``None`` for a transform without sampled
            parameters (deterministic ones: ``format_history`` then prints its
            configuration, its ``repr``).
        depth: nesting level: 0 for the steps of the history (and of a ``Compose``),
            one more for each ``RandomApply``, ``OneOf`` or ``SomeOf`` around it.
        applied: False when a random choice left the transform out (its parameters are
            then not shown).
        transform: the transform itself.
    """

    name: str
    values: Mapping[str, Any] | None
    depth: int
    applied: bool
    transform: Any


def _history_of(history: Subject | Sequence[tuple[Any, Any]]) -> tuple:
    if isinstance(history, Subject):
        return history.history
    if isinstance(history, Image):
        raise TypeError("an Image has no history; transform a Subject to record one")
    steps = tuple(history)
    for i, step in enumerate(steps):
        if not (isinstance(step, (tuple, list)) and len(step) == 2):
            raise TypeError(f"history[{i}] must be a (transform, params) pair, got {step!r}")
    return steps


def _concrete(x: Any) -> np.ndarray | None:
    if is_traced(x):
        return None
    try:
        return np.asarray(x)
    except (TypeError, ValueError):
        return None


def _scalar_choice(x: Any) -> int | None:
    """A concrete scalar decision (index or flag) as an int; None when traced or batched."""
    value = _concrete(x)
    if value is None or value.ndim != 0:
        return None
    return int(value)


def _values(transform: Any, params: Any) -> dict[str, Any] | None:
    """Sampled parameters of one (non-container) transform, by name, in physical units."""
    if isinstance(params, preprocessing.WindowParams):
        return {
            "start": params.start,
            "input_shape": params.input_shape,
            "output_shape": params.output_shape,
        }
    if params is None:
        return None
    if isinstance(transform, spatial.RandomFlip):
        flips = _concrete(params)
        if flips is not None and flips.ndim == 1:
            return {"axes": tuple(int(a) for a in np.flatnonzero(flips))}
        return {"flipped": params}
    if isinstance(transform, spatial.RandomRot90):
        k = _concrete(params)
        return {"axes": transform.axes, "degrees": params if k is None else 90 * k}
    if isinstance(transform, spatial.RandomAffine):
        return {
            "scales": params["scales"],
            "degrees": params["degrees"],
            "translation_mm": params["translation"],
        }
    if isinstance(transform, spatial.RandomElasticDeformation):
        field = _concrete(params)
        values = {"control_points": transform.num_control_points}
        if field is not None:
            values["max_displacement_mm"] = np.max(np.abs(field), axis=(-4, -3, -2))
        return values
    if isinstance(transform, spatial.RandomAnisotropy):
        return {"axis": params["axis"], "downsampling": params["factor"]}
    if isinstance(transform, intensity.RandomNoise):
        return {"mean": params["mean"], "std": params["std"]}
    if isinstance(transform, intensity.RandomBlur):
        return {f"std_{transform.units}": params["std"]}
    if isinstance(transform, intensity.RandomBiasField):
        return {"order": transform.order, "coefficients": params["coefficients"]}
    if isinstance(transform, intensity.RandomSwap):
        return {"patch_size": transform.patch_size, "locations": params["locations"]}
    if isinstance(transform, intensity.RandomCoarseDropout):
        return {"hole_size": transform.hole_size, "corners": params["corners"]}
    if isinstance(transform, intensity.RandomLabelsToImage):
        return {"mean": params["mean"], "std": params["std"]}
    if isinstance(transform, mri.RandomMotion):
        return {
            "degrees": params["degrees"],
            "translation_mm": params["translation"],
            "times": params["times"],
        }
    if isinstance(transform, mri.RandomSpike):
        active = _concrete(params["active"])
        if active is not None and active.ndim == 1:
            intensity_ = _concrete(params["intensity"])
            return {
                "num_spikes": int(active.sum()),
                "intensity": None if intensity_ is None or not active.any() else intensity_[0],
                "positions": _concrete(params["positions"])[active],
            }
        return {k: params[k] for k in ("active", "intensity", "positions")}
    if isinstance(params, Mapping):
        # the remaining transforms name their params in physical terms already
        # (RandomGamma: gamma, RandomGhosting: num_ghosts, axis, intensity, ...)
        return {k: v for k, v in params.items() if k != "seed"}
    return {"params": params}


def _describe(transform: Any, params: Any, depth: int, out: list[HistoryStep]) -> None:
    name = type(transform).__name__
    if isinstance(transform, ReplayHistory):
        for t, p in zip(transform.transforms, params):
            _describe(t, p, depth, out)
        return
    if isinstance(transform, Compose):
        for t, p in zip(transform.transforms, params):
            _describe(t, p, depth, out)
        return
    if isinstance(transform, RandomApply):
        applied, child = params
        flag = _scalar_choice(applied)
        out.append(HistoryStep(name, {"p": transform.p, "applied": applied}, depth, True, transform))
        _child(transform.transform, child, depth + 1, flag is None or bool(flag), out)
        return
    if isinstance(transform, OneOf):
        index, children = params
        chosen = _scalar_choice(index)
        out.append(HistoryStep(name, {"chosen": index}, depth, True, transform))
        for k, (t, p) in enumerate(zip(transform.transforms, children)):
            _child(t, p, depth + 1, chosen is None or chosen == k, out)
        return
    if isinstance(transform, SomeOf):
        mask, children = params
        flags = _concrete(mask)
        shown = (
            {"applied": tuple(int(i) for i in np.flatnonzero(flags))}
            if flags is not None and flags.ndim == 1
            else {"mask": mask}
        )
        out.append(HistoryStep(name, shown, depth, True, transform))
        for k, (t, p) in enumerate(zip(transform.transforms, children)):
            applied = flags is None or flags.ndim != 1 or bool(flags[k])
            _child(t, p, depth + 1, applied, out)
        return
    if isinstance(transform, spatial.Spatial):
        children, fraction = params
        values = {"output_shape": transform.output_shape, "output_spacing": transform.output_spacing}
        if transform.crop == "random":
            values["crop_offset_fraction"] = fraction
        out.append(
            HistoryStep(name, {k: v for k, v in values.items() if v is not None}, depth, True, transform)
        )
        for t, p in zip(transform.transforms, children):
            _describe(t, p, depth + 1, out)
        return
    if not isinstance(transform, Transform):
        # a transform restored from a serialized jax.export program: only its text is known
        out.append(
            HistoryStep(
                repr(transform), None if params is None else {"params": params}, depth, True, transform
            )
        )
        return
    out.append(HistoryStep(name, _values(transform, params), depth, True, transform))


def _child(transform: Any, params: Any, depth: int, applied: bool, out: list[HistoryStep]) -> None:
    if applied:
        _describe(transform, params, depth, out)
    else:
        out.append(HistoryStep(type(transform).__name__, None, depth, False, transform))


def describe_history(history: Subject | Sequence[tuple[Any, Any]]) -> list[HistoryStep]:
    """The steps of a history with their sampled parameters by name (see the module docstring).

    Args:
        history: a ``Subject`` (its ``history``) or a sequence of ``(transform, params)``
            pairs.

    Returns:
        One ``HistoryStep`` per transform, in the order they were applied.

    Raises:
        TypeError: an ``Image`` (images carry no history) or malformed steps.
    """
    out: list[HistoryStep] = []
    for transform, params in _history_of(history):
        _describe(transform, params, 0, out)
    return out


def _number(x: Any, decimals: int | None) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if decimals is None:
        return np.format_float_positional(x, precision=4, unique=True, fractional=False, trim="-")
    return f"{(round(x, decimals) or 0.0):.{decimals}f}"  # no "-0.00"


def _text(value: Any, decimals: int | None) -> str:
    if value is None or isinstance(value, str):
        return repr(value)
    if isinstance(value, (tuple, list)) and not all(np.isscalar(v) for v in value):
        return "(" + ", ".join(_text(v, decimals) for v in value) + ("," if len(value) == 1 else "") + ")"
    array = _concrete(value)
    if array is None:
        return f"<traced {value.dtype}{list(value.shape)}>"
    if array.dtype == object:
        return repr(value)
    if array.ndim == 0:
        return _number(array.item(), decimals)
    if array.size > _MAX_SHOWN:
        if array.dtype == bool:
            return f"<{array.size} flags, {int(array.sum())} set>"
        low, high = _number(array.min(), decimals), _number(array.max(), decimals)
        return f"<{array.size} values in [{low}, {high}]>"

    def nested(a):
        if a.ndim == 0:
            return _number(a.item(), decimals)
        items = [nested(v) for v in a]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"

    return nested(array)


def _line(step: HistoryStep) -> str:
    indent = "  " * step.depth
    if not step.applied:
        return f"{indent}{step.name}: not applied"
    if step.values is None:
        return indent + repr(step.transform)
    inner = ", ".join(f"{k}={_text(v, _DECIMALS.get(k))}" for k, v in step.values.items())
    return f"{indent}{step.name}({inner})"


def format_history(history: Subject | Sequence[tuple[Any, Any]]) -> str:
    """The history as text: one line per transform with its sampled parameters.

    Transforms without sampled parameters show their configuration (their ``repr``);
    children of ``RandomApply``, ``OneOf`` and ``SomeOf`` are indented, and those a random
    choice left out read ``Name: not applied``. An empty history gives ``""``.

    Args:
        history: a ``Subject`` or a sequence of ``(transform, params)`` pairs.

    Raises:
        TypeError: an ``Image`` or malformed steps.
    """
    return "\n".join(_line(step) for step in describe_history(history))


# --- replay -----------------------------------------------------------------------------


def _params_digest(params: Any) -> str:
    """Digest of recorded params (structure, dtypes, shapes and values); traced values
    count by identity (a replay of traced params equals only itself)."""
    leaves, tree = jax.tree.flatten(params)
    h = hashlib.blake2b(str(tree).encode(), digest_size=8)
    for leaf in leaves:
        array = _concrete(leaf)
        if array is None or array.dtype == object:
            h.update(f"<{type(leaf).__name__} {id(leaf)}>".encode())
            continue
        h.update(f"{array.dtype.name}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class ReplayHistory(Transform):
    """Apply recorded ``(transform, params)`` steps again, with the same params.

    TorchIO's ``get_composed_history``; ``Subject.get_composed_history()`` returns one.
    Deterministic: called as ``replay(subject)`` (a key is accepted and ignored) it applies
    each recorded transform's ``apply`` with its recorded params, so on the subject the
    history was recorded on it gives the transformed subject exactly, and on another
    subject (a second modality, a label map) the same augmentation. The recorded steps
    are appended to the output's history one by one, as ``jmed.transforms.replay`` does.
    ``inverse`` undoes the invertible steps in reverse order and skips the others with a
    warning, as ``Compose`` does.

    Args:
        history: ``(transform, params)`` pairs, e.g. ``subject.history``.

    Two replays of equal transforms and equal params compare equal (the params enter by
    a digest of their values, ``params_digest``).

    Raises:
        TypeError: a step that is not a ``(transform, params)`` pair of a jmed transform
            (e.g. a history restored from a serialized ``jax.export`` program, which keeps
            only the transforms' descriptions).
    """

    def __init__(self, history: Sequence[tuple[Transform, Any]]):
        super().__init__()
        steps = _history_of(history)
        for i, (t, _) in enumerate(steps):
            if not isinstance(t, Transform):
                raise TypeError(
                    f"history[{i}] holds {t!r}, not a jmed transform (a history restored from a "
                    "serialized jax.export program keeps only descriptions and cannot be replayed)"
                )
        self.transforms = tuple(t for t, _ in steps)
        self.params_digest = _params_digest(tuple(p for _, p in steps))
        self.invertible = any(t.invertible for t in self.transforms)
        self._params = tuple(p for _, p in steps)

    def __call__(self, key: Any, data: Any = None, /) -> Any:
        out = super().__call__(key, data)
        if isinstance(out, Subject):
            # the steps themselves, not the replay, so the history reads as the original
            out = out.replace(history=out.history[:-1] + self.steps)
        return out

    @property
    def steps(self) -> tuple[tuple[Transform, Any], ...]:
        """The recorded ``(transform, params)`` pairs."""
        return tuple(zip(self.transforms, self._params))

    # the params are recorded: sampling reads neither the key nor the subject
    sample_reads_subject = False

    def sample(self, key, subject):
        return self._params

    def apply(self, subject, params):
        for t, p in zip(self.transforms, params):
            subject = t.apply(subject, p)
        return subject

    def inverse(self, subject, params):
        for t, p in reversed(tuple(zip(self.transforms, params))):
            if t.invertible:
                subject = t.inverse(subject, p)
            else:
                warnings.warn(_NOT_INVERTIBLE.format(name=type(t).__name__), stacklevel=2)
        return subject

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"ReplayHistory(transforms=({inner}), params_digest={self.params_digest!r})"
