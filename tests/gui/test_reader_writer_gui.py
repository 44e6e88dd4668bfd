"""Reader (COCO JSON, Kaggle CSV), writer (COCO JSON) and sample data through napari's own open/save."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")

from PIL import Image

from napari_sartorius._reader import get_reader, read_annotations
from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.io import load_annotations, save_annotations
from napari_sartorius.synthetic import make_sample

pytestmark = pytest.mark.gui

SHAPE = (96, 128)


def _dataset(folder, image_dir="images", styles=("cort", "astro"), fmt="coco"):
    """Synthetic images saved as PNG (in ``image_dir``) with their annotations in ``folder``."""
    samples = {f"img_{s}": make_sample(s, seed=i, shape=SHAPE) for i, s in enumerate(styles)}
    imdir = folder / image_dir if image_dir else folder
    imdir.mkdir(parents=True, exist_ok=True)
    for key, s in samples.items():
        Image.fromarray(s.image).save(imdir / f"{key}.png")
    aset = AnnotationSet(images=[s.to_annotations(key) for key, s in samples.items()])
    path = folder / ("ann.json" if fmt == "coco" else "train.csv")
    save_annotations(aset, path, fmt)
    return path, samples


@pytest.mark.parametrize("fmt", ["coco", "csv"])
def test_open_annotations_with_images(make_napari_viewer, tmp_path, fmt):
    path, samples = _dataset(tmp_path, fmt=fmt)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-sartorius")
    names = [lay.name for lay in viewer.layers]
    assert names == ["img_cort", "img_cort labels", "img_astro", "img_astro labels"]
    for key, s in samples.items():
        assert np.array_equal(viewer.layers[key].data, s.image)
        labels = viewer.layers[f"{key} labels"]
        assert np.array_equal(labels.data, s.labels)
        assert set(labels.features["class"]) == {s.cell_type}
        assert len(labels.features) == s.n_cells
        assert labels.metadata["cell_type"] == s.cell_type


def test_images_beside_the_annotation_file_are_found(tmp_path):
    path, samples = _dataset(tmp_path, image_dir=None, styles=("cort",))
    layers = read_annotations(path)
    assert [t for _, _, t in layers] == ["image", "labels"]


def test_missing_images_give_labels_and_a_clear_message(tmp_path, monkeypatch):
    import napari.utils.notifications as notes

    shown = []
    monkeypatch.setattr(notes, "show_warning", lambda msg: shown.append(msg))
    path, samples = _dataset(tmp_path, styles=("cort",))
    (tmp_path / "images" / "img_cort.png").unlink()
    layers = read_annotations(path)
    assert [t for _, _, t in layers] == ["labels"]
    assert np.array_equal(layers[0][0], samples["img_cort"].labels)
    assert shown and "img_cort" in shown[0] and "images" in shown[0]


def test_overlapping_annotations_are_resolved_and_reported(tmp_path, monkeypatch):
    import napari.utils.notifications as notes

    shown = []
    monkeypatch.setattr(notes, "show_warning", lambda msg: shown.append(msg))
    a = np.zeros((40, 50), bool)
    a[5:25, 5:25] = True  # 400 px
    b = np.zeros((40, 50), bool)
    b[15:30, 15:30] = True  # 225 px, overlaps a on 10 x 10 = 100 px
    inst = Instances.from_full_masks([a, b], classes=[2, 2])
    aset = AnnotationSet(images=[ImageAnnotations("ov", inst, cell_type="cort", file_name="ov.png")])
    path = tmp_path / "ov.json"
    save_annotations(aset, path, "coco")
    # the file keeps the overlap
    assert load_annotations(path).images[0].instances.areas().tolist() == [400, 225]
    (labels, meta, kind), = read_annotations(path)
    assert kind == "labels"
    # the contested pixels go to the smaller cell (cleaning rules)
    assert np.count_nonzero(labels == 1) == 300 and np.count_nonzero(labels == 2) == 225
    assert meta["features"]["area"].tolist() == [300, 225]
    assert any("100 pixel" in m for m in shown), shown


def test_get_reader_declines_other_files(tmp_path):
    other = tmp_path / "settings.json"
    other.write_text(json.dumps({"theme": "dark"}))
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    assert get_reader(str(other)) is None
    assert get_reader(str(table)) is None
    assert get_reader(str(tmp_path / "nope.json")) is None
    path, _ = _dataset(tmp_path, styles=("cort",))
    assert get_reader(str(path)) is read_annotations
    assert get_reader([str(path)]) is read_annotations


def test_unreadable_annotations_raise_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1}], "annotations": "nonsense"')
    with pytest.raises(ValueError, match="bad.json"):
        read_annotations(bad)


def test_writer_round_trip_through_napari(make_napari_viewer, tmp_path):
    """Save Labels + Image with File > Save Selected Layers (our writer), open the JSON again."""
    s = make_sample("astro", seed=5, shape=SHAPE)
    viewer = make_napari_viewer()
    image = viewer.add_image(s.image, name="astro image")
    labels = viewer.add_labels(s.labels, name="astro image labels", metadata={"cell_type": "astro"})
    viewer.layers.selection = {image, labels}
    out = tmp_path / "export" / "astro.json"
    out.parent.mkdir()
    written = viewer.layers.save(str(out), selected=True, plugin="napari-sartorius")
    assert str(out) in written
    assert (out.parent / "astro_image.png").is_file()  # the image had no file: written beside the JSON
    aset = load_annotations(out)
    assert [im.image_id for im in aset] == ["astro_image"]
    assert aset.images[0].cell_type == "astro"
    assert len(aset.images[0].instances) == s.n_cells
    viewer2 = make_napari_viewer()
    viewer2.open(str(out), plugin="napari-sartorius")
    assert np.array_equal(viewer2.layers["astro_image"].data, s.image)
    assert np.array_equal(viewer2.layers["astro_image labels"].data, s.labels)


def test_writer_keeps_classes_and_the_image_file(tmp_path):
    from napari_sartorius._writer import write_coco

    path, samples = _dataset(tmp_path, styles=("cort",))
    layers = read_annotations(path)
    out_dir = tmp_path / "elsewhere"
    out_dir.mkdir()
    written = write_coco(str(out_dir / "copy"), layers)
    assert written == [str(out_dir / "copy.json")]  # image file exists: nothing else written
    coco = json.loads((out_dir / "copy.json").read_text())
    assert coco["images"][0]["file_name"] == "img_cort.png"  # the image's file name, never a path
    (out_dir / "images").mkdir()
    (out_dir / "images" / "img_cort.png").write_bytes((path.parent / "images" / "img_cort.png").read_bytes())
    again = read_annotations(out_dir / "copy.json")
    assert [t for _, _, t in again] == ["image", "labels"]
    assert np.array_equal(again[1][0], samples["img_cort"].labels)
    assert set(again[1][1]["features"]["class"]) == {"cort"}


def test_writer_rejects_mismatched_layers(tmp_path):
    from napari_sartorius._writer import write_coco

    lab = np.zeros((10, 10), np.uint16)
    with pytest.raises(ValueError, match="one Labels layer"):
        write_coco(str(tmp_path / "x.json"), [(lab, {"name": "a"}, "labels"), (lab, {"name": "b"}, "labels")])
    with pytest.raises(ValueError, match="do not match"):
        write_coco(
            str(tmp_path / "x.json"),
            [(lab, {"name": "a"}, "labels"), (np.zeros((12, 10), np.uint8), {"name": "i"}, "image")],
        )
    assert not (tmp_path / "x.json").exists()


def test_a_3d_labels_stack_becomes_one_coco_image_per_plane(tmp_path):
    from napari_sartorius._writer import write_coco

    planes = [make_sample("cort", seed=i, shape=SHAPE) for i in (0, 1)]
    labels = np.stack([p.labels for p in planes])
    image = np.stack([p.image for p in planes])
    written = write_coco(str(tmp_path / "st.json"), [(labels, {"name": "st labels"}, "labels"), (image, {"name": "st"}, "image")])
    assert len(written) == 3
    aset = load_annotations(tmp_path / "st.json")
    assert [im.image_id for im in aset] == ["st_z000", "st_z001"]
    for im, p in zip(aset, planes):
        assert np.array_equal(im.instances.to_label_image(), p.labels)


@pytest.mark.parametrize("style", ["shsy5y", "astro", "cort"])
def test_sample_data(make_napari_viewer, style):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sartorius", style)
    image, labels = viewer.layers
    assert image.data.dtype == np.uint8 and image.data.shape == (520, 704)
    assert labels.data.shape == (520, 704) and labels.data.max() > 0
    assert labels.name == f"{style} ground truth"


def test_many_images_open_as_one_stack(tmp_path, monkeypatch):
    import napari_sartorius._reader as reader

    monkeypatch.setattr(reader, "MAX_SEPARATE_IMAGES", 2)
    path, samples = _dataset(tmp_path, styles=("cort", "astro", "shsy5y"))
    layers = read_annotations(path)
    assert [t for _, _, t in layers] == ["image", "labels"]
    (stack, imeta, _), (labels, lmeta, _) = layers
    assert stack.shape == labels.shape == (3,) + SHAPE
    assert imeta["metadata"]["image_ids"] == list(samples)
    feats = lmeta["features"]
    assert len(feats["label"]) == sum(s.n_cells for s in samples.values())
    for z, s in enumerate(samples.values()):
        assert np.array_equal(stack[z], s.image)
        ids = np.unique(labels[z])
        ids = ids[ids > 0]
        assert len(ids) == s.n_cells
        assert set(feats["class"][feats["plane"] == z]) == {s.cell_type}
    assert len(np.unique(labels)) - 1 == len(feats["label"])  # ids unique across planes
