"""API conventions checked by introspection (STYLE.md "Signatures", "Docstrings").

Every name in the public ``__all__`` lists imports; every public callable has a
docstring; random transforms are called ``transform(key, data)`` and sample parameters
with ``sample(key, subject)``; transform constructors take optional arguments by keyword
only, except the known exceptions listed below (TorchIO-compatible leading parameters),
which may shrink but not grow.
"""

import importlib
import inspect
from pathlib import Path

import jax
import pytest

import jmed
import jmed.transforms as T

MODULES = [
    "jmed",
    "jmed.affine",
    "jmed.chunked",
    "jmed.cli",
    "jmed.data",
    "jmed.datasets",
    "jmed.formats",
    "jmed.image",
    "jmed.inference",
    "jmed.io",
    "jmed.metrics",
    "jmed.patch_reads",
    "jmed.plot",
    "jmed.sampling",
    "jmed.transforms",
]

# constructors whose optional parameters may be passed positionally: the primary argument
# of a container transform, and TorchIO's leading parameters where jmed has them under the
# same names, in TorchIO's order (``RescaleIntensity((0, 1))``, ``RandomAffine(0.2)``)
POSITIONAL_OPTIONAL_ALLOWED = {
    "Spatial": {"transforms"},
    "Clamp": {"out_min", "out_max"},
    "CropOrPad": {"padding_mode", "mask_name"},
    "HistogramStandardization": {"masking_method"},
    "Mask": {"outside_value"},
    "OneHot": {"num_classes"},
    "Pad": {"padding_mode"},
    "RandomAffine": {
        "scales",
        "degrees",
        "translation",
        "isotropic",
        "center",
        "default_pad_value",
        "default_pad_label",
        "image_interpolation",
        "label_interpolation",
    },
    "RandomAnisotropy": {"axes", "downsampling"},
    "RandomBiasField": {"coefficients", "order"},
    "RandomBlur": {"std"},
    "RandomElasticDeformation": {
        "num_control_points",
        "max_displacement",
        "locked_borders",
        "image_interpolation",
        "label_interpolation",
    },
    "RandomFlip": {"axes", "flip_probability"},
    "RandomGamma": {"log_gamma"},
    "RandomGhosting": {"num_ghosts", "axes", "intensity", "restore"},
    "RandomMotion": {"degrees", "translation", "num_transforms"},
    "RandomNoise": {"mean", "std"},
    "RandomSpike": {"num_spikes", "intensity"},
    "RandomSwap": {"patch_size", "num_iterations"},
    "RemoveLabels": {"background_label"},
    "Resample": {"target", "image_interpolation", "label_interpolation"},
    "RescaleIntensity": {"out_min_max", "percentiles", "masking_method", "in_min_max"},
    "Resize": {"image_interpolation", "label_interpolation"},
    "ZNormalization": {"masking_method"},
}


def public_names():
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            yield module_name, name


def transform_classes():
    return {
        name: getattr(T, name)
        for name in T.__all__
        if isinstance(getattr(T, name), type) and issubclass(getattr(T, name), T.Transform)
    }


@pytest.mark.parametrize("module_name", MODULES)
def test_all_is_importable(module_name):
    module = importlib.import_module(module_name)
    assert len(set(module.__all__)) == len(module.__all__), "duplicates in __all__"
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.__all__ names {name!r}, which is not defined"
    namespace = {}
    exec(f"from {module_name} import *", namespace)  # noqa: S102
    assert set(module.__all__) <= set(namespace)


def test_every_public_callable_has_a_docstring():
    missing = []
    for module_name, name in public_names():
        obj = getattr(importlib.import_module(module_name), name)
        if inspect.ismodule(obj):
            assert inspect.getdoc(obj), f"module {module_name}.{name} has no docstring"
        elif callable(obj) and not inspect.getdoc(obj):
            missing.append(f"{module_name}.{name}")
    assert not missing, f"public callables without a docstring: {missing}"


@pytest.mark.parametrize("name", sorted(transform_classes()))
def test_transform_call_and_sample_are_key_first(name):
    cls = transform_classes()[name]
    call = list(inspect.signature(cls.__call__).parameters)
    assert call[:3] == ["self", "key", "data"], f"{name}.__call__{call}"
    sample = list(inspect.signature(cls.sample).parameters)
    assert sample[:3] == ["self", "key", "subject"], f"{name}.sample{sample}"
    apply = list(inspect.signature(cls.apply).parameters)
    assert apply[:3] == ["self", "subject", "params"], f"{name}.apply{apply}"


def test_random_transforms_use_the_key():
    subject = jmed.Subject(t1=jmed.ScalarImage(jax.numpy.arange(64.0).reshape(4, 4, 4)))
    out_a = T.RandomNoise(std=1.0)(jax.random.key(0), subject)
    out_b = T.RandomNoise(std=1.0)(jax.random.key(1), subject)
    assert not bool((out_a["t1"].data == out_b["t1"].data).all())


def positional_optional(obj):
    sig = inspect.signature(obj)
    return {
        p.name
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize("name", sorted(transform_classes()))
def test_transform_optional_arguments_are_keyword_only(name):
    found = positional_optional(transform_classes()[name])
    allowed = POSITIONAL_OPTIONAL_ALLOWED.get(name, set())
    assert found <= allowed, f"{name}: optional arguments {sorted(found - allowed)} must be keyword-only"


def test_positional_exceptions_list_is_current():
    classes = transform_classes()
    for name, allowed in POSITIONAL_OPTIONAL_ALLOWED.items():
        assert name in classes, f"{name} is not a public transform"
        assert allowed <= {p for p in inspect.signature(classes[name]).parameters}, name


def test_random_functions_take_key_first():
    assert list(inspect.signature(jmed.augment_and_sample).parameters)[0] == "key"
    assert list(inspect.signature(T.predict_with_tta).parameters)[0] == "key"
    for sampler in (jmed.UniformSampler, jmed.WeightedSampler, jmed.LabelSampler):
        for method in ("__call__", "starts"):
            params = list(inspect.signature(getattr(sampler, method)).parameters)
            assert params[:3] == ["self", "key", "subject"], f"{sampler.__name__}.{method}{params}"
    # the grid sampler is deterministic: no key
    assert list(inspect.signature(jmed.GridPatchSampler.__call__).parameters)[:2] == ["self", "subject"]


# --- lazy imports ------------------------------------------------------------------------------

# packages that only some users install; ``import jmed`` must not need or import them
OPTIONAL_PACKAGES = ("matplotlib", "zarr", "fsspec", "torch", "flax", "pydicom", "nrrd", "h5py", "nilearn")


def _modules_after(code):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    script = code + "\nimport sys\nprint(' '.join(sorted(m.partition('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_import_jmed_imports_no_optional_package_and_not_jax():
    loaded = _modules_after("import jmed")
    assert not loaded & set(OPTIONAL_PACKAGES), sorted(loaded & set(OPTIONAL_PACKAGES))
    # the names are imported on first use (PEP 562), so the command line starts fast
    assert "jax" not in loaded and "nibabel" not in loaded
    # touching one name imports what it needs, still without the optional packages
    loaded = _modules_after("import jmed\njmed.Image\njmed.transforms.RandomAffine")
    assert "jax" in loaded
    assert not loaded & set(OPTIONAL_PACKAGES), sorted(loaded & set(OPTIONAL_PACKAGES))


def test_lazy_names_are_the_defining_modules_objects():
    import ast

    for name in jmed.__all__:
        value = getattr(jmed, name)
        if inspect.ismodule(value):
            assert value is importlib.import_module(f"jmed.{name}")
        else:
            module = importlib.import_module(jmed._LAZY_NAMES[name])
            assert value is getattr(module, name), name
    assert set(jmed._LAZY_NAMES) <= set(jmed.__all__)
    assert set(jmed.__all__) <= set(dir(jmed))
    from jmed import Queue, sliding_window_inference  # noqa: F401 - the from-import form

    # the TYPE_CHECKING imports (what IDEs and type checkers see) name exactly __all__
    tree = ast.parse(inspect.getsource(jmed))
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
    )
    typed = {alias.asname or alias.name for node in block.body for alias in node.names}
    assert typed == set(jmed.__all__), sorted(typed ^ set(jmed.__all__))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        jmed.no_such_name  # noqa: B018
    assert jmed.io is importlib.import_module("jmed.io")  # any submodule, as an attribute


def _positional(cls) -> list[str]:
    return [
        p.name
        for p in list(inspect.signature(cls).parameters.values())
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]


@pytest.mark.parametrize("name", sorted(transform_classes()))
def test_positional_parameters_follow_torchio(name):
    """jmed's positional parameters are TorchIO's leading ones, same names, same order."""
    tio = pytest.importorskip("torchio")
    ours = _positional(transform_classes()[name])
    theirs_cls = getattr(tio, name, None)
    if theirs_cls is None or not ours:
        return
    theirs = _positional(theirs_cls)
    common = 0
    while common < min(len(ours), len(theirs)) and ours[common] == theirs[common]:
        common += 1
    # beyond the shared prefix only a required primary argument may differ in name
    # (RemapLabels' ``mapping`` is TorchIO's ``remapping``)
    optional = positional_optional(transform_classes()[name])
    extra = [n for n in ours[common:] if n in optional]
    assert not extra, f"{name}: positional {extra} not in TorchIO's order {theirs}"
    # where TorchIO continues with a parameter jmed has too, jmed takes it positionally
    names = set(inspect.signature(transform_classes()[name]).parameters)
    if common == len(ours) and len(ours) < len(theirs):
        assert theirs[len(ours)] not in names, (
            f"{name}: {theirs[len(ours)]!r} could be positional as in TorchIO"
        )


def test_torchio_style_positional_calls():
    assert T.RescaleIntensity((0, 1)).out_min_max == (0.0, 1.0)
    assert T.RescaleIntensity((0, 1), (1, 99)).percentiles == (1.0, 99.0)
    assert T.RandomAffine(0.2).scales.tolist() == [[0.8, 1.2]] * 3
    assert T.RandomAffine(0.2, 15).degrees.tolist() == [[-15.0, 15.0]] * 3
    assert T.RandomFlip((0, 1)).axes == (0, 1)
    assert T.RandomFlip(("LR",), 1.0).flip_probability == 1.0
    assert T.Resample(1) == T.Resample(target=1) == T.Resample()
    assert T.CropOrPad((4, 5, 6), 0).padding_mode == 0
    assert T.RandomNoise(0, 0.5).std == (0.0, 0.5)
    assert T.RandomBiasField(0.3, 2).order == 2
    assert T.Clamp(0, 1) == T.Clamp(out_min=0, out_max=1)
    assert T.OneHot() == T.OneHot(-1) == T.OneHot(None)


# --- layering --------------------------------------------------------------------------------


def _layers_from_development_docs():
    """The module prefixes of each row of the layering table in docs/development.md, in order."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "development.md").read_text()
    table = text.split("## Layout and layering", 1)[1].split("\n\n", 2)[2]
    layers = []
    for row in table.splitlines():
        if not row.startswith("| ") or row.startswith("| layer") or row.startswith("|---"):
            continue
        paths = re.findall(r"`(jmed/[\w/.]*)`", row.split("|")[2])
        layers.append(tuple(p.removesuffix(".py").removesuffix("/").replace("/", ".") for p in paths))
    return layers


def test_module_level_imports_follow_the_documented_layers():
    """A module imports (at import time) only from its own layer or earlier ones of the table
    in docs/development.md, so there are no import cycles; functions may import later layers
    (conveniences such as ``Image.plot``)."""
    import ast

    layers = _layers_from_development_docs()
    assert len(layers) >= 10, layers

    def layer(module):
        found = [
            i for i, names in enumerate(layers) for n in names if module == n or module.startswith(n + ".")
        ]
        return max(found) if found else None

    package = Path(jmed.__file__).parent
    problems = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "jmed":
            continue
        own = layer(module)
        if own is None:
            problems.append(f"{module} is in no row of the layering table of docs/development.md")
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                targets = [f"jmed.{alias.name}" for alias in node.names] if base == "jmed" else [base]
            else:
                continue
            for target in targets:
                if target.startswith("jmed.") and (layer(target) or 0) > own:
                    problems.append(f"{module} imports {target}, a later layer")
    assert not problems, "\n".join(problems)
