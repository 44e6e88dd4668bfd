import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.io import detect_format, load_annotations, save_annotations



def _aset():
    h, w = 8, 9
    a = np.zeros((h, w), bool)
    a[1:4, 1:5] = True
    b = np.zeros((h, w), bool)
    b[3:7, 3:8] = True  # overlaps a
    return AnnotationSet(
        [
            ImageAnnotations("s1", Instances.from_full_masks([a, b], classes=[2, 2], scores=[0.8, 0.6]), "cort", "s1.png"),
            ImageAnnotations("s2", Instances.from_full_masks([b], classes=[2]), "cort", "s2.png"),
        ]
    )


@pytest.mark.parametrize("fmt, name", [("coco", "a.json"), ("results", "r.json"), ("csv", "a.csv"), ("labels", "lab")])
def test_save_then_load_every_format(tmp_path, fmt, name):
    src = _aset()
    out = save_annotations(src, tmp_path / name, fmt)
    assert detect_format(out) == {"coco": "coco", "results": "results", "csv": "csv", "labels": "labels"}[fmt]
    back = load_annotations(out)
    assert [im.image_id for im in back] == ["s1", "s2"]
    s, g = src.images[0].instances, back.images[0].instances
    if fmt == "labels":  # overlap resolved: the higher score (instance 0) keeps the shared pixels
        np.testing.assert_array_equal(g.to_label_image(), _resolved(s))
    else:
        for i in range(len(s)):
            np.testing.assert_array_equal(g.full_mask(i), s.full_mask(i))
    assert g.classes.tolist() == [2, 2]


def _resolved(inst):
    lab = np.zeros(inst.image_size, np.uint16)
    lab[inst.full_mask(1)] = 2
    lab[inst.full_mask(0)] = 1
    return lab


def test_format_inferred_from_path(tmp_path):
    save_annotations(_aset(), tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_text().startswith("id,annotation")
    save_annotations(_aset(), tmp_path / "x.json")
    assert "annotations" in json.loads((tmp_path / "x.json").read_text())
    save_annotations(_aset(), tmp_path / "folder")
    assert (tmp_path / "folder" / "s1_labels.tif").is_file()


def test_results_with_companion_and_bom(tmp_path):
    save_annotations(_aset(), tmp_path / "gt.json", "coco")
    (tmp_path / "none.json").write_text("[]")
    aset = load_annotations(tmp_path / "none.json", companion=tmp_path / "gt.json")
    assert [im.image_id for im in aset] == ["s1", "s2"] and all(len(im.instances) == 0 for im in aset)
    text = (tmp_path / "gt.json").read_text()
    (tmp_path / "bom.json").write_text("\ufeff" + text, encoding="utf-8")
    assert len(load_annotations(tmp_path / "bom.json")) == 2


def test_single_label_image(tmp_path):
    save_annotations(_aset(), tmp_path / "f", "labels", label_ext=".png")
    aset = load_annotations(tmp_path / "f" / "s2_labels.png")
    assert len(aset) == 1 and aset.images[0].image_id == "s2" and len(aset.images[0].instances) == 1


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_annotations(tmp_path / "nothing.json")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_annotations(tmp_path / "notes.txt")
    (tmp_path / "s.json").write_text('"just a string"')
    with pytest.raises(ValueError, match="neither a COCO"):
        load_annotations(tmp_path / "s.json")
    (tmp_path / "e.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match="empty annotation set"):
        load_annotations(tmp_path / "e.json")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ValueError, match="empty annotation set.*companion"):
        load_annotations(tmp_path / "none.json")
    with pytest.raises(ValueError, match="no images"):
        save_annotations(AnnotationSet([]), tmp_path / "o.json")
    with pytest.raises(ValueError, match="unknown annotation format 'xml'"):
        save_annotations(_aset(), tmp_path / "o.xml", "xml")
    save_annotations(_aset(), tmp_path / "ok.json")
    with pytest.raises(FileNotFoundError, match="images folder"):
        load_annotations(tmp_path / "ok.json", images_dir=tmp_path / "noimages")


@pytest.mark.parametrize("fmt, name", [("coco", "a.json"), ("csv", "a.csv"), ("labels", "lab")])
def test_size_disagreeing_with_images(tmp_path, fmt, name):
    out = save_annotations(_aset(), tmp_path / name, fmt)
    imgs = tmp_path / "images"
    imgs.mkdir()
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(imgs / "s1.png")
    assert len(load_annotations(out, images_dir=imgs)) == 2
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(imgs / "s2.png")
    with pytest.raises(ValueError, match=r"8 x 9.*s2\.png is 9 x 8"):
        load_annotations(out, images_dir=imgs)


@pytest.mark.parametrize("fmt, name", [("coco", "a.json"), ("csv", "a.csv"), ("labels", "lab")])
def test_several_image_folders(tmp_path, fmt, name):
    out = save_annotations(_aset(), tmp_path / name, fmt)
    first, second = tmp_path / "plate1", tmp_path / "plate2"
    first.mkdir()
    second.mkdir()
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(first / "s1.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(second / "s2.png")  # wrong size, in the 2nd folder
    with pytest.raises(ValueError, match=r"s2\.png is 9 x 8"):
        load_annotations(out, images_dir=[first, second])
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(second / "s2.png")
    assert len(load_annotations(out, images_dir=[first, str(second)])) == 2
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_annotations(out, images_dir=[first, tmp_path / "nowhere"])


def test_real_coco_and_csv_agree(real_data):
    images = real_data / "images" if (real_data / "images").is_dir() else None
    coco = load_annotations(real_data / "coco.json", images_dir=images)
    csv = load_annotations(real_data / "train.csv", images_dir=images)
    assert [im.image_id for im in coco] == [im.image_id for im in csv]
    assert len(coco) == 3 and sum(len(im.instances) for im in coco) == 71
    assert sum(len(im.instances) for im in csv) == 71
    for c, k in zip(coco, csv):
        assert c.cell_type == k.cell_type == "cort"
        assert c.instances.image_size == k.instances.image_size == (520, 704)
        assert set(c.instances.classes.tolist()) == set(k.instances.classes.tolist()) == {2}
        for i in range(len(c.instances)):
            np.testing.assert_array_equal(c.instances.full_mask(i), k.instances.full_mask(i))
    assert coco.category_ids["cort"] == 3


def test_io_modules_do_not_import_gui_or_torch():
    code = (
        "import sys, napari_sartorius.io as io, napari_sartorius.io.coco, napari_sartorius.io.label_images;"
        "bad=[m for m in ('napari','qtpy','magicgui','PyQt5','torch') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
