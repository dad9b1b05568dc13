"""The transform protocol and composition.

Every transform is a pure callable ``transform(key, subject) -> subject`` (key first;
deterministic transforms accept ``key=None`` or no key at all). It also accepts a single
``Image`` and then returns an ``Image``.

Random transforms split the work in two: ``sample(key, subject) -> params`` draws the
parameters (a pytree of arrays), ``apply(subject, params) -> subject`` uses them
deterministically. Invertible transforms add ``inverse(subject, params)`` (or, for a
rule applied image by image, ``inverse_image(image, params)``). Calling a transform on a
``Subject`` appends ``(transform, params)`` to ``subject.history``, which ``replay`` and
``invert`` use. Unlike TorchIO, randomness comes only from the key: same key and input
give the same output, eager, under ``jit`` and under ``vmap``.

The public protocol, typed:

* ``Transform[P]``: the base class; ``P`` is the type of its params.
* ``RandomTransform[P]``: a transform that draws its params from a key
  (``is_random = True``; ``sample`` must be implemented).
* ``IntensityTransform`` / ``jmed.transforms.labels.LabelTransform``: act on one image
  kind.
* ``jmed.transforms.spatial.SpatialTransform``: a transform described by a mapping of
  voxel coordinates (subclasses return their own mapping; the base class applies output
  grids and resamples).
* ``SampleFn``, ``ApplyFn``, ``InverseFn``, ``TransformFn``: ``typing.Protocol`` classes for the
  four call signatures, for code that takes transforms or their methods as values.

Transforms apply by image kind (``kinds``: intensity transforms skip label maps) and honour
``include=`` / ``exclude=`` lists of image names. The parameter parsers that every
constructor uses are public in ``jmed.transforms.params``; docs/extending.md walks
through writing a new transform.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeAlias, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jmed.image import INTENSITY, KINDS, Image, Subject
from jmed.transforms import _values
from jmed.transforms import params as _params
from jmed.transforms.params import ImageNames

__all__ = [
    "ApplyFn",
    "Compose",
    "IntensityTransform",
    "InverseFn",
    "Lambda",
    "MissingKeyError",
    "OneOf",
    "PRNGKey",
    "Params",
    "RandomApply",
    "RandomTransform",
    "SampleFn",
    "SomeOf",
    "Transform",
    "TransformFn",
    "invert",
    "replay",
    "transform_key",
]

PRNGKey: TypeAlias = jax.Array
"""A JAX random key: a typed key array (``jax.random.key``) or a raw ``uint32[2]`` key
(``jax.random.PRNGKey``); a traced one under ``jit`` / ``vmap``."""

Params: TypeAlias = Any
"""Params of a transform: a pytree of arrays (or ``None`` for deterministic transforms).
Each transform documents its structure under "Params"; generic code types them with the
``P`` of ``Transform[P]``."""

P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)
P_contra = TypeVar("P_contra", contravariant=True)


class SampleFn(Protocol[P_co]):
    """``sample(key, subject) -> params``: draws params from ``key`` (pure)."""

    def __call__(self, key: PRNGKey | None, subject: Subject, /) -> P_co: ...


class ApplyFn(Protocol[P_contra]):
    """``apply(subject, params) -> subject``: deterministic given params (pure)."""

    def __call__(self, subject: Subject, params: P_contra, /) -> Subject: ...


class InverseFn(Protocol[P_contra]):
    """``inverse(subject, params) -> subject``: undoes ``apply`` with the same params."""

    def __call__(self, subject: Subject, params: P_contra, /) -> Subject: ...


class TransformFn(Protocol):
    """``transform(key, data) -> data``: what every transform is as a callable (``data``
    a ``Subject`` or an ``Image``; ``key`` may be omitted for deterministic transforms)."""

    def __call__(
        self, key: PRNGKey | Subject | Image | None, data: Subject | Image | None = None, /
    ) -> Any: ...


class MissingKeyError(TypeError, ValueError):
    """A transform that draws random numbers got no key (or not a key): raised by
    ``sample`` and by ``transform(subject)`` with the name of the transform, before
    anything reaches JAX. A ``TypeError`` and a ``ValueError`` alike, so that code catching
    either keeps working."""


def _guard_key(sample: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``sample`` method so that a missing or malformed key gives an error naming
    the transform, instead of JAX's "unexpected PRNG key type" from deep inside a draw."""

    @functools.wraps(sample)
    def guarded(self: Transform, key: PRNGKey | None, subject: Subject) -> Any:
        name = type(self).__name__
        if key is None:
            if self.is_random:
                raise MissingKeyError(
                    f"{name} is random and needs a JAX key, got None: call it as "
                    f"transform(key, subject) or {name}.sample(key, subject), with "
                    "key = jax.random.key(seed)"
                )
            try:
                return sample(self, key, subject)
            except TypeError as err:
                if isinstance(err, MissingKeyError) or "PRNG key" not in str(err):
                    raise
                raise MissingKeyError(
                    f"{name}.sample draws random numbers but {name}.is_random is False, so it "
                    f"was called without a key; set is_random = True in the class (or derive "
                    f"it from jmed.transforms.RandomTransform) and call it as transform(key, subject)"
                ) from err
        if not isinstance(key, (jax.Array, np.ndarray)):
            raise MissingKeyError(
                f"{name}: key must be a JAX key (jax.random.key(seed)), got {type(key).__name__} {key!r}"
            )
        return sample(self, key, subject)

    guarded.__jmed_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def _as_subject(data: Any) -> tuple[Subject, bool]:
    if isinstance(data, Subject):
        return data, False
    if isinstance(data, Image):
        return Subject(image=data), True
    raise TypeError(f"transforms take a jmed.Subject or jmed.Image, got {type(data).__name__}")


def _check_names(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    values = tuple(value) if isinstance(value, Iterable) else None
    if values is None or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be an image name or a sequence of names, got {value!r}")
    return values


class Transform(_values.Value, Generic[P]):
    """Base class of all transforms; ``P`` is the type of the params.

    Subclasses set ``is_random`` / ``invertible`` / ``kinds`` and implement ``sample``
    (random ones: or derive from ``RandomTransform``), and ``apply_image`` (same rule
    for every selected image) or ``apply`` (whole subject). Invertible ones implement
    ``inverse_image`` (per image; ``invertible`` is then set for them) or ``inverse``.

    ``sample`` is checked on every call: a random transform called with ``key=None``,
    or one that draws random numbers without declaring ``is_random``, raises a
    ``MissingKeyError`` (a ``TypeError``) naming the transform.

    ``padding_aware = True`` declares that the transform respects ``Image.extent``: on a
    volume padded to a bucket shape (``jmed.buckets``) its valid voxels come out as they
    would from the unpadded volume (within float rounding). Compositions are
    padding-aware when all their children are (``jmed.buckets.is_padding_aware``).

    Transforms are immutable values: attributes are set in ``__init__`` only (setting one
    later raises ``AttributeError``), and two transforms of the same class whose public
    attributes (names not starting with ``_``) are equal compare equal and hash alike,
    so equal configurations share compiled programs (``jax.jit`` static arguments) and
    cache entries. The ``repr`` is the same in every process (functions show their
    qualified name and a digest of their code). Subclasses keep everything that changes
    behaviour in public attributes; private ones hold what is derived from them.

    Args:
        include: names of the images to transform (others pass through unchanged).
        exclude: names of images to leave unchanged.
    """

    is_random: ClassVar[bool] = False
    invertible: ClassVar[bool] = False
    padding_aware: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = KINDS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        sample = cls.__dict__.get("sample")
        if sample is not None and not getattr(sample, "__jmed_guarded__", False):
            cls.sample = _guard_key(sample)
        if "inverse_image" in cls.__dict__ and "invertible" not in cls.__dict__:
            cls.invertible = True

    def __init__(
        self, *, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None
    ):
        self.include = _check_names(include, "include")
        self.exclude = _check_names(exclude, "exclude")
        if self.include and self.exclude:
            raise ValueError(
                f"give include or exclude, not both; got include={self.include!r}, exclude={self.exclude!r}"
            )

    # -- protocol ----------------------------------------------------------------------
    def __call__(self, key: PRNGKey | Subject | Image | None, data: Subject | Image | None = None, /) -> Any:
        """``transform(key, subject) -> subject`` (or an ``Image`` for an ``Image``);
        deterministic transforms also take ``transform(subject)``. The subject's history
        gets ``(self, params)``."""
        if data is None and isinstance(key, (Subject, Image)):
            key, data = None, key
        subject, single = _as_subject(data)
        if key is None and self.is_random:
            raise MissingKeyError(f"{type(self).__name__} is random: call it as transform(key, subject)")
        out, params = self.sample_and_apply(key, subject)
        if single:
            return out["image"]
        return out.replace(history=subject.history + ((self, params),))

    @property
    def sample_reads_subject(self) -> bool:
        """Whether ``sample`` reads the subject (shapes, affines or values): true for every
        transform that implements ``sample``, unless its class sets
        ``sample_reads_subject = False`` (params drawn from the key alone).
        ``Compose.sample`` brings the subject up to date (applies the earlier children)
        only for children that read it."""
        return type(self).sample is not Transform.sample

    def sample(self, key: PRNGKey | None, subject: Subject) -> P:
        """Draw this transform's parameters (a pytree of arrays) from ``key``.

        Deterministic transforms return ``None`` (or params computed from the subject,
        such as a crop window)."""
        return None  # type: ignore[return-value]

    def apply(self, subject: Subject, params: P) -> Subject:
        """Apply with given parameters: by default ``apply_image`` on each selected image."""
        return subject.replace({n: self.apply_image(subject[n], params) for n in self.selected(subject)})

    def apply_image(self, image: Image, params: P) -> Image:
        """The rule applied to each selected image (the default ``apply`` calls it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply or apply_image")

    def inverse(self, subject: Subject, params: P) -> Subject:
        """Undo ``apply(subject, params)``: by default ``inverse_image`` on each selected
        image.

        Raises:
            TypeError: the transform is not invertible.
        """
        if type(self).inverse_image is Transform.inverse_image:
            raise TypeError(f"{type(self).__name__} is not invertible")
        return subject.replace({n: self.inverse_image(subject[n], params) for n in self.selected(subject)})

    def inverse_image(self, image: Image, params: P) -> Image:
        """The inverse of ``apply_image`` for one image; implementing it makes the
        transform invertible (the default ``inverse`` applies it to each selected image)."""
        raise TypeError(f"{type(self).__name__} is not invertible")

    def sample_and_apply(self, key: PRNGKey | None, subject: Subject) -> tuple[Subject, P]:
        """``(apply(subject, params), params)`` with ``params = sample(key, subject)``."""
        params = self.sample(key, subject)
        return self.apply(subject, params), params

    # -- helpers -----------------------------------------------------------------------
    def selected(self, subject: Subject) -> list[str]:
        """Names of the images this transform acts on (kind, include, exclude)."""
        for field in (self.include or ()) + (self.exclude or ()):
            if field not in subject:
                raise KeyError(
                    f"{type(self).__name__}: image {field!r} named in include/exclude is not "
                    f"in the subject; images: {list(subject)}"
                )
        names = [n for n, im in subject.items() if im.kind in self.kinds]
        if self.include is not None:
            names = [n for n in names if n in self.include]
        if self.exclude is not None:
            names = [n for n in names if n not in self.exclude]
        return names

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_") and v is not None}
        inner = ", ".join(f"{k}={_values.display(v)}" for k, v in fields.items())
        return f"{type(self).__name__}({inner})"


class RandomTransform(Transform[P]):
    """Base class of transforms that draw their params from a key.

    Subclasses implement ``sample(key, subject) -> P`` (drawing with ``key`` only: no
    global random state) and ``apply_image`` or ``apply``. Calling one without a key
    raises a ``MissingKeyError`` naming it.
    """

    is_random: ClassVar[bool] = True

    def sample(self, key: PRNGKey | None, subject: Subject) -> P:
        raise NotImplementedError(f"{type(self).__name__} must implement sample(key, subject)")


class IntensityTransform(Transform[P]):
    """A transform that acts on intensity images only (label maps pass through)."""

    kinds = (INTENSITY,)


def _split(key: PRNGKey | None, n: int) -> list[PRNGKey | None]:
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def _concrete_int(x: Any) -> int | None:
    if _params.is_traced(x):
        return None
    return int(np.asarray(x))


def _choose(index: Any, options: Sequence[Any]) -> jax.Array:
    """``options[index]`` for a few same-shaped arrays and a traced integer ``index`` in
    range, as elementwise selects (exact). Indexing a stacked table with a batched index
    is a gather, which has no sharding rule for a batch sharded over an explicit mesh
    axis; selects shard with the index."""
    index = jnp.asarray(index)
    out = jnp.asarray(options[0])
    for k, option in enumerate(options[1:], 1):
        out = jnp.where(index == k, option, out)
    return out


def _promoted_dtypes(branches: Sequence[Callable[[Any], Any]], operand: Any) -> Any:
    """Per output leaf, the promotion of the dtypes that all ``branches`` give, or None
    when the branches cannot be traced (eager-only transforms) or differ in structure."""
    try:
        shapes = [jax.eval_shape(b, operand) for b in branches]
    except (jax.errors.JAXTypeError, jax.errors.ConcretizationTypeError, TypeError, ValueError):
        return None
    if len({jax.tree.structure(s) for s in shapes}) > 1:
        return None
    return jax.tree.map(lambda *leaves: jnp.result_type(*leaves), *shapes)


def _cast_to(tree: Any, dtypes: Any) -> Any:
    """Cast the data of every image in ``tree`` to the dtype of its twin in ``dtypes`` (the
    tree of promoted dtypes); affines stay float64 on the host."""

    def cast(a, d):
        if not isinstance(a, Image):
            return a
        dtype = np.dtype(d.data)  # the promoted dtype stands where the data was
        if a.data.dtype == dtype:
            return a
        data = a.data
        return a.replace(
            data=np.asarray(data).astype(dtype) if isinstance(data, np.ndarray) else data.astype(dtype)
        )

    return jax.tree.map(cast, tree, dtypes, is_leaf=lambda x: isinstance(x, Image))


def _switch(
    index: Any, branches: Sequence[Callable[[Subject, Params], Subject]], subject: Subject, params: Params
) -> Any:
    """``branches[index](subject, params)`` with outputs promoted to the alternatives'
    common dtypes.

    One rule eagerly and under ``jit``: each output leaf has the promotion of the dtypes
    every branch gives it (``RandomApply(RandomNoise())`` on a uint8 image gives float32
    whether or not the noise is drawn). A Python call when ``index`` is concrete (branches
    that cannot be traced then keep their own dtypes), else ``lax.switch``.

    Under ``lax.switch`` the arrays of ``subject`` and ``params`` are operands of jitted
    branches, not values they close over (other leaves stay static): batching a switch
    whose branches close over batched values and hold array constants fails for a batch
    sharded over an explicit mesh axis, in ``vmap`` and inside ``shard_map``, while a
    jitted branch batches its own body.
    """
    i = _concrete_int(index)
    if i is not None:
        out = branches[i](subject, params)
        if len(branches) == 1:
            return out
        dtypes = _promoted_dtypes([lambda s, b=b: b(s, params) for b in branches], subject)
        if dtypes is None or jax.tree.structure(out) != jax.tree.structure(dtypes):
            return out
        return _cast_to(out, dtypes)
    leaves, tree = jax.tree.flatten((subject, params))
    dynamic = [isinstance(leaf, jax.Array) for leaf in leaves]
    arrays = [leaf for leaf, d in zip(leaves, dynamic) if d]

    def rebuild(values):
        values = iter(values)
        return jax.tree.unflatten(tree, [next(values) if d else leaf for leaf, d in zip(leaves, dynamic)])

    def call(branch):
        return lambda values: branch(*rebuild(values))

    shapes = [jax.eval_shape(call(b), arrays) for b in branches]
    structs = {jax.tree.structure(s) for s in shapes}
    if len(structs) > 1:
        raise ValueError("the alternatives of a random choice must return the same structure under jit")
    leaf_shapes = [tuple(tuple(leaf.shape) for leaf in jax.tree.leaves(s)) for s in shapes]
    if len(set(leaf_shapes)) > 1:
        described = "; ".join(f"alternative {i}: {sorted(set(x))}" for i, x in enumerate(leaf_shapes))
        raise ValueError(
            "the alternatives of a random choice must return arrays of the same shapes under jit "
            f"(got {described}); make their output shapes agree (e.g. a CropOrPad after each) or "
            "call the transform eagerly"
        )
    dtypes = jax.tree.map(lambda *leaves: jnp.result_type(*leaves), *shapes)

    def cast(branch):
        run = call(branch)
        return jax.jit(
            lambda values: jax.tree.map(lambda a, d: jnp.asarray(a).astype(d), run(values), dtypes)
        )

    return jax.lax.switch(jnp.asarray(index, jnp.int32), [cast(b) for b in branches], arrays)


def _check_transforms(transforms: Any, name: str) -> tuple[Transform, ...]:
    if isinstance(transforms, Transform):
        raise TypeError(f"{name} takes a sequence of transforms, got a single {type(transforms).__name__}")
    out = tuple(transforms)
    if not out:
        raise ValueError(f"{name} needs at least one transform")
    for t in out:
        if not isinstance(t, Transform):
            raise TypeError(f"{name} items must be jmed transforms, got {type(t).__name__}")
    return out


def _fused_stages(transforms: tuple[Transform, ...]) -> list[tuple[Transform | None, int, int]]:
    """Runs ``[start, stop)`` of consecutive transforms with ``fusable = True`` and a
    ``fuse`` classmethod (spatial transforms) acting on the same images, as
    ``(fused_or_None, start, stop)``."""
    stages, i = [], 0
    while i < len(transforms):
        j = i
        same_images = (transforms[i].include, transforms[i].exclude)
        while (
            j < len(transforms)
            and getattr(transforms[j], "fusable", False)
            and (transforms[j].include, transforms[j].exclude) == same_images
        ):
            j += 1
        if j - i >= 2:
            stages.append((type(transforms[i]).fuse(transforms[i:j]), i, j))
            i = j
        else:
            stages.append((None, i, i + 1))
            i += 1
    return stages


_NOT_INVERTIBLE = "{name} is not invertible; skipped when inverting"


class Compose(Transform):
    """Apply transforms in order; the key is split once per child.

    Params are the tuple of the children's params. ``inverse`` undoes the invertible
    children in reverse order and skips the others with a warning (as TorchIO does), so a
    pipeline of spatial and intensity steps inverts its geometry.

    Args:
        transforms: the transforms.
        fuse: apply each run of consecutive spatial transforms (flip, affine, elastic,
            ...) as one mapping with one interpolation (same params, same geometry, less
            blur and time). ``fuse=False`` resamples after every spatial transform.
    """

    padding_aware = True

    def __init__(self, transforms: Sequence[Transform], *, fuse: bool = True):
        super().__init__()
        self.transforms = _check_transforms(transforms, "Compose")
        self.is_random = any(t.is_random for t in self.transforms)
        self.invertible = any(t.invertible for t in self.transforms)
        self.fuse = bool(fuse)
        self._stages = _fused_stages(self.transforms) if self.fuse else None

    def sample_and_apply(self, key: PRNGKey | None, subject: Subject) -> tuple[Subject, Params]:
        keys = _split(key, len(self.transforms))
        if self._stages is None:
            params = []
            for t, k in zip(self.transforms, keys):
                subject, p = t.sample_and_apply(k, subject)
                params.append(p)
            return subject, tuple(params)
        params = []
        for fused, start, stop in self._stages:
            if fused is None:
                subject, p = self.transforms[start].sample_and_apply(keys[start], subject)
                params.append(p)
            else:
                run = tuple(
                    t.sample(k, subject) for t, k in zip(self.transforms[start:stop], keys[start:stop])
                )
                subject = fused.apply(subject, run)
                params.extend(run)
        return subject, tuple(params)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        """The children's params, as ``Compose(...)(key, subject)`` records them.

        Each child samples from its own key. A child whose ``sample`` reads the subject
        (``sample_reads_subject``: crop windows, swap locations, label counts, anatomical
        flip axes) sees the subject as the earlier children leave it, so its params can
        depend on their outputs: the earlier children are applied for it, and only up
        to the last child that reads the subject. Children whose params ignore the
        subject (most augmentations) cost no application, so a pipeline of them is
        sampled without touching the images."""
        keys = _split(key, len(self.transforms))
        readers = [i for i, t in enumerate(self.transforms) if t.sample_reads_subject]
        last_reader = readers[-1] if readers else -1
        stages = self._stages or [(None, i, i + 1) for i in range(len(self.transforms))]
        params = []
        for fused, start, stop in stages:
            # as in sample_and_apply: a fused run samples on the subject it starts from
            run = [t.sample(k, subject) for t, k in zip(self.transforms[start:stop], keys[start:stop])]
            params.extend(run)
            if stop - 1 < last_reader:
                step = self.transforms[start] if fused is None else fused
                subject = step.apply(subject, run[0] if fused is None else tuple(run))
        return tuple(params)

    @property
    def sample_reads_subject(self) -> bool:  # type: ignore[override]
        return any(t.sample_reads_subject for t in self.transforms)

    def apply(self, subject: Subject, params: Params) -> Subject:
        if self._stages is None:
            for t, p in zip(self.transforms, params):
                subject = t.apply(subject, p)
            return subject
        for fused, start, stop in self._stages:
            if fused is None:
                subject = self.transforms[start].apply(subject, params[start])
            else:
                subject = fused.apply(subject, tuple(params[start:stop]))
        return subject

    def inverse(self, subject: Subject, params: Params) -> Subject:
        stages = self._stages or [(None, i, i + 1) for i in range(len(self.transforms))]
        for fused, start, stop in reversed(stages):
            step = self.transforms[start] if fused is None else fused
            if not step.invertible:
                warnings.warn(_NOT_INVERTIBLE.format(name=type(step).__name__), stacklevel=2)
            elif fused is None:
                subject = step.inverse(subject, params[start])
            else:
                subject = step.inverse(subject, tuple(params[start:stop]))
        return subject

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]


def _weights(probabilities: Any, n: int, name: str) -> np.ndarray:
    if probabilities is None:
        return np.full(n, 1.0 / n)
    p = np.asarray(probabilities, dtype=float)
    if p.shape != (n,) or np.any(p < 0) or not np.all(np.isfinite(p)) or p.sum() <= 0:
        raise ValueError(
            f"{name} must be {n} non-negative weights with a positive sum, got {probabilities!r}"
        )
    return p / p.sum()


class OneOf(RandomTransform):
    """Apply one transform chosen at random (weighted).

    Args:
        transforms: a sequence of transforms, or a mapping ``{transform: weight}`` as in
            TorchIO.
        probabilities: weights (normalised to sum 1); uniform by default.

    Params: ``(index, children_params)``; every child's params are drawn (so the
    structure is static under ``jit``) and only the chosen child is applied.
    """

    padding_aware = True

    def __init__(
        self,
        transforms: Sequence[Transform] | Mapping[Transform, float],
        *,
        probabilities: Sequence[float] | None = None,
    ):
        super().__init__()
        if isinstance(transforms, Mapping):
            if probabilities is not None:
                raise ValueError(
                    "give weights either in the mapping or in probabilities, not both; "
                    f"got a mapping and probabilities={probabilities!r}"
                )
            transforms, probabilities = list(transforms), list(transforms.values())
        self.transforms = _check_transforms(transforms, "OneOf")
        self.probabilities = _weights(probabilities, len(self.transforms), "probabilities")
        self.invertible = all(t.invertible for t in self.transforms)

    @property
    def sample_reads_subject(self) -> bool:  # type: ignore[override]
        return any(t.sample_reads_subject for t in self.transforms)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        k_choice, *keys = _split(key, len(self.transforms) + 1)
        # the draw of ``jax.random.choice(k_choice, n, p=probabilities)``, with the
        # search written as a count: its scan has no rule for explicitly sharded batches
        cumulative = jnp.cumsum(jnp.asarray(self.probabilities, jnp.float32))
        r = cumulative[-1] * (1 - jax.random.uniform(k_choice, (), jnp.float32))
        index = jnp.sum(cumulative < r, dtype=jnp.int32)
        return index, tuple(t.sample(k, subject) for t, k in zip(self.transforms, keys))

    def apply(self, subject: Subject, params: Params) -> Subject:
        index, child = params
        branches = [lambda s, c, t=t, k=k: t.apply(s, c[k]) for k, t in enumerate(self.transforms)]
        return _switch(index, branches, subject, child)

    def inverse(self, subject: Subject, params: Params) -> Subject:
        index, child = params
        branches = [lambda s, c, t=t, k=k: t.inverse(s, c[k]) for k, t in enumerate(self.transforms)]
        return _switch(index, branches, subject, child)


class RandomApply(RandomTransform):
    """Apply ``transform`` with probability ``p``.

    Params: ``(applied, child_params)`` with ``applied`` a boolean array.
    """

    padding_aware = True

    def __init__(self, transform: Transform, *, p: float = 0.5):
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError(f"transform must be a jmed transform, got {type(transform).__name__}")
        self.transform = transform
        self.p = _params.check_probability(p, "p")
        self.invertible = transform.invertible

    @property
    def sample_reads_subject(self) -> bool:  # type: ignore[override]
        return self.transform.sample_reads_subject

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        k_apply, k_child = _split(key, 2)
        return jax.random.bernoulli(k_apply, self.p), self.transform.sample(k_child, subject)

    def apply(self, subject: Subject, params: Params) -> Subject:
        applied, child = params
        return _switch(applied, [lambda s, c: s, self.transform.apply], subject, child)

    def inverse(self, subject: Subject, params: Params) -> Subject:
        applied, child = params
        return _switch(applied, [lambda s, c: s, self.transform.inverse], subject, child)


class SomeOf(RandomTransform):
    """Apply a random subset of the transforms, in the order given.

    Args:
        transforms: the candidates.
        num_transforms: how many to apply: an int, or ``(low, high)`` inclusive, drawn
            uniformly. Defaults to ``(1, len(transforms))``.

    Params: ``(mask, children_params)``; ``mask[i]`` says whether child ``i`` applies.
    """

    padding_aware = True

    def __init__(
        self, transforms: Sequence[Transform], *, num_transforms: int | tuple[int, int] | None = None
    ):
        super().__init__()
        self.transforms = _check_transforms(transforms, "SomeOf")
        n = len(self.transforms)
        if num_transforms is None:
            num_transforms = (1, n)
        if isinstance(num_transforms, (int, np.integer)) and not isinstance(num_transforms, bool):
            num_transforms = (int(num_transforms), int(num_transforms))
        try:
            lo, hi = (int(v) for v in num_transforms)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"num_transforms must be an int or a (low, high) pair of ints, got {num_transforms!r}"
            ) from None
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"num_transforms must be in [0, {n}] with low <= high, got {num_transforms!r}")
        self.num_transforms = (lo, hi)
        self.invertible = all(t.invertible for t in self.transforms)

    @property
    def sample_reads_subject(self) -> bool:  # type: ignore[override]
        return any(t.sample_reads_subject for t in self.transforms)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        k_count, k_perm, *keys = _split(key, len(self.transforms) + 2)
        lo, hi = self.num_transforms
        count = jax.random.randint(k_count, (), lo, hi + 1)
        rank = jnp.argsort(jax.random.permutation(k_perm, len(self.transforms)))
        mask = rank < count
        return mask, tuple(t.sample(k, subject) for t, k in zip(self.transforms, keys))

    def apply(self, subject: Subject, params: Params) -> Subject:
        mask, child = params
        for i, (t, p) in enumerate(zip(self.transforms, child)):
            subject = _switch(mask[i], [lambda s, c: s, t.apply], subject, p)
        return subject

    def inverse(self, subject: Subject, params: Params) -> Subject:
        mask, child = params
        for i, (t, p) in reversed(list(enumerate(zip(self.transforms, child)))):
            subject = _switch(mask[i], [lambda s, c: s, t.inverse], subject, p)
        return subject


class Lambda(Transform):
    """Apply ``function(data) -> data`` to the selected images (deterministic).

    Args:
        function: maps a channels-last array to a new array (must be jittable to be used
            under ``jit``).
        kinds: image kinds to apply to; both by default.
    """

    def __init__(
        self,
        function: Callable[[jax.Array], jax.Array],
        *,
        kinds: Sequence[str] = KINDS,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        if not callable(function):
            raise TypeError(f"function must be callable, got {function!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        for k in kinds:
            _params.check_choice(k, "kinds", KINDS)
        self.function = function
        self.kinds = kinds

    def apply_image(self, image: Image, params: Params) -> Image:
        return image.replace(data=self.function(image.data))


def transform_key(transform: Any) -> str:
    """Text that identifies ``transform``'s configuration in every process and run.

    Built from the type and the canonical form of the public attributes (see
    ``Transform``): arrays enter by a digest of their bytes, functions by their module,
    qualified name and a digest of their code, closure, defaults and the module globals
    they read. Equal transforms have equal keys; a changed function body or closure value
    changes the key. Used to key caches that outlive a process (the decoded-volume cache
    of ``jmed.SubjectsSource``). Also takes a plain function or ``None``.

    Raises:
        ValueError: part of the configuration has no identity that holds across processes
            (a closure over an object of an arbitrary class, a traced value); the message
            names the transform and the part.

    Examples:
        >>> import jmed.transforms as T
        >>> transform_key(T.Clamp(out_min=0.0)) == transform_key(T.Clamp(out_min=0.0))
        True
    """
    return _values.stable_key(transform)


def replay(subject: Subject | Image, history: Sequence[tuple[Transform, Params]]) -> Subject | Image:
    """Apply recorded ``(transform, params)`` steps (e.g. ``other.history``) to ``subject``.

    The same augmentation can so be applied to another image or subject, as TorchIO's
    history replay. Replayed steps are appended to the history of a ``Subject``.
    """
    target, single = _as_subject(subject)
    steps = tuple(history)
    for i, step in enumerate(steps):
        if not (isinstance(step, (tuple, list)) and len(step) == 2 and isinstance(step[0], Transform)):
            raise TypeError(f"history[{i}] must be a (transform, params) pair, got {step!r}")
    for t, p in steps:
        target = t.apply(target, p)
    if single:
        return target["image"]
    return target.replace(history=target.history + steps)


def invert(subject: Subject, *, warn: bool = True) -> Subject:
    """Undo the invertible steps of ``subject.history`` (last first).

    Non-invertible steps (intensity changes, say) are skipped, with a warning unless
    ``warn=False``. The result has an empty history.
    """
    if not isinstance(subject, Subject):
        raise TypeError(f"invert takes a Subject with a history, got {type(subject).__name__}")
    out = subject
    with warnings.catch_warnings():
        if not warn:  # nested steps (a Compose's children) warn from their own inverse
            warnings.filterwarnings("ignore", message=_NOT_INVERTIBLE.format(name=".*"))
        for t, p in reversed(subject.history):
            if t.invertible:
                out = t.inverse(out, p)
            elif warn:
                warnings.warn(_NOT_INVERTIBLE.format(name=type(t).__name__), stacklevel=2)
    return out.replace(history=())
