"""The documentation builds without warnings, shows existing pictures and names every transform."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jmed.transforms
from jmed.transforms import Transform

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _transform_names() -> list[str]:
    names = []
    for name in jmed.transforms.__all__:
        obj = getattr(jmed.transforms, name)
        if isinstance(obj, type) and issubclass(obj, Transform):
            names.append(name)
    return names


def _gallery_pictures() -> list[str]:
    text = (DOCS / "gallery.md").read_text()
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", text)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings-python are not installed",
)
def test_docs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "torchio" / "index.html").is_file()


def test_gallery_pictures_exist():
    pictures = _gallery_pictures()
    assert len(pictures) >= 20, f"expected the gallery page to show pictures, found {pictures}"
    missing = [p for p in pictures if not (DOCS / p).is_file()]
    assert not missing, f"pictures referenced by docs/gallery.md are missing (run docs/gallery.py): {missing}"


def test_gallery_script_covers_page():
    """Every picture on the page is one that docs/gallery.py regenerates, and vice versa."""
    spec = importlib.util.spec_from_file_location("_docs_gallery", DOCS / "gallery.py")
    source = spec.loader.get_source("_docs_gallery")
    stems = set(re.findall(r'^\s+"(\w+)": \(T\.', source, flags=re.M))
    shown = {Path(p).stem for p in _gallery_pictures()}
    assert stems == shown, f"only in gallery.py: {stems - shown}; only in gallery.md: {shown - stems}"


def test_torchio_page_names_every_transform():
    text = (DOCS / "torchio.md").read_text()
    names = _transform_names()
    assert "RandomAffine" in names and "Transform" in names  # the check below can fail
    missing = [n for n in names if not re.search(rf"`(?:T\.)?{n}[`(]", text)]
    assert not missing, f"transforms missing from docs/torchio.md (add them to the mapping table): {missing}"


def test_torchio_page_names_samplers_loaders_and_cli():
    text = (DOCS / "torchio.md").read_text()
    names = [
        n for n in jmed.__all__ if re.search(r"Sampler$|Aggregator$|^Queue$|Loader$|^SubjectsSource$", n)
    ]
    assert {"UniformSampler", "LabelSampler", "GridAggregator", "Queue", "VolumeLoader"} <= set(names)
    missing = [n for n in names if f"jmed.{n}" not in text]
    assert not missing, f"missing from docs/torchio.md: {missing}"
    assert "`tiotr" in text and "jmed transform" in text


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_extension_guide_runs():
    """The worked examples of docs/extending.md run as one script (their own asserts
    compare with numpy)."""
    blocks = _python_blocks(DOCS / "extending.md")
    assert len(blocks) >= 2, "docs/extending.md lost its worked examples"
    namespace: dict = {"__name__": "extending_guide"}
    exec(compile("\n".join(blocks), str(DOCS / "extending.md"), "exec"), namespace)  # noqa: S102
    random_cls, spatial_cls = namespace["RandomScaleIntensity"], namespace["RandomShear"]
    assert issubclass(random_cls, jmed.transforms.RandomTransform) and random_cls.invertible
    assert issubclass(spatial_cls, jmed.transforms.SpatialTransform)


def _torchio_table_names() -> set[str]:
    """Transforms named in the jmed column of docs/torchio.md's tables."""
    names = set()
    for line in (DOCS / "torchio.md").read_text().splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 3:
            names |= set(re.findall(r"`T\.(\w+)", cells[2]))
    return names


def test_every_exported_transform_has_a_docs_row_and_an_api_page():
    rows = _torchio_table_names()
    assert {"RandomAffine", "Compose", "Transform"} <= rows  # the check below can fail
    missing = [n for n in _transform_names() if n not in rows]
    assert not missing, (
        f"exported transforms without a row in docs/torchio.md's transform table: {missing}. "
        "Add a row '| `tio.Name` (or —) | `T.Name` | notes |' to that table"
    )
    pages = {p.stem for p in (DOCS / "api").glob("transforms.*.md")}
    for name in _transform_names():
        module = getattr(jmed.transforms, name).__module__
        assert module.startswith("jmed.transforms."), (name, module)
        page = module.removeprefix("jmed.")
        assert page in pages, f"{name} lives in {module}, which has no docs/api/{page}.md page: add one"
        assert f"::: {module}" in (DOCS / "api" / f"{page}.md").read_text()
