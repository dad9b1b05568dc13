"""Geometry at full float32 precision on every platform.

The default precision of a float32 matrix product depends on the platform: one bfloat16
pass on TPUs (operands rounded to 8 significant bits), TF32 on recent GPUs, float32 on
CPU. Coordinates, affine compositions, B-spline and bias fields and k-space products
must not depend on it, so jmed requests ``jax.lax.Precision.HIGHEST`` explicitly.

CI has no accelerator, so two CPU checks stand in for one:

- the jaxpr of every public transform (and of the kernels and compositions behind
  them) is searched, nested programs included, for float matrix products (and
  convolutions) that do not request HIGHEST on both operands;
- bfloat16 operand rounding is emulated by re-running a program's jaxpr with the
  operands of such products rounded to bfloat16 (what a TPU's default does), which leaves
  the voxel coordinates of the spatial transforms unchanged, whereas the same rounding
  applied to every product (what the default precision would give) moves them by tenths
  of a voxel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Literal
from test_properties import CASES, transform_names

import jmed
import jmed.transforms as T
from jmed import affine as affine_lib
from jmed import buckets
from jmed.ops import bspline, filters, interpolation, kspace

# small test volumes make the default elastic displacements large for their control grid
pytestmark = pytest.mark.filterwarnings("ignore:max_displacement:RuntimeWarning")

HIGHEST = jax.lax.Precision.HIGHEST
PRODUCTS = ("dot_general", "conv_general_dilated")


# --- the inspector ---------------------------------------------------------------------


def _sub_jaxprs(value):
    """Jaxprs held by an equation parameter: jit, scan, cond branches, while, custom_jvp /
    custom_vjp, closed_call, custom_linear_solve (closed jaxprs, in tuples for some) and
    shard_map, remat (open jaxprs)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _is_highest(precision) -> bool:
    if isinstance(precision, (tuple, list)):
        return len(precision) == 2 and all(p == HIGHEST for p in precision)
    return precision == HIGHEST


def _is_float_product(eqn) -> bool:
    return eqn.primitive.name in PRODUCTS and any(
        jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.invars
    )


def _where(eqn) -> str:
    """The innermost jmed source line of an equation, when the traceback has one."""
    try:
        frames = eqn.source_info.traceback.frames
    except AttributeError:
        return "?"
    for frame in frames:
        if "/jmed/" in frame.file_name.replace("\\", "/"):
            return f"{frame.file_name.rsplit('jmed', 1)[-1]}:{frame.line_num}"
    return "?"


def reduced_precision_products(jaxpr) -> list[str]:
    """Float ``dot_general``/``conv_general_dilated`` equations of ``jaxpr`` and of every
    jaxpr nested in it whose precision is not HIGHEST on both operands (integer products
    are exact whatever the precision and are not reported)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if _is_float_product(eqn) and not _is_highest(eqn.params.get("precision")):
            dtypes = ",".join(str(v.aval.dtype) for v in eqn.invars)
            found.append(
                f"{eqn.primitive.name}({dtypes}) precision={eqn.params.get('precision')} at {_where(eqn)}"
            )
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found.extend(reduced_precision_products(sub))
    return found


def _all_eqns(jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from _all_eqns(sub)


def _check(jaxpr, what):
    found = reduced_precision_products(jaxpr)
    assert not found, f"{what}: float products without HIGHEST precision:\n" + "\n".join(found)


F32 = np.ones((4, 4), np.float32)


def _default_product(a, b):
    return a @ b


def _highest_product(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


@jax.custom_jvp
def _custom_jvp_product(a, b):
    return a @ b


_custom_jvp_product.defjvp(lambda primals, tangents: (_custom_jvp_product(*primals), tangents[0]))


@jax.custom_vjp
def _custom_vjp_product(a, b):
    return a @ b


_custom_vjp_product.defvjp(lambda a, b: (a @ b, None), lambda _, g: (g, g))


def _nested_variants(product):
    """``product`` of two (4, 4) matrices wrapped in each kind of nested program."""
    mesh = jax.make_mesh((1,), ("d",), devices=jax.devices()[:1])
    spec = jax.sharding.PartitionSpec()
    return {
        "plain": product,
        "jit": jax.jit(product),
        "scan": lambda a, b: jax.lax.scan(lambda c, _: (product(c, b), None), a, None, length=2)[0],
        "cond": lambda a, b: jax.lax.cond(a[0, 0] > 0, product, lambda x, y: x + y, a, b),
        "switch": lambda a, b: jax.lax.switch(a[0, 0].astype(jnp.int32), [lambda x, y: x, product], a, b),
        "while": lambda a, b: jax.lax.fori_loop(0, jnp.int32(a[0, 0]), lambda i, c: product(c, b), a),
        "checkpoint": jax.checkpoint(product),
        "shard_map": jax.shard_map(product, mesh=mesh, in_specs=(spec, spec), out_specs=spec),
        "vmap": lambda a, b: jax.vmap(product)(a[None], b[None])[0],
    }


@pytest.mark.parametrize("kind", list(_nested_variants(_default_product)))
def test_inspector_finds_default_precision_products_nested(kind):
    default = _nested_variants(_default_product)[kind]
    found = reduced_precision_products(jax.make_jaxpr(default)(F32, F32))
    assert found and all("dot_general(float32,float32)" in f for f in found), found
    highest = _nested_variants(_highest_product)[kind]
    assert reduced_precision_products(jax.make_jaxpr(highest)(F32, F32)) == []


def test_inspector_cases():
    def found(fn, *args):
        return reduced_precision_products(jax.make_jaxpr(fn)(*args))

    assert found(_custom_jvp_product, F32, F32)
    assert found(_custom_vjp_product, F32, F32)
    bf16 = F32.astype(jnp.bfloat16)
    assert found(_default_product, bf16, bf16)
    assert found(_default_product, F32.astype(np.float16), F32.astype(np.float16))
    # one operand at HIGHEST is not enough
    assert found(lambda a, b: jnp.matmul(a, b, precision=(HIGHEST, jax.lax.Precision.DEFAULT)), F32, F32)
    assert found(lambda a, b: jnp.einsum("ij,jk->ik", a, b, precision="high"), F32, F32)
    assert found(
        lambda x, k: jax.lax.conv(x, k, (1,), "SAME"),
        np.ones((1, 1, 8), np.float32),
        np.ones((1, 1, 3), np.float32),
    )
    assert not found(lambda a, b: jnp.einsum("ij,jk->ik", a, b, precision="highest"), F32, F32)
    # integer products are exact: not reported
    ints = np.ones((4, 4), np.int32)
    assert not found(_default_product, ints, ints)
    assert not found(lambda a: jnp.linalg.inv(a), F32 + np.eye(4, dtype=np.float32))
    # the library's linear solves request HIGHEST themselves
    assert not found(lambda a: jnp.linalg.solve(a, a), F32 + np.eye(4, dtype=np.float32))


def test_explicit_precision_survives_a_bfloat16_default():
    """An explicit HIGHEST is kept when the process asks for bfloat16 products by default,
    while a product without a request takes that default (the jaxpr records it)."""
    with jax.default_matmul_precision("bfloat16"):
        assert reduced_precision_products(jax.make_jaxpr(_default_product)(F32, F32))
        assert not reduced_precision_products(jax.make_jaxpr(_highest_product)(F32, F32))
        chain = T.Compose([T.RandomFlip(axes=(0, 1, 2)), T.RandomAffine(), T.RandomElasticDeformation()])
        jaxpr = jax.make_jaxpr(lambda k, s: _outputs(chain(k, s)))(jax.random.key(0), _subject())
        _check(jaxpr, "fused chain under a bfloat16 default")


# --- every transform ---------------------------------------------------------------------


def _oblique_affine(spacing=(1.2, 0.9, 1.5)):
    angle = np.deg2rad(20.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = (-30.0, 12.0, -8.5)
    return affine


def _subject(shape=(12, 12, 10), seed=0):
    """A small float32 T1 and uint8 label map on an oblique grid (equal first two sizes
    for RandomRot90)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.sqrt((grid**2).sum(-1))
    labels = (radius < 0.9).astype(np.uint8) + (radius < 0.5)
    t1 = (labels * 80.0 + 10.0 * rng.standard_normal(shape) + 20.0).astype(np.float32)
    affine = _oblique_affine()
    return jmed.Subject(t1=jmed.ScalarImage(t1, affine), seg=jmed.LabelMap(labels, affine))


def _outputs(subject):
    return [(image.data, image.affine) for image in subject.values()]


def _with_data(subject, data):
    return subject.replace({n: subject[n].replace(data=d) for n, d in zip(subject, data)})


def _jaxprs(transform, subject, key):
    """Jaxprs of ``transform(key, subject)`` traced in the ways it allows: the whole
    subject traced (jittable transforms), only the voxels traced (transforms that need a
    concrete affine), the subject concrete and the key traced (device programs of
    transforms that read concrete values are still staged), and the params drawn eagerly
    with the voxels traced in ``apply`` (transforms whose params need concrete voxels).
    A way may refuse to trace with a TypeError or ValueError; one at least must trace."""
    data = [image.data for image in subject.values()]
    ways = {
        "traced subject": lambda: jax.make_jaxpr(lambda k, s: _outputs(transform(k, s)))(key, subject),
        "traced voxels": lambda: jax.make_jaxpr(lambda k, d: _outputs(transform(k, _with_data(subject, d))))(
            key, data
        ),
        "concrete subject": lambda: jax.make_jaxpr(lambda k: _outputs(transform(k, subject)))(key),
        "eager params": lambda: jax.make_jaxpr(
            lambda d, p: _outputs(transform.apply(_with_data(subject, d), p))
        )(data, transform.sample(key, subject)),
    }
    out, refused = {}, {}
    for how, trace in ways.items():
        try:
            out[how] = trace()
        except (TypeError, ValueError) as e:
            refused[how] = e
    assert out, f"{transform!r} traces in no way: {refused}"
    return out


def _build(name, subject):
    if name == "Resample":
        # an oblique target grid with another spacing: a general voxel-to-voxel matrix
        target = _oblique_affine((1.0, 1.1, 1.3)) @ affine_lib.from_spacing((1, 1, 1), (0.7, -0.4, 1.1))
        return T.Resample(((10, 11, 9), target))
    return CASES[name][0](subject.spatial_shape)


def _concrete_names():
    return [name for name in transform_names() if CASES.get(name, ...) is not None]


@pytest.mark.parametrize("name", _concrete_names())
def test_every_transform_requests_highest_precision(name):
    assert name in CASES, f"public transform {name} has no case in test_properties.CASES"
    subject = _subject()
    transform = _build(name, subject)
    for how, jaxpr in _jaxprs(transform, subject, jax.random.key(1)).items():
        _check(jaxpr, f"{name} ({how})")


def test_the_transform_list_is_complete():
    covered = set(_concrete_names()) | {name for name, case in CASES.items() if case is None}
    assert covered == set(transform_names())
    assert len(_concrete_names()) > 40


EXTRA = {
    # the einsum branch of add_spikes (more than 16 spikes)
    "RandomSpike(many)": lambda: T.RandomSpike(num_spikes=(20, 24)),
    "RandomGhosting(axis 0)": lambda: T.RandomGhosting(axes=0, num_ghosts=(2, 12)),
    "RandomMotion(5)": lambda: T.RandomMotion(num_transforms=5),
    "RandomBiasField(order 4)": lambda: T.RandomBiasField(order=4),
    "RandomBlur(wide)": lambda: T.RandomBlur(std=(30.0, 40.0)),
    "fused flip+affine+elastic": lambda: T.Compose(
        [T.RandomFlip(axes=(0, 1, 2)), T.RandomAffine(degrees=20), T.RandomElasticDeformation()]
    ),
    # an earlier field resampled at the later mapping's points, then a second field
    "fused elastic+affine+elastic": lambda: T.Compose(
        [T.RandomElasticDeformation(), T.RandomAffine(), T.RandomElasticDeformation(num_control_points=5)]
    ),
    "Spatial(output grid, elastic)": lambda: T.Spatial(
        [T.RandomAffine(), T.RandomElasticDeformation()], output_shape=(9, 8, 7), output_spacing=1.7
    ),
    "RandomAffine(partial_volume, mean)": lambda: T.RandomAffine(
        label_interpolation="partial_volume", default_pad_value="mean"
    ),
    "RandomAffine(otsu)": lambda: T.RandomAffine(default_pad_value="otsu", center="origin"),
    "nnunet_augmentation": lambda: T.nnunet_augmentation(),
    "nnunet_intensity_augmentation": lambda: T.nnunet_intensity_augmentation(),
    "torchio_paper_augmentation": lambda: T.torchio_paper_augmentation(),
}


@pytest.mark.parametrize("name", list(EXTRA))
def test_compositions_and_variants_request_highest_precision(name):
    subject = _subject()
    transform = EXTRA[name]()
    for how, jaxpr in _jaxprs(transform, subject, jax.random.key(2)).items():
        _check(jaxpr, f"{name} ({how})")


@pytest.mark.parametrize("name", [n for n in _concrete_names() if n != "Resample"] + list(EXTRA))
def test_padded_volumes_request_highest_precision(name):
    transform = EXTRA[name]() if name in EXTRA else _build(name, _subject())
    if not buckets.is_padding_aware(transform):
        pytest.skip(f"{name} is not padding-aware")
    padded = buckets.pad_subject(_subject(), (14, 14, 12))
    try:
        jaxpr = jax.make_jaxpr(lambda k, s: _outputs(transform(k, s)))(jax.random.key(3), padded)
    except TypeError as err:
        # the connected-component transforms refuse tracing (they run eagerly, on the host)
        assert "eager" in str(err), err
        return
    _check(jaxpr, f"{name} on a padded volume")


def test_inverses_request_highest_precision():
    chain = T.Compose([T.RandomFlip(), T.RandomAffine(), T.RandomElasticDeformation(), T.RandomBiasField()])

    def round_trip(key, subject):
        return _outputs(T.invert(chain(key, subject), warn=False))

    _check(jax.make_jaxpr(round_trip)(jax.random.key(4), _subject()), "inverse of a fused chain")


def test_kernels_and_geometry_request_highest_precision():
    subject = _subject()
    data = subject["t1"].data
    affine = jnp.asarray(subject["t1"].affine, jnp.float32)
    control = np.random.default_rng(0).standard_normal((5, 6, 7, 3)).astype(np.float32)
    shape = data.shape[:3]
    weights = tuple(bspline.bspline_weights(s, n) for s, n in zip(shape, control.shape[:3]))

    def kernels(data, affine, control, matrix, extent):
        field = bspline.separable_field(control, weights)
        dense = bspline.upsample(control, shape)
        mean = interpolation.pad_value_for(data, "mean", extent)
        return [
            interpolation.resample(
                data, matrix, shape, displacement=field, displacement_matrix=affine[:3, :3]
            ),
            interpolation.resample(data, matrix, shape, displacement=dense, pad_value=mean, extent=extent),
            interpolation.resample(subject["seg"].data, matrix, shape, order="partial_volume"),
            field.dense(),
            kspace.attenuate_planes(data, jnp.arange(3), jnp.full(3, 0.5), 1),
            kspace.add_spikes(data, jnp.ones((20, 3), jnp.int32), jnp.ones(20)),
            kspace.splice_lines([data, 2 * data], jnp.arange(shape[2]) % 2, 2),
            filters.gaussian_blur(data, jnp.asarray(2.0)),
            affine_lib.voxel_to_world(affine, jnp.ones((5, 3))),
            affine_lib.world_to_voxel(affine, jnp.ones((5, 3))),
            affine_lib.compose(affine, matrix, affine),
            affine_lib.translate_voxels(affine, jnp.ones(3)),
            T.affine_mapping(jnp.ones(3), jnp.ones(3), jnp.ones(3), shape, affine).matrix,
        ]

    matrix = jnp.eye(4).at[:3, 3].set(0.5)
    jaxpr = jax.make_jaxpr(kernels)(data, affine, control, matrix, jnp.asarray(shape, jnp.int32))
    _check(jaxpr, "kernels")
    # a concrete sigma beyond radius 24 (eager blurs) filters by a banded matrix product
    for size in (None, jnp.int32(10)):
        static = dict(radius=120, axis=1, mode="reflect", truncate=4.0, cval=0.0, size=size)
        traced = filters._filter_static.trace(data, jnp.float32(30.0), **static)
        assert any(e.primitive.name == "dot_general" for e in _all_eqns(traced.jaxpr))
        _check(traced.jaxpr, f"banded blur (size {size})")


def test_mappings_and_their_composition_request_highest_precision():
    subject = _subject()
    ref = subject["t1"]
    flip, aff, elastic = T.RandomFlip(axes=(0, 1, 2)), T.RandomAffine(), T.RandomElasticDeformation()

    def mappings(key, affine):
        k1, k2, k3 = jax.random.split(key, 3)
        maps = [
            t.mapping(t.sample(k, subject), ref.spatial_shape, affine)
            for t, k in ((flip, k1), (aff, k2), (elastic, k3))
        ]
        out = []
        for first in maps:
            for second in maps:
                m = T.compose_mappings(first, second)
                out.append(T.invert_mapping(T.compose_mappings(m, second)).matrix)
        return out

    _check(jax.make_jaxpr(mappings)(jax.random.key(5), jnp.asarray(ref.affine, jnp.float32)), "mappings")


def test_sampling_and_inference_request_highest_precision():
    subject = _subject((16, 16, 12))
    image = subject["t1"]

    def infer(data, affine):
        volume = jmed.Image(data, affine)
        # a half-resolution prediction: the output affine is scaled
        out = jmed.sliding_window_inference(
            lambda x: x[:, ::2, ::2, ::2] * 2.0, volume, patch_size=8, overlap=4, batch_size=2
        )
        return out.data, out.affine

    _check(jax.make_jaxpr(infer)(image.data, jnp.asarray(image.affine, jnp.float32)), "sliding window")
    for sampler in (
        jmed.LabelSampler(6, label_name="seg"),
        jmed.UniformSampler(6),
        jmed.WeightedSampler(6, "t1"),
    ):
        jaxpr = jax.make_jaxpr(lambda k, s, sampler=sampler: _outputs(sampler(k, s, 3)))(
            jax.random.key(6), subject
        )
        _check(jaxpr, repr(sampler))


# --- emulated bfloat16 products ----------------------------------------------------------


def _round_to_bfloat16(x):
    return x.astype(jnp.bfloat16).astype(x.dtype)


def _rounds(eqn, respect_precision: bool) -> bool:
    if eqn.primitive.name != "dot_general" or not _is_float_product(eqn):
        return False
    return not (respect_precision and _is_highest(eqn.params.get("precision")))


# JAX's own linear algebra (``jnp.linalg.inv``/``solve``) requests HIGHEST itself whatever
# the caller writes: never rounded, also in the variant that ignores precision requests
_JAX_INTERNAL = ("custom_linear_solve",)


def _any_rounds(jaxpr, respect_precision: bool) -> bool:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(
        _rounds(eqn, respect_precision)
        or (
            eqn.primitive.name not in _JAX_INTERNAL
            and any(
                _any_rounds(sub, respect_precision) for v in eqn.params.values() for sub in _sub_jaxprs(v)
            )
        )
        for eqn in jaxpr.eqns
    )


def _eval(jaxpr, args, respect_precision):
    """Evaluate a (closed) jaxpr, rounding the operands of the float products that
    ``_rounds`` selects to bfloat16; nested programs that hold such products are
    re-expressed with ``lax`` control flow, all others are bound as they are."""
    consts = getattr(jaxpr, "consts", [])
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        outs = _eval_eqn(eqn, [read(v) for v in eqn.invars], respect_precision)
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals, respect_precision):
    params = eqn.params
    name = eqn.primitive.name
    subs = [sub for v in params.values() for sub in _sub_jaxprs(v)]
    if _rounds(eqn, respect_precision):
        # one bfloat16 pass: operands rounded, products (exact in float32) summed in float32
        return [eqn.primitive.bind(*[_round_to_bfloat16(x) for x in invals], **params)]
    if not any(_any_rounds(sub, respect_precision) for sub in subs):
        bind_params = eqn.primitive.get_bind_params(params)
        subfuns = []
        if isinstance(bind_params, tuple):  # (subfuns, params) in older jax
            subfuns, bind_params = bind_params
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
        return out if eqn.primitive.multiple_results else [out]
    run = functools.partial(_eval, respect_precision=respect_precision)
    if name == "cond":
        index, *ops = invals
        return jax.lax.switch(index, [lambda *o, b=b: run(b, o) for b in params["branches"]], *ops)
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        cc, bc, carry = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
        return list(
            jax.lax.while_loop(
                lambda c: run(params["cond_jaxpr"], [*cc, *c])[0],
                lambda c: tuple(run(params["body_jaxpr"], [*bc, *c])),
                tuple(carry),
            )
        )
    if name == "scan":
        nc, nk = params["num_consts"], params["num_carry"]
        consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]

        def step(carry, x):
            out = run(params["jaxpr"], [*consts, *carry, *x])
            return tuple(out[:nk]), tuple(out[nk:])

        carry, ys = jax.lax.scan(
            step, tuple(init), tuple(xs), length=params["length"], reverse=params["reverse"]
        )
        return [*carry, *ys]
    for field in ("jaxpr", "call_jaxpr", "fun_jaxpr"):  # jit, closed_call, custom_jvp/vjp, remat
        if field in params:
            return run(params[field], invals)
    raise NotImplementedError(f"emulation of {name} holding products to round")


def emulate_bfloat16_products(fn, *, respect_precision: bool = True):
    """``fn`` (jitted) with the operands of its float matrix products rounded to
    bfloat16 as a TPU's default precision does. Products that request HIGHEST are left
    alone unless ``respect_precision`` is False, which gives the results of the same
    program written without precision requests."""

    @jax.jit
    def emulated(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat = _eval(closed, jax.tree.leaves(args), respect_precision)
        return jax.tree.unflatten(jax.tree.structure(shapes), flat)

    return emulated


def test_emulation_rounds_default_products_only():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    rounded = np.asarray(_round_to_bfloat16(jnp.asarray(a)), np.float64) @ np.asarray(
        _round_to_bfloat16(jnp.asarray(b)), np.float64
    )

    def nested(a, b):  # a product inside jit, a loop and a branch
        body = lambda i, c: jax.jit(_default_product)(c, b) / 4.0  # noqa: E731
        return jax.lax.cond(a[0, 0] < 10, lambda: jax.lax.fori_loop(0, 1, body, a) * 4.0, lambda: a)

    for fn in (_default_product, nested):
        np.testing.assert_allclose(emulate_bfloat16_products(fn)(a, b), rounded, rtol=1e-5, atol=1e-5)
        assert np.max(np.abs(np.asarray(emulate_bfloat16_products(fn)(a, b)) - exact)) > 1e-3
    np.testing.assert_allclose(emulate_bfloat16_products(_highest_product)(a, b), exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        emulate_bfloat16_products(_highest_product, respect_precision=False)(a, b),
        rounded,
        rtol=1e-5,
        atol=1e-5,
    )


BRAIN = (91, 97, 93)


@functools.lru_cache(maxsize=1)
def _brain():
    """A brain-like phantom of an odd size on an oblique grid with 1.1 x 1.0 x 1.2 mm voxels,
    some 60 mm from the world origin."""
    subject = jmed.datasets.phantom(7, shape=BRAIN, spacing=(1.1, 1.0, 1.2))
    affine = _oblique_affine((1.1, 1.0, 1.2))
    affine[:3, 3] = (-62.0, -71.0, -40.0)
    return subject.replace({n: subject[n].replace(affine=affine) for n in subject})


def _index_volume(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)


def _coordinates_fn(transform, shape, affine):
    """``params -> (X, Y, Z, 3)`` input voxel coordinates of every output voxel, read by
    resampling an image of voxel indices (exact inside the volume, clamped outside)."""
    index = _index_volume(shape)

    def coordinates(params):
        m = transform.mapping(params, shape, affine)
        return interpolation.resample(
            index,
            m.matrix,
            m.output_shape,
            order=1,
            pad_mode="edge",
            displacement=m.displacement,
            displacement_matrix=m.displacement_matrix,
        )

    return coordinates


def _rotation64(degrees):
    a, b, c = np.deg2rad(np.asarray(degrees, np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _affine_reference(params, shape, affine, points):
    """Input voxels (float64) of output voxels ``points`` ``(..., 3)`` under TorchIO's world
    map ``x -> S R (x - c) + c + S t`` (the content moves by it; the output pulls its
    inverse)."""
    lin, origin = affine[:3, :3], affine[:3, 3]
    centre = lin @ ((np.asarray(shape) - 1) / 2) + origin
    scales = np.asarray(params["scales"], np.float64)
    sr = scales[:, None] * _rotation64(params["degrees"])
    world = points @ lin.T + origin
    shift = scales * np.asarray(params["translation"], np.float64)
    pulled = (world - centre - shift) @ np.linalg.inv(sr).T + centre
    return (pulled - origin) @ np.linalg.inv(lin).T


def _chain_reference(params, shape, affine, points):
    """Flip(affine(p + L^-1 d(p))) in float64, ``d`` the B-spline field in mm."""
    flips, affine_params, control = params
    weights = [bspline.bspline_weights(s, n).astype(np.float64) for s, n in zip(shape, control.shape[:3])]
    field = np.einsum("ia,jb,kc,abcd->ijkd", *weights, np.asarray(control, np.float64), optimize=True)
    moved = points + field @ np.linalg.inv(affine[:3, :3]).T
    q = _affine_reference(affine_params, shape, affine, moved)
    n = np.asarray(shape, np.float64) - 1
    return np.where(np.asarray(flips), n - q, q)


def _inside(coords, shape):
    return np.all((coords >= 0) & (coords <= np.asarray(shape) - 1), axis=-1)


def _flip_affine_elastic():
    return [
        T.RandomFlip(axes=(0, 1, 2)),
        T.RandomAffine(scales=0.15, degrees=25, translation=8),
        T.RandomElasticDeformation(num_control_points=7, max_displacement=6.0),
    ]


CHAINS = {
    "RandomAffine": (
        lambda: T.RandomAffine(scales=0.15, degrees=25, translation=8),
        _affine_reference,
    ),
    # what Compose runs for consecutive spatial transforms
    "fused flip+affine+elastic": (lambda: T.SpatialTransform.fuse(_flip_affine_elastic()), _chain_reference),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_coordinates_unchanged_by_emulated_bfloat16_products(name):
    make, reference = CHAINS[name]
    transform = make()
    assert isinstance(transform, T.SpatialTransform)  # one mapping (fused for a chain)
    subject = _brain()
    shape, affine = BRAIN, np.asarray(subject["t1"].affine)
    params = transform.sample(jax.random.key(11), subject)
    coordinates = _coordinates_fn(transform, shape, affine)

    float32 = np.asarray(jax.jit(coordinates)(params), np.float64)
    emulated = np.asarray(emulate_bfloat16_products(coordinates)(params), np.float64)
    default = np.asarray(emulate_bfloat16_products(coordinates, respect_precision=False)(params), np.float64)

    points = _index_volume(shape).astype(np.float64)
    exact = reference(jax.tree.map(np.asarray, params), shape, affine, points)
    inside = _inside(exact, shape)
    assert inside.mean() > 0.5
    # float32 coordinates equal the float64 ones to float32 rounding
    np.testing.assert_allclose(float32[inside], exact[inside], rtol=0, atol=1e-3)
    # bfloat16 operands do not move them: every product of the geometry requests HIGHEST
    np.testing.assert_allclose(emulated, float32, rtol=0, atol=1e-4)
    # the same products at the default precision would move them by tenths of a voxel
    moved = np.linalg.norm(default - exact, axis=-1)[inside]
    assert np.median(moved) > 0.05 and np.quantile(moved, 0.99) > 0.15, (
        np.median(moved),
        np.quantile(moved, 0.99),
    )


def test_augmented_images_unchanged_by_emulated_bfloat16_products():
    subject = _brain()
    chain = T.Compose(_flip_affine_elastic())
    key = jax.random.key(12)

    def apply(key, subject):
        out = chain(key, subject)
        return out["t1"].data, out["seg"].data

    t1, seg = (np.asarray(x) for x in jax.jit(apply)(key, subject))
    emulated_t1, emulated_seg = (np.asarray(x) for x in emulate_bfloat16_products(apply)(key, subject))
    default_t1, default_seg = (
        np.asarray(x) for x in emulate_bfloat16_products(apply, respect_precision=False)(key, subject)
    )
    assert t1.dtype == np.float32 and seg.dtype == np.uint8
    scale = float(np.max(np.abs(t1)))
    np.testing.assert_allclose(emulated_t1, t1, rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(emulated_seg, seg)
    # the default precision would relabel boundary voxels and move the intensities
    boundary = np.mean(seg != np.roll(seg, 1, axis=0))
    changed = np.mean(default_seg != seg)
    assert 0.05 * boundary < changed < boundary, (changed, boundary)
    assert np.max(np.abs(default_t1 - t1)) > 0.02 * scale
