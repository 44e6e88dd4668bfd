import json
import math
import time

import numpy as np
import pytest

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.metrics import (
    IOU_THRESHOLDS,
    EvaluationResult,
    competition_score,
    evaluate,
    match_counts,
    sparse_ious,
)



def rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def labels_of(*masks, shape=(40, 50)):
    out = np.zeros(shape, np.int32)
    for k, m in enumerate(masks, start=1):
        out[m] = k
    return out


def test_thresholds_are_the_competition_ones():
    assert IOU_THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_perfect_prediction_scores_one():
    s = (40, 50)
    gt = labels_of(rect(s, 2, 10, 2, 10), rect(s, 20, 30, 20, 35))
    pred = np.where(gt == 1, 7, np.where(gt == 2, 3, 0))  # other ids, same cells
    assert competition_score(pred, gt) == 1.0


def test_one_of_two_cells_missed_scores_half():
    s = (40, 50)
    gt = labels_of(rect(s, 2, 10, 2, 10), rect(s, 20, 30, 20, 35))
    pred = labels_of(rect(s, 2, 10, 2, 10))
    mc = match_counts(pred, gt)
    assert mc.tp.tolist() == [1] * 10 and mc.fn.tolist() == [1] * 10 and mc.fp.tolist() == [0] * 10
    assert competition_score(pred, gt) == pytest.approx(0.5)


def test_iou_exactly_on_a_threshold_is_not_a_match():
    # gt 10x20 = 200 px, prediction its 10x15 part: IoU = 150 / 200 = 0.75 exactly.
    s = (40, 50)
    gt = labels_of(rect(s, 5, 15, 5, 25))
    pred = labels_of(rect(s, 5, 15, 5, 20))
    _, _, iou, _, _ = sparse_ious(pred, gt)
    assert iou.tolist() == [0.75]
    mc = match_counts(pred, gt)
    # matched for t = 0.50 .. 0.70 (five thresholds); at 0.75 and above 1 FP + 1 FN
    assert mc.tp.tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert mc.per_threshold.tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert competition_score(pred, gt) == pytest.approx(0.5)


def test_shifted_mask_iou_0_739():
    # 10x20 rectangles shifted by 3 columns: IoU = 170 / 230 = 0.739 -> TP for t < 0.739 only
    s = (40, 50)
    gt = labels_of(rect(s, 5, 15, 5, 25))
    pred = labels_of(rect(s, 5, 15, 8, 28))
    _, _, iou, _, _ = sparse_ious(pred, gt)
    assert iou[0] == pytest.approx(170 / 230)
    mc = match_counts(pred, gt)
    assert mc.tp.tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    # add a correct second cell: at t >= 0.75, TP=1 FP=1 FN=1 -> 1/3
    gt2 = gt.copy()
    gt2[rect(s, 25, 35, 30, 40)] = 2
    pred2 = pred.copy()
    pred2[rect(s, 25, 35, 30, 40)] = 9
    assert competition_score(pred2, gt2) == pytest.approx((5 * 1.0 + 5 * (1 / 3)) / 10)


def test_empty_cases():
    s = (20, 20)
    empty = np.zeros(s, np.uint16)
    one = labels_of(rect(s, 2, 8, 2, 8), shape=s)
    assert competition_score(empty, empty) == 1.0
    assert competition_score(one, empty) == 0.0
    assert competition_score(empty, one) == 0.0
    assert competition_score(Instances.empty(s), Instances.empty(s)) == 1.0


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="image size"):
        competition_score(np.zeros((10, 10), int), np.zeros((10, 11), int))


def test_non_consecutive_and_huge_ids():
    s = (30, 30)
    gt = labels_of(rect(s, 0, 10, 0, 10), rect(s, 15, 25, 15, 25), shape=s)
    pred = np.zeros(s, np.int64)
    pred[gt == 1] = 10**12
    pred[gt == 2] = 5
    assert competition_score(pred, gt) == 1.0
    with pytest.raises(ValueError, match="2-D"):
        competition_score(np.zeros((2, 3, 3), int), np.zeros((2, 3, 3), int))


def test_overlapping_predictions_higher_score_wins():
    s = (30, 40)
    a = rect(s, 5, 15, 5, 15)
    b = rect(s, 5, 15, 10, 20)  # overlaps a's right half
    gt = labels_of(b, shape=s)
    pred = Instances.from_full_masks([a, b], scores=[0.3, 0.9])
    # b wins the overlap, stays whole -> matches gt; a is left with 50 px -> one FP
    mc = match_counts(pred, gt)
    assert mc.tp.tolist() == [1] * 10 and mc.fp.tolist() == [1] * 10
    pred_low = Instances.from_full_masks([a, b], scores=[0.9, 0.3])
    # now a wins; b keeps 50 of 100 px, IoU with gt 0.5 -> not > 0.5 -> no match at all
    assert match_counts(pred_low, gt).tp.tolist() == [0] * 10


def test_overlapping_ground_truth_ious_are_exact():
    s = (30, 40)
    a = rect(s, 5, 15, 5, 15)
    b = rect(s, 5, 15, 10, 20)
    gt = Instances.from_full_masks([a, b])
    pred = labels_of(b, shape=s)
    pi, gi, iou, n_p, n_g = sparse_ious(pred, gt)
    assert (n_p, n_g) == (1, 2)
    got = dict(zip(gi.tolist(), iou.tolist()))
    assert got[1] == pytest.approx(1.0)  # b matched exactly, despite overlapping a
    assert got[0] == pytest.approx(50 / 150)
    assert competition_score(pred, gt) == pytest.approx(0.5)


def test_matching_is_one_to_one_below_half():
    # with a 0.3 threshold one prediction could match two gts; it may take only one
    s = (20, 30)
    g1, g2 = rect(s, 0, 10, 0, 10), rect(s, 0, 10, 10, 20)
    gt = labels_of(g1, g2, shape=s)
    pred = labels_of(rect(s, 0, 10, 2, 18), shape=s)  # IoU 80/180 with each... 0.44 and 0.44
    mc = match_counts(pred, gt, thresholds=np.array([0.3]))
    assert mc.tp.tolist() == [1] and mc.fn.tolist() == [1] and mc.fp.tolist() == [0]


def test_dense_image_is_fast():
    # ~800 cells of 8x8 on a 520x704 image, predictions shifted by one pixel
    rng = np.random.default_rng(0)
    gt = np.zeros((520, 704), np.int32)
    k = 0
    for y in range(0, 512, 16):
        for x in range(0, 696, 28):
            k += 1
            gt[y : y + 8, x : x + 8 + int(rng.integers(0, 6))] = k
    pred = np.zeros_like(gt)
    pred[:, 1:] = gt[:, :-1]
    t0 = time.perf_counter()
    s = competition_score(pred, gt)
    assert time.perf_counter() - t0 < 1.0
    assert k > 700 and 0 < s < 1


def _aset(images, class_names=("shsy5y", "astro", "cort")):
    return AnnotationSet(images=images, class_names=class_names)


def _cells(shape, rects, scores=None, cls=0):
    masks = [rect(shape, *r) for r in rects]
    n = len(masks)
    return Instances.from_full_masks(masks, image_size=shape, scores=scores, classes=[cls] * n)


def test_evaluate_per_class_and_missing():
    s = (40, 50)
    r = [(2, 10, 2, 10), (20, 30, 20, 35)]
    gt = _aset(
        [
            ImageAnnotations("a", _cells(s, r), cell_type="shsy5y"),
            ImageAnnotations("b", _cells(s, r, cls=2)),  # type from majority class: cort
            ImageAnnotations("c", _cells(s, r, cls=1), cell_type="astro"),
        ]
    )
    pred = _aset(
        [
            ImageAnnotations("a", _cells(s, r, scores=[0.9, 0.8])),  # perfect
            ImageAnnotations("b", _cells(s, r[:1], scores=[0.9])),  # one of two -> 0.5
            ImageAnnotations("zz", _cells(s, r, scores=[0.9, 0.8])),  # no gt
        ]
    )
    res = evaluate(pred, gt, coco=False)
    assert isinstance(res, EvaluationResult)
    assert res.per_image == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert res.per_class == {"shsy5y": 1.0, "astro": 0.0, "cort": 0.5}
    assert res.score == pytest.approx(0.5)
    assert res.missing == ["c"] and res.extra == ["zz"] and res.n_images == 3
    d = res.to_dict()
    assert set(d) == {"score", "per_class", "coco_ap", "n_images", "notes"}
    assert d["notes"] == ["1 image(s) without predictions (scored 0): c",
                          "1 predicted image(s) without ground truth ignored: zz"]
    json.dumps(d)
    text = res.format()
    assert "0.5000" in text and "cort" in text and all(note in text for note in d["notes"])
    assert evaluate(gt, gt, coco=False).to_dict()["notes"] == []


def test_evaluate_errors():
    s = (40, 50)
    gt = _aset([ImageAnnotations("img1", _cells(s, [(2, 10, 2, 10)]))])
    with pytest.raises(ValueError, match="ground-truth"):
        evaluate(gt, _aset([]))
    with pytest.raises(ValueError, match="prediction set"):
        evaluate(_aset([]), gt)
    bad = _aset([ImageAnnotations("img1", _cells((41, 50), [(2, 10, 2, 10)]))])
    with pytest.raises(ValueError, match="img1"):
        evaluate(bad, gt, coco=False)


def test_to_dict_turns_nan_into_none():
    res = EvaluationResult(0.5, {"cort": 0.5}, {"x": 0.5}, {"AP": math.nan}, 1)
    assert res.to_dict()["coco_ap"] == {"AP": None}
    assert res.to_dict(details=True)["per_image"] == {"x": 0.5}


def test_coco_ap_perfect_and_degraded():
    s = (60, 80)
    r = [(2, 12, 2, 12), (20, 30, 20, 35), (40, 55, 50, 70), (5, 15, 40, 52)]
    gt = _aset([ImageAnnotations("a", _cells(s, r, cls=2), cell_type="cort", file_name="a.png")])
    perfect = _aset([ImageAnnotations("a", _cells(s, r, scores=[0.9, 0.8, 0.7, 0.6], cls=2))])
    res = evaluate(perfect, gt)
    assert res.coco_ap["AP"] == pytest.approx(1.0)
    assert res.coco_ap["AP50"] == pytest.approx(1.0) and res.coco_ap["AP75"] == pytest.approx(1.0)
    # shift two cells by three columns and drop one: AP falls
    worse = [(2, 12, 5, 15), (20, 30, 23, 38), (40, 55, 50, 70)]
    degraded = _aset([ImageAnnotations("a", _cells(s, worse, scores=[0.9, 0.8, 0.7], cls=2))])
    res2 = evaluate(degraded, gt)
    assert res2.coco_ap["AP"] < 0.9 and res2.coco_ap["AP50"] < 1.0 + 1e-9
    assert res2.coco_ap["AP"] < res.coco_ap["AP"]
    # no predictions at all for the image: AP 0
    empty = _aset([ImageAnnotations("a", Instances.empty(s))])
    assert evaluate(empty, gt).coco_ap["AP"] == 0.0


def test_real_ground_truth_against_itself_scores_one(real_data):
    from napari_sartorius.io.coco import read_coco

    gt = read_coco(real_data / "coco.json")
    assert len(gt) == 3
    res = evaluate(gt, gt)
    assert res.score == pytest.approx(1.0)
    assert res.per_class == {"cort": pytest.approx(1.0)}
    assert res.coco_ap["AP"] == pytest.approx(1.0)


def test_sparse_contingency_path_agrees(monkeypatch):
    import napari_sartorius.metrics as metrics

    rng = np.random.default_rng(3)
    gt = rng.integers(0, 40, size=(60, 70))
    pred = np.zeros_like(gt)
    pred[:, 1:] = gt[:, :-1]
    dense = match_counts(pred, gt)
    _, _, iou_dense, _, _ = sparse_ious(pred, gt)
    monkeypatch.setattr(metrics, "_DENSE_TABLE_LIMIT", 0)
    sparse = match_counts(pred, gt)
    _, _, iou_sparse, _, _ = sparse_ious(pred, gt)
    assert np.allclose(np.sort(iou_dense), np.sort(iou_sparse))
    assert dense.tp.tolist() == sparse.tp.tolist() and dense.fp.tolist() == sparse.fp.tolist()


def _dense_pair(seed):
    """A synthetic SH-SY5Y-style image's truth and the weight-free engine's scored predictions."""
    from napari_sartorius.classical import ClassicalEngine
    from napari_sartorius.synthetic import make_sample

    s = make_sample("shsy5y", seed=seed, shape=(160, 200))
    pred = ImageAnnotations("x", ClassicalEngine().predict(s.image), cell_type="shsy5y")
    return _aset([pred]), _aset([s.to_annotations("x")])


@pytest.mark.parametrize("seed", [0, 1])
def test_faster_coco_eval_agrees_with_pycocotools(seed):
    pytest.importorskip("faster_coco_eval")
    from napari_sartorius.coco_eval import coco_mask_ap

    pred, gt = _dense_pair(seed)
    ref = coco_mask_ap(pred, gt, backend="pycocotools")
    fast = coco_mask_ap(pred, gt, backend="faster")
    assert 0.0 < ref["AP"] < 1.0
    assert fast == pytest.approx(ref, abs=1e-9)
    assert coco_mask_ap(pred, gt) == pytest.approx(ref, abs=1e-9)  # auto


def test_coco_backend_choice(monkeypatch):
    import sys

    from napari_sartorius.coco_eval import _coco_backend

    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        _coco_backend("fastest")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    assert _coco_backend("auto")[1].__module__ == "pycocotools.cocoeval"
    with pytest.raises(ImportError, match="faster-coco-eval"):
        _coco_backend("faster")
