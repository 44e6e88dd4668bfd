import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.io.coco import (
    annotation_set_to_coco,
    annotation_set_to_results,
    category_ids_for,
    coco_to_annotation_set,
    read_coco,
    read_coco_results,
    results_to_annotation_set,
    write_coco,
    write_coco_results,
)


def _full(shape, ys, xs):
    m = np.zeros(shape, bool)
    m[ys, xs] = True
    return m


def _aset(scores=(1.0, 1.0, 1.0)):
    h, w = 10, 12
    a = [_full((h, w), slice(1, 5), slice(1, 6)), _full((h, w), slice(3, 9), slice(4, 10))]  # overlap
    b = [_full((h, w), slice(0, 2), slice(0, 12))]
    return AnnotationSet(
        [
            ImageAnnotations("img_a", Instances.from_full_masks(a, classes=[0, 1], scores=scores[:2]), "shsy5y", "img_a.png"),
            ImageAnnotations("img_b", Instances.from_full_masks(b, classes=[2], scores=scores[2:]), "cort", "img_b.tif"),
            ImageAnnotations("img_c", Instances.empty((h, w)), None, "img_c.png"),
        ]
    )


def _same_masks(x: Instances, y: Instances):
    assert len(x) == len(y) and x.image_size == y.image_size
    for i in range(len(x)):
        np.testing.assert_array_equal(x.full_mask(i), y.full_mask(i))


def test_instance_dict_layout():
    d = annotation_set_to_coco(_aset())
    json.dumps(d)  # serialisable
    assert [im["file_name"] for im in d["images"]] == ["img_a.png", "img_b.tif", "img_c.png"]
    assert d["images"][0] == {"id": 1, "file_name": "img_a.png", "height": 10, "width": 12, "cell_type": "shsy5y"}
    assert d["categories"] == [
        {"id": 1, "name": "shsy5y", "supercategory": "cell"},
        {"id": 2, "name": "astro", "supercategory": "cell"},
        {"id": 3, "name": "cort", "supercategory": "cell"},
    ]
    a0 = d["annotations"][0]
    assert a0["id"] == 1 and a0["image_id"] == 1 and a0["category_id"] == 1 and a0["iscrowd"] == 0
    assert a0["area"] == 20 and a0["bbox"] == [1.0, 1.0, 5.0, 4.0]
    assert isinstance(a0["segmentation"]["counts"], str)
    assert "score" not in a0  # annotations: all scores 1
    rle = dict(a0["segmentation"], counts=a0["segmentation"]["counts"].encode())
    assert mask_utils.area(rle) == 20 and mask_utils.toBbox(rle).tolist() == a0["bbox"]


def test_overlapping_instances_survive_roundtrip(tmp_path):
    src = _aset(scores=(0.9, 0.3, 0.7))
    p = tmp_path / "c.json"
    write_coco(src, p)
    back = read_coco(p)
    assert [im.image_id for im in back] == ["img_a", "img_b", "img_c"]
    assert [im.file_name for im in back] == ["img_a.png", "img_b.tif", "img_c.png"]
    for s, g in zip(src, back):
        _same_masks(s.instances, g.instances)
        np.testing.assert_array_equal(s.instances.classes, g.instances.classes)
        np.testing.assert_allclose(s.instances.scores, g.instances.scores)
        np.testing.assert_array_equal(s.instances.boxes, g.instances.boxes)
        assert s.cell_type == g.cell_type
    assert back.category_ids == {"shsy5y": 1, "astro": 2, "cort": 3}


def test_other_category_names_and_ids_are_kept():
    d = {
        "images": [{"id": 7, "file_name": "sub/x.png", "height": 4, "width": 4}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 20, "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3]]},
            {"id": 2, "image_id": 7, "category_id": 10, "segmentation": {"size": [4, 4], "counts": [5, 2, 9]}},
        ],
        "categories": [{"id": 20, "name": "neuron"}, {"id": 10, "name": "glia"}],
    }
    aset = coco_to_annotation_set(d)
    assert aset.class_names == ("neuron", "glia")
    assert aset.category_ids == {"neuron": 20, "glia": 10}
    im = aset.images[0]
    assert im.image_id == "x" and im.file_name == "sub/x.png"
    assert im.instances.classes.tolist() == [0, 1]
    assert im.instances.full_mask(1).sum() == 2  # uncompressed counts
    out = annotation_set_to_coco(aset)
    assert [(c["id"], c["name"]) for c in out["categories"]] == [(20, "neuron"), (10, "glia")]
    assert [a["category_id"] for a in out["annotations"]] == [20, 10]
    with pytest.raises(ValueError, match="unknown categories 'neuron'"):
        coco_to_annotation_set(d, class_names=("glia",))


def test_subset_of_sartorius_types_keeps_default_indices():
    d = {"images": [{"id": 1, "file_name": "a.png", "height": 3, "width": 3}],
         "annotations": [{"image_id": 1, "category_id": 3, "segmentation": {"size": [3, 3], "counts": [0, 1, 8]}}],
         "categories": [{"id": 3, "name": "cort"}]}
    aset = coco_to_annotation_set(d)
    assert aset.class_names == ("shsy5y", "astro", "cort")
    assert aset.images[0].instances.classes.tolist() == [2] and aset.images[0].cell_type == "cort"


def test_stringified_rle_and_missing_categories():
    m = _full((5, 6), slice(1, 3), slice(2, 4))
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    seg = str({"size": [5, 6], "counts": rle["counts"].decode()})
    d = {"images": [{"id": 1, "file_name": "q.png", "height": 5, "width": 6}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": seg}]}
    aset = coco_to_annotation_set(d)
    np.testing.assert_array_equal(aset.images[0].instances.full_mask(0), m)
    assert aset.images[0].instances.classes.tolist() == [1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["annotations"][0].update(category_id=9), "unknown category_id 9"),
        (lambda d: d["annotations"][0].update(image_id=5), "missing from 'images'"),
        (lambda d: d["annotations"][0].update(segmentation={"size": [4, 4], "counts": [16]}), "disagrees"),
        (lambda d: d["annotations"][0].update(segmentation={"size": [5, 6], "counts": [20, 20]}), "past the image"),
        (lambda d: d["annotations"][0].update(segmentation="garbage"), "cannot parse"),
        (lambda d: d["images"].append({"id": 2, "file_name": "q.tif", "height": 5, "width": 6}), "share the key"),
        (lambda d: d["images"][0].pop("height"), "no height/width"),
        (lambda d: d.pop("images"), "not a COCO instance file"),
    ],
)
def test_instance_file_errors(change, message):
    d = {"images": [{"id": 1, "file_name": "q.png", "height": 5, "width": 6}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2]]}],
         "categories": [{"id": 1, "name": "shsy5y"}]}
    change(d)
    with pytest.raises(ValueError, match=message):
        coco_to_annotation_set(d)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.json"):
        read_coco(tmp_path / "none.json")
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        read_coco(p)


def test_results_roundtrip_with_companion_and_file_names(tmp_path):
    pred = _aset(scores=(0.9, 0.3, 0.7))
    ids = {"img_a": 11, "img_b": 12, "img_c": 13}
    res = annotation_set_to_results(pred, ids)
    assert len(res) == 3
    assert set(res[0]) == {"image_id", "category_id", "segmentation", "score", "bbox", "area", "file_name"}
    assert res[0]["image_id"] == 11 and res[0]["file_name"] == "img_a.png"
    assert res[1]["score"] == pytest.approx(0.3)
    # self-describing: names from the file_name keys, sizes from the RLE
    back = results_to_annotation_set(res)
    assert [im.image_id for im in back] == ["img_a", "img_b"]  # img_c has no results
    for s, g in zip(pred, back):
        _same_masks(s.instances, g.instances)
        np.testing.assert_allclose(s.instances.scores, g.instances.scores)
    # with a companion instance file: names, sizes and empty images from it
    gt = annotation_set_to_coco(_aset(), image_ids=ids)
    plain = [{k: v for k, v in r.items() if k != "file_name"} for r in res]
    back = results_to_annotation_set(plain, companion=gt)
    assert [im.image_id for im in back] == ["img_a", "img_b", "img_c"]
    assert len(back.images[2].instances) == 0 and back.images[2].instances.image_size == (10, 12)
    # no names at all: keys are the ids
    assert [im.image_id for im in results_to_annotation_set(plain)] == ["11", "12"]
    with pytest.raises(ValueError, match="no COCO image id for image 'img_c'"):
        annotation_set_to_results(pred, {"img_a": 1, "img_b": 2})


def test_results_files(tmp_path):
    pred = _aset(scores=(0.9, 0.3, 0.7))
    write_coco(_aset(), tmp_path / "gt.json")
    write_coco_results(pred, tmp_path / "pred.json")
    back = read_coco_results(tmp_path / "pred.json", companion=tmp_path / "gt.json")
    assert [im.image_id for im in back] == ["img_a", "img_b", "img_c"]
    assert read_coco(tmp_path / "pred.json").images[0].image_id == "img_a"  # list detected
    with pytest.raises(ValueError, match="unknown category_id"):
        results_to_annotation_set([{"image_id": 1, "category_id": 99, "segmentation": {"size": [2, 2], "counts": [4]}}])
    with pytest.raises(ValueError, match="size is unknown"):
        results_to_annotation_set([{"image_id": 1, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]}])


def test_pycocotools_eval_accepts_our_files():
    gt_set = _aset()
    gt = annotation_set_to_coco(gt_set)
    ids = {im["file_name"].rsplit(".", 1)[0]: im["id"] for im in gt["images"]}
    res = annotation_set_to_results(_aset(scores=(0.9, 0.8, 0.7)), ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(res)
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # predictions equal to the truth: AP 1


def test_category_ids_for():
    assert category_ids_for(("shsy5y", "astro", "cort")) == {"shsy5y": 1, "astro": 2, "cort": 3}
    assert category_ids_for(("cort", "x")) == {"cort": 3, "x": 4}
    assert category_ids_for(("a", "b"), {"b": 1}) == {"b": 1, "a": 2}
    assert category_ids_for(("shsy5y", "y"), {"y": 1}) == {"y": 1, "shsy5y": 2}


def test_empty_masks_are_left_out_and_empty_set_refused(tmp_path):
    inst = Instances(image_size=(3, 3), boxes=[[0, 0, 1, 1]], scores=[1], classes=[0],
                     masks=[np.full((1, 1), 0.2, np.float32)], mask_origins=[[0, 0]])
    d = annotation_set_to_coco(AnnotationSet([ImageAnnotations("e", inst)]))
    assert d["annotations"] == [] and len(d["images"]) == 1
    with pytest.raises(ValueError, match="no images"):
        write_coco(AnnotationSet([]), tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
