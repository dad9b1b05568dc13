import base64
import io
import re

import jax
import numpy as np
import pytest

import jmed
import jmed.transforms as T
from jmed import datasets

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from jmed import plot  # noqa: E402


def _marker_subject(orientation):
    """Dark volume with a bright block in the patient's left-anterior-superior octant."""
    shape = (20, 24, 16)
    spacing = (1.0, 2.0, 1.5)
    affine = jmed.affine.from_spacing(spacing, (0, 0, 0), "RAS")
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing)
    data = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    # RAS index: low x = patient's left; high y = anterior; high z = superior
    data[2:8, 14:22, 10:15] = 1.0
    labels[2:8, 14:22, 10:15] = 1
    # a fainter block filling the centre slices so every view crosses something
    data[6:14, 8:16, 5:11] = 0.3
    ras = jmed.Subject(t1=jmed.ScalarImage(data, affine), seg=jmed.LabelMap(labels, affine))
    if orientation == "RAS":
        return ras
    out = {}
    for name, image in ras.items():
        moved, new_affine = jmed.affine.reorient(image.numpy(), image.affine, orientation)
        out[name] = image.replace(data=np.ascontiguousarray(moved), affine=new_affine)
    return jmed.Subject(out)


def _bright_centroid(png, ax, fig):
    """Centroid of white pixels inside ``ax``, as fractions of its width and height (y up)."""
    pixels = imread(png)
    height = pixels.shape[0]
    box = ax.get_window_extent()
    x0, x1 = int(np.ceil(box.x0)), int(np.floor(box.x1))
    top, bottom = int(np.ceil(height - box.y1)), int(np.floor(height - box.y0))
    crop = pixels[top:bottom, x0:x1, :3]
    white = np.all(crop > 0.9, axis=-1)
    assert white.sum() > 10, "marker not visible"
    rows, cols = np.nonzero(white)
    return cols.mean() / crop.shape[1], 1 - rows.mean() / crop.shape[0]


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIL"])
@pytest.mark.parametrize("radiological", [False, True])
def test_left_marker_side_and_anatomical_directions(tmp_path, orientation, radiological):
    subject = _marker_subject(orientation)
    assert subject.t1.orientation == orientation
    png = tmp_path / "subject.png"
    # slices through the marker's centre (world mm)
    ras = _marker_subject("RAS")
    centre = jmed.affine.voxel_to_world(ras.t1.affine, np.array([4.5, 17.5, 12.0]))
    fig = plot.plot_subject(subject, point=centre, overlay=False, radiological=radiological, output=png)
    assert len(fig.axes) == 3
    sagittal, coronal, axial = fig.axes
    # neurological: patient's left on the picture's left; radiological: mirrored
    for ax in (coronal, axial):
        x, _ = _bright_centroid(png, ax, fig)
        assert (x > 0.5) if radiological else (x < 0.5), (ax.get_title(), x)
    # superior is up in sagittal/coronal, anterior up in axial, anterior right in sagittal
    x, y = _bright_centroid(png, sagittal, fig)
    assert x > 0.5 and y > 0.5
    assert _bright_centroid(png, coronal, fig)[1] > 0.5
    assert _bright_centroid(png, axial, fig)[1] > 0.5


def test_aspect_follows_spacing():
    subject = _marker_subject("RAS")
    fig = plot.plot_subject(subject)
    sagittal = fig.axes[0]
    extent = sagittal.images[0].get_extent()
    # sagittal: horizontal is y (24 voxels x 2 mm), vertical is z (16 x 1.5 mm)
    np.testing.assert_allclose(extent[1] - extent[0], 48.0)
    np.testing.assert_allclose(extent[3] - extent[2], 24.0)
    assert sagittal.get_aspect() == 1.0
    # the drawn array is the RAS slice through the centre voxel, rows = superior axis
    np.testing.assert_array_equal(sagittal.images[0].get_array(), subject.t1.numpy()[9, :, :, 0].T)


def test_overlay_and_rows(tmp_path):
    s = datasets.phantom(0, shape=(24, 24, 24))
    s = s.replace({"t2": jmed.ScalarImage(-s.t1.numpy()[..., 0], s.t1.affine)})
    fig = plot.plot_subject(s, output=tmp_path / "a.png")
    assert len(fig.axes) == 6  # t1 and t2 rows x 3 views
    assert all(len(ax.images) == 2 for ax in fig.axes)  # image + label overlay
    fig = plot.plot_subject(s, images=["t1"], overlay=False, views=["axial"])
    assert len(fig.axes) == 1 and len(fig.axes[0].images) == 1
    fig = plot.plot_image(s.seg)
    assert len(fig.axes) == 3
    fig = plot.plot_image(s.t1, label=s.seg)
    assert len(fig.axes) == 3 and all(len(ax.images) == 2 for ax in fig.axes)
    with pytest.raises(ValueError, match="views"):
        plot.plot_subject(s, views=["oblique"])
    with pytest.raises(KeyError, match="flair"):
        plot.plot_subject(s, images=["flair"])
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_plot_batch_panel_count(tmp_path):
    items = [datasets.phantom(i, shape=(16, 16, 16)) for i in range(5)]
    batch = jmed.stack(items)
    fig = plot.plot_batch(batch, output=tmp_path / "batch.png")
    assert len(fig.axes) == 5
    assert all(len(ax.images) == 2 for ax in fig.axes)
    np.testing.assert_array_equal(fig.axes[3].images[0].get_array(), items[3].t1.numpy()[:, :, 7, 0].T)
    assert len(plot.plot_batch(items, max_items=4, ncols=4, overlay=False).axes) == 4
    with pytest.raises(ValueError, match="view"):
        plot.plot_batch(batch, view="front")


def test_plot_transform_before_after(tmp_path):
    from jmed.transforms import Lambda

    subject = datasets.phantom(0, shape=(16, 16, 16))
    flip = Lambda(lambda data: data[::-1])
    fig = plot.plot_transform(None, flip, subject, output=tmp_path / "t.png")
    assert len(fig.axes) == 6
    before = fig.axes[2].images[0].get_array()
    after = fig.axes[5].images[0].get_array()
    np.testing.assert_array_equal(after, before[:, ::-1])

    class Noise(jmed.transforms.IntensityTransform):
        is_random = True

        def sample(self, key, subject):
            return jax.random.normal(key, ())

        def apply_image(self, image, params):
            return image.replace(data=image.data + params)

    fig = plot.plot_transform(jax.random.key(0), Noise(), subject, num_samples=2)
    assert len(fig.axes) == 9
    offsets = [
        float(np.mean(fig.axes[3 * r].images[0].get_array() - fig.axes[0].images[0].get_array()))
        for r in (1, 2)
    ]
    assert offsets[0] != offsets[1]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Every import of matplotlib fails, as where it is not installed."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_matplotlib(no_matplotlib):
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.plot_subject(datasets.phantom(0, shape=(8, 8, 8)))


def test_image_and_subject_plot_are_the_plot_functions(tmp_path):
    s = datasets.phantom(0, shape=(16, 16, 16))
    fig = s.plot(output=tmp_path / "s.png")
    assert len(fig.axes) == 3 and all(len(ax.images) == 2 for ax in fig.axes)  # t1 + seg overlay
    reference = plot.plot_subject(s)
    for ours, theirs in zip(fig.axes, reference.axes):
        np.testing.assert_array_equal(ours.images[0].get_array(), theirs.images[0].get_array())
    assert (tmp_path / "s.png").stat().st_size > 1000
    fig = s.t1.plot(views=["axial"])
    assert len(fig.axes) == 1
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), s.t1.numpy()[:, :, 7, 0].T)
    fig = s.t1.plot(label=s.seg)
    assert all(len(ax.images) == 2 for ax in fig.axes)


def _embedded_png(html):
    match = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert match, "no embedded PNG"
    return imread(io.BytesIO(base64.b64decode(match[1])))


def test_notebook_display_shows_slices_and_geometry(tmp_path):
    affine = jmed.affine.from_spacing((2.0, 1.0, 3.0), origin=(10, -20, 5), orientation="LPS")
    data = np.zeros((20, 24, 16), np.float32)
    data[5:15, 6:18, 4:12] = 1.0
    path = tmp_path / "t1.nii.gz"
    jmed.save(jmed.ScalarImage(data, affine), path)
    image = jmed.load(path, lazy=True)
    text = image._repr_html_()
    assert not image.is_loaded  # drawn from a loaded copy
    for value in ("(20, 24, 16, 1)", "(2.0, 1.0, 3.0)", "LPS", "(10.0, -20.0, 5.0)", "float32"):
        assert value in text, value
    pixels = _embedded_png(text)
    # one row of three views, 3 inches each at 72 dpi
    assert pixels.shape[:2] == (216, 648)
    assert pixels[..., :3].std() > 0.05  # not a blank picture

    s = datasets.phantom(0, shape=(16, 16, 16))
    s = s.replace({"t2": jmed.ScalarImage(-s.t1.numpy()[..., 0], s.t1.affine)})
    out = T.RandomAffine(degrees=(10, 10))(jax.random.key(0), s)
    text = out._repr_html_()
    assert text.count("<tr>") == 4  # header and one row per image
    assert "<td>seg</td><td>label</td><td>(16, 16, 16, 1)</td><td>uint8</td>" in text
    assert "degrees=(10.00, 10.00, 10.00)" in text  # the history
    pixels = _embedded_png(text)
    assert pixels.shape[:2] == (2 * 216, 648)  # two intensity rows, label overlaid
    assert pixels[..., :3].std() > 0.05


def test_notebook_display_of_a_batch_is_text_only():
    batch = jmed.stack([datasets.phantom(i, shape=(8, 8, 8)) for i in range(2)])
    text = batch._repr_html_()
    assert "<img" not in text and "slices not shown" in text and "(2, 8, 8, 8, 1)" in text
    assert "(batch)" in text


def test_notebook_display_without_matplotlib(no_matplotlib):
    text = datasets.phantom(0, shape=(8, 8, 8))._repr_html_()
    assert "<img" not in text and "matplotlib is not installed" in text and "(8, 8, 8, 1)" in text


def test_figures_show_themselves_in_notebooks_without_pyplot():
    import pickle

    from matplotlib.figure import Figure

    fig = datasets.phantom(0, shape=(16, 16, 16)).plot()
    assert isinstance(fig, Figure)
    pixels = imread(io.BytesIO(fig._repr_png_()))  # what Jupyter shows for the returned figure
    assert pixels.shape[:2] == (300, 900)  # 3 panels of 3 inches at the figure's 100 dpi
    assert pixels[..., :3].std() > 0.05
    again = pickle.loads(pickle.dumps(fig))
    assert type(again) is type(fig) and len(again.axes) == 3
