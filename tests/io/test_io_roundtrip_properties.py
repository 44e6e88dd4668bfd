"""Property-based round trips: random label images and instances through every format and back."""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.io.coco import (
    annotation_set_to_coco,
    annotation_set_to_results,
    coco_to_annotation_set,
    results_to_annotation_set,
)
from napari_sartorius.io.kaggle_csv import read_kaggle_csv, write_kaggle_csv
from napari_sartorius.io.label_images import (
    labels_to_instances,
    read_label_image,
    read_label_images,
    write_label_image,
    write_label_images,
)
from napari_sartorius.io.rle import (
    coco_rle_to_mask,
    mask_to_coco_rle,
    rle_decode,
    rle_decode_crop,
    rle_encode,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def label_images(draw, max_h=40, max_w=50):
    """Non-overlapping instances as a label image (H, W) with arbitrary, gappy ids.

    Pixels are drawn from a few values, so instances are ragged and may be disconnected: many runs.
    """
    h = draw(st.integers(1, max_h))
    w = draw(st.integers(1, max_w))
    n = draw(st.integers(0, 8))
    small = draw(hnp.arrays(np.uint8, (h, w), elements=st.integers(0, n)))
    ids = draw(st.lists(st.integers(1, 70000), min_size=n, max_size=n, unique=True))
    table = np.array([0] + sorted(ids), np.uint32)
    return table[small]


def _compact(labels):
    """The label image the readers give back: ids 1..N in increasing order of the original ids."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    return np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0).astype(np.int64)


def _aset(labels, cell_type="astro"):
    inst, _ = labels_to_instances(labels, classes=1)
    return AnnotationSet([ImageAnnotations("img", inst, cell_type, "img.png")])


@st.composite
def masks(draw, max_h=40, max_w=50):
    h = draw(st.integers(1, max_h))
    w = draw(st.integers(1, max_w))
    return draw(hnp.arrays(bool, (h, w)))


@SETTINGS
@given(masks())
def test_kaggle_rle_decode_encode(m):
    rle = rle_encode(m)
    np.testing.assert_array_equal(rle_decode(rle, m.shape), m)
    crop, (y0, x0) = rle_decode_crop(rle, m.shape)
    full = np.zeros_like(m)
    full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    np.testing.assert_array_equal(full, m)


@SETTINGS
@given(masks())
def test_coco_rle_decode_encode(m):
    np.testing.assert_array_equal(coco_rle_to_mask(mask_to_coco_rle(m)), m)


@SETTINGS
@given(label_images())
def test_label_image_through_kaggle_csv(labels):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.csv"
        write_kaggle_csv(_aset(labels), p)
        back = read_kaggle_csv(p)
    inst = back.images[0].instances
    assert inst.image_size == labels.shape
    np.testing.assert_array_equal(inst.to_label_image(), _compact(labels))
    assert back.images[0].cell_type == "astro"
    assert (inst.classes == 1).all()


@SETTINGS
@given(label_images())
def test_label_image_through_coco(labels):
    back = coco_to_annotation_set(annotation_set_to_coco(_aset(labels)))
    inst = back.images[0].instances
    np.testing.assert_array_equal(inst.to_label_image(), _compact(labels))
    np.testing.assert_array_equal(inst.boxes, _aset(labels).images[0].instances.boxes)


@SETTINGS
@given(label_images())
def test_label_image_through_label_files(labels):
    with tempfile.TemporaryDirectory() as d:
        for ext in (".tif", ".png") if labels.max() <= 65535 else (".tif",):
            p = write_label_image(labels, Path(d) / f"one{ext}")
            np.testing.assert_array_equal(read_label_image(p), labels)  # ids kept exactly
        write_label_images(_aset(labels), Path(d) / "set")
        back = read_label_images(Path(d) / "set")
    inst = back.images[0].instances
    np.testing.assert_array_equal(inst.to_label_image(), _compact(labels))
    assert (inst.classes == 1).all() and back.images[0].cell_type == "astro"


@st.composite
def overlapping_instances(draw):
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 50))
    n = draw(st.integers(1, 6))
    crops, origins, scores, classes = [], [], [], []
    for _ in range(n):
        y0 = draw(st.integers(0, h - 1))
        x0 = draw(st.integers(0, w - 1))
        ch = draw(st.integers(1, h - y0))
        cw = draw(st.integers(1, w - x0))
        crop = draw(hnp.arrays(bool, (ch, cw)))
        if not crop.any():
            crop[draw(st.integers(0, ch - 1)), draw(st.integers(0, cw - 1))] = True
        crops.append(crop.astype(np.float32))
        origins.append((y0, x0))
        scores.append(draw(st.floats(0.0, 1.0, width=32)))
        classes.append(draw(st.integers(0, 2)))
    return Instances(
        image_size=(h, w), boxes=np.zeros((n, 4)), scores=scores, classes=classes,
        masks=crops, mask_origins=origins,
    )


@SETTINGS
@given(overlapping_instances())
def test_overlapping_instances_survive_coco_and_results(inst):
    aset = AnnotationSet([ImageAnnotations("o", inst, None, "o.tif")])
    for back in (
        coco_to_annotation_set(annotation_set_to_coco(aset)),
        results_to_annotation_set(annotation_set_to_results(aset, {"o": 5})),
    ):
        got = back.images[0].instances
        assert back.images[0].image_id == "o" and len(got) == len(inst)
        for i in range(len(inst)):
            np.testing.assert_array_equal(got.full_mask(i), inst.full_mask(i))
        np.testing.assert_array_equal(got.classes, inst.classes)
        np.testing.assert_array_equal(got.scores, inst.scores)
