"""AnnotationSet keys: an image id survives a round trip through a file name, dots included."""

import numpy as np
import pytest

from napari_sartorius.annotations import FILE_SUFFIXES, AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.io import load_annotations, save_annotations
from napari_sartorius.io.images import IMAGE_EXTENSIONS


@pytest.mark.parametrize(
    "name, key",
    [
        ("abc.png", "abc"),
        ("abc.TIF", "abc"),
        ("img.v2", "img.v2"),
        ("img.v2.png", "img.v2"),
        ("run.2024.01_labels.tif", "run.2024.01"),
        ("sub/dir/x.y.jpeg", "x.y"),
        ("plain", "plain"),
    ],
)
def test_key_for_strips_only_image_extensions(name, key):
    assert AnnotationSet.key_for(name) == key


def test_the_extensions_agree_with_the_image_reader():
    assert FILE_SUFFIXES == IMAGE_EXTENSIONS


@pytest.mark.parametrize("fmt, name", [("coco", "a.json"), ("csv", "a.csv"), ("labels", "labels")])
def test_an_image_id_with_a_dot_round_trips(tmp_path, fmt, name):
    mask = np.zeros((8, 9), bool)
    mask[2:5, 3:7] = True
    inst = Instances.from_label_image(mask.astype(np.int32))
    aset = AnnotationSet([ImageAnnotations("plate1.well.A1", inst, cell_type="cort")])
    out = save_annotations(aset, tmp_path / name, fmt)
    back = load_annotations(out if fmt != "labels" else tmp_path / name)
    assert [im.image_id for im in back] == ["plate1.well.A1"]
