import numpy as np
import pytest

from napari_sartorius.instances import Instances
from napari_sartorius.inference.ensemble import (
    CONF_TYPES,
    METHODS,
    box_iou_pairs,
    fuse_instances,
    mask_iou,
)

SIZE = (100, 140)


def make(boxes, scores=None, classes=None, masks=None, origins=None, size=SIZE) -> Instances:
    """Instances whose masks default to a filled crop over each (integer-rounded) box."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    if masks is None:
        masks, origins = [], []
        for x0, y0, x1, y1 in boxes:
            y0i, x0i = int(np.floor(y0)), int(np.floor(x0))
            y1i, x1i = max(int(np.ceil(y1)), y0i + 1), max(int(np.ceil(x1)), x0i + 1)
            masks.append(np.ones((y1i - y0i, x1i - x0i), np.float32))
            origins.append((y0i, x0i))
    return Instances(
        image_size=size,
        boxes=boxes,
        scores=np.full(n, 0.9) if scores is None else scores,
        classes=np.zeros(n) if classes is None else classes,
        masks=masks,
        mask_origins=np.asarray(origins, np.int64).reshape(-1, 2),
    )


def random_sources(seed, n_sources=3, n_cells=12, size=SIZE):
    rng = np.random.default_rng(seed)
    h, w = size
    centres = rng.uniform([10, 10], [w - 10, h - 10], (n_cells, 2))
    radius = rng.uniform(4, 9, n_cells)
    cell_class = rng.integers(0, 2, n_cells)
    out = []
    for _ in range(n_sources):
        seen = rng.random(n_cells) < 0.85
        extra = rng.integers(0, n_cells, 3)  # duplicate candidates within one source
        idx = np.concatenate([np.flatnonzero(seen), extra])
        c, r = centres[idx], radius[idx]
        boxes = np.concatenate([c - r[:, None], c + r[:, None]], axis=1) + rng.normal(0, 1.2, (len(idx), 4))
        boxes = np.clip(boxes, 0, [w, h, w, h])
        out.append(make(boxes, scores=rng.uniform(0.05, 1.0, len(idx)), classes=cell_class[idx]))
    return out


def package_inputs(sources):
    h, w = SIZE
    norm = np.array([w, h, w, h], np.float64)
    return (
        [s.boxes.astype(np.float64) / norm for s in sources],
        [s.scores.astype(np.float64) for s in sources],
        [s.classes.astype(np.float64) for s in sources],
    )


def by_score(boxes, scores, labels):
    order = np.lexsort((boxes[:, 0], -np.round(scores, 6)))
    return boxes[order], scores[order], labels[order]


def assert_matches_package(ours: Instances, boxes, scores, labels, score_tol=1e-5):
    h, w = SIZE
    boxes = np.asarray(boxes) * np.array([w, h, w, h])
    assert len(ours) == len(boxes)
    b1, s1, l1 = by_score(ours.boxes.astype(np.float64), ours.scores.astype(np.float64), ours.classes)
    b2, s2, l2 = by_score(boxes, np.asarray(scores), np.asarray(labels))
    np.testing.assert_allclose(s1, s2, atol=score_tol)
    np.testing.assert_allclose(b1, b2, atol=2e-3)
    np.testing.assert_array_equal(l1, l2.astype(np.int64))


@pytest.mark.parametrize("conf_type", CONF_TYPES)
@pytest.mark.parametrize("weights", [None, [2.0, 1.0, 0.5]])
def test_wbf_matches_the_ensemble_boxes_package(conf_type, weights):
    from ensemble_boxes import weighted_boxes_fusion

    for seed in range(4):
        sources = random_sources(seed)
        ours = fuse_instances(sources, weights, "wbf", iou_thr=0.55, skip_box_thr=0.1, conf_type=conf_type)
        ref = weighted_boxes_fusion(
            *package_inputs(sources), weights=weights, iou_thr=0.55, skip_box_thr=0.1, conf_type=conf_type
        )
        assert_matches_package(ours, *ref)


@pytest.mark.parametrize("weights", [None, [2.0, 1.0, 0.5]])
def test_nmw_matches_the_ensemble_boxes_package(weights):
    from ensemble_boxes import non_maximum_weighted

    for seed in range(4):
        sources = random_sources(seed)
        ours = fuse_instances(sources, weights, "nmw", iou_thr=0.5, skip_box_thr=0.05)
        ref = non_maximum_weighted(*package_inputs(sources), weights=weights, iou_thr=0.5, skip_box_thr=0.05)
        assert_matches_package(ours, *ref)


def test_nms_and_soft_nms_keep_what_the_reference_implementations_keep():
    # NMS against torchvision's batched_nms (same rule: suppress IoU > thr, per class); the
    # package's NMS would cost a numba compilation of several seconds in every test run
    import torch
    from ensemble_boxes import soft_nms
    from torchvision.ops import batched_nms

    for seed in range(4):
        sources = random_sources(seed)
        ours = fuse_instances(sources, None, "nms", iou_thr=0.5)
        allin = Instances.cat(sources)
        keep = batched_nms(
            torch.from_numpy(allin.boxes.astype(np.float64)),
            torch.from_numpy(allin.scores.astype(np.float64)),
            torch.from_numpy(allin.classes),
            0.5,
        ).numpy()
        h, w = SIZE
        norm = np.array([w, h, w, h])
        assert_matches_package(ours, allin.boxes[keep] / norm, allin.scores[keep], allin.classes[keep])
        for method, linear in (("gaussian", False), ("linear", True)):
            ours = fuse_instances(
                sources, None, "soft_nms", iou_thr=0.3, sigma=0.1, soft_nms_thr=0.2, soft_nms_method=method
            )
            boxes, scores, labels = soft_nms(
                *package_inputs(sources), method=1 if linear else 2, iou_thr=0.3, sigma=0.1, thresh=0.2
            )
            h, w = SIZE
            ref = sorted(map(tuple, np.round(boxes * np.array([w, h, w, h]), 3).tolist()))
            got = sorted(map(tuple, np.round(ours.boxes.astype(np.float64), 3).tolist()))
            assert got == ref
            # the package reports the undecayed scores; ours are decayed, never above them
            assert np.all(ours.scores > 0.2)


def test_box_iou_pairs_equal_the_dense_computation():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (300, 2))
    wh = rng.uniform(1, 15, (300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    tall = np.array([[5, 0, 12, 110], [40, 2, 48, 95], [0, 50, 120, 58]], np.float64)
    boxes = np.concatenate([boxes, boxes[:20], tall])  # exact duplicates and boxes across many strips
    i, j, v = box_iou_pairs(boxes, 0.1)
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    dense = inter / (area[:, None] + area[None] - inter)
    ii, jj = np.nonzero(np.triu(dense > 0.1, 1))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(ii.tolist(), jj.tolist()))
    np.testing.assert_allclose(v[np.lexsort((j, i))], dense[ii, jj])


def disc_crop(r, value=1.0):
    yy, xx = np.mgrid[: 2 * r + 1, : 2 * r + 1]
    return np.where((yy - r) ** 2 + (xx - r) ** 2 <= r * r, value, 0.0).astype(np.float32)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "soft_nms"])
def test_identical_sources_fuse_to_one_instance_each_with_the_same_mask(method):
    crops = [disc_crop(5, 0.8), disc_crop(7, 0.6)]
    a = make([[10, 10, 21, 21], [50, 40, 65, 55]], scores=[0.9, 0.7], masks=crops, origins=[(10, 10), (40, 50)])
    fused = fuse_instances([a, a, a], method=method)
    assert len(fused) == 2
    np.testing.assert_allclose(fused.boxes, a.boxes, atol=1e-5)
    np.testing.assert_allclose(fused.scores, a.scores, atol=1e-6)
    np.testing.assert_array_equal(fused.mask_origins, a.mask_origins)
    for k in range(2):
        np.testing.assert_allclose(fused.masks[k], a.masks[k], atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_disjoint_instances_stay_separate(method):
    a = make([[5, 5, 20, 20]], scores=[0.8])
    b = make([[60, 60, 80, 80]], scores=[0.6])
    fused = fuse_instances([a, b], method=method)
    assert len(fused) == 2
    np.testing.assert_allclose(fused.boxes, [[5, 5, 20, 20], [60, 60, 80, 80]])


def test_classes_never_fuse():
    a = make([[5, 5, 20, 20]], classes=[0])
    b = make([[5, 5, 20, 20]], classes=[1])
    for method in METHODS:
        fused = fuse_instances([a, b], method=method)
        assert sorted(fused.classes.tolist()) == [0, 1], method


def test_weights_pull_the_fused_box():
    a = make([[10, 10, 30, 30]], scores=[0.8])
    b = make([[12, 12, 32, 32]], scores=[0.8])
    even = fuse_instances([a, b], method="wbf")
    np.testing.assert_allclose(even.boxes[0], [11, 11, 31, 31], atol=1e-5)
    heavy_a = fuse_instances([a, b], [3.0, 1.0], method="wbf")
    np.testing.assert_allclose(heavy_a.boxes[0], [10.5, 10.5, 30.5, 30.5], atol=1e-5)
    heavy_b = fuse_instances([a, b], [1.0, 3.0], method="nmw")
    assert heavy_b.boxes[0, 0] > 11.0  # b is the main box and weighs more
    assert fuse_instances([a, b], [1.0, 3.0], method="nms").boxes[0, 0] == 12.0


def test_wbf_score_reflects_how_many_sources_found_the_cell():
    cell = make([[10, 10, 30, 30]], scores=[0.9])
    nothing = Instances.empty(SIZE)
    fused = fuse_instances([cell, nothing, nothing], method="wbf")
    assert fused.scores[0] == pytest.approx(0.3)
    assert fuse_instances([cell, cell, nothing], method="wbf").scores[0] == pytest.approx(0.6)
    assert fuse_instances([cell, nothing, nothing], method="wbf", conf_type="max").scores[0] == pytest.approx(0.9)
    # the mask is averaged over members only: a cell one source found keeps its mask
    np.testing.assert_array_equal(fused.masks[0], cell.masks[0])


def test_soft_nms_decays_overlapping_scores():
    a = make([[10, 10, 30, 30]], scores=[0.9])
    b = make([[14, 10, 34, 30]], scores=[0.8])  # IoU = 16*20 / (2*400 - 320) = 2/3
    c = make([[70, 70, 90, 90]], scores=[0.7])
    fused = fuse_instances([a, b, c], method="soft_nms", sigma=0.5)
    assert len(fused) == 3
    iou = 2 / 3
    np.testing.assert_allclose(sorted(fused.scores), sorted([0.9, 0.7, 0.8 * np.exp(-iou**2 / 0.5)]), rtol=1e-5)
    linear = fuse_instances([a, b, c], method="soft_nms", soft_nms_method="linear", iou_thr=0.5)
    np.testing.assert_allclose(sorted(linear.scores), sorted([0.9, 0.7, 0.8 * (1 - iou)]), rtol=1e-5)
    assert len(fuse_instances([a, b, c], method="nms")) == 2


def test_mask_nms_drops_a_duplicate_mask_that_box_nms_keeps():
    crop = disc_crop(6)
    tight = make([[10, 10, 23, 23]], scores=[0.9], masks=[crop], origins=[(10, 10)])
    # the same mask, but a loose box: box IoU = 169 / 900 < 0.5
    loose = make([[4, 4, 34, 34]], scores=[0.6], masks=[crop], origins=[(10, 10)])
    assert len(fuse_instances([tight, loose], method="nms")) == 2
    fused = fuse_instances([tight, loose], method="mask_nms")
    assert len(fused) == 1 and fused.scores[0] == pytest.approx(0.9)
    np.testing.assert_allclose(fused.boxes[0], [10, 10, 23, 23])
    assert mask_iou(tight, 0, loose, 0) == 1.0


def test_member_masks_are_averaged_over_the_union_window():
    ma = np.full((4, 4), 1.0, np.float32)
    mb = np.full((4, 4), 0.5, np.float32)
    a = make([[10, 10, 14, 14]], scores=[0.8], masks=[ma], origins=[(10, 10)])
    b = make([[11, 10, 15, 14]], scores=[0.4], masks=[mb], origins=[(10, 11)])
    for method in ("wbf", "nmw", "nms"):
        fused = fuse_instances([a, b], [1.0, 2.0], method=method, iou_thr=0.5)
        assert len(fused) == 1
        np.testing.assert_array_equal(fused.mask_origins[0], [10, 10])
        m = fused.masks[0]
        assert m.shape == (4, 5)
        wa, wb = 0.8 * 1.0, 0.4 * 2.0
        np.testing.assert_allclose(m[:, 0], wa * 1.0 / (wa + wb))  # only a covers column 10
        np.testing.assert_allclose(m[:, 1:4], (wa * 1.0 + wb * 0.5) / (wa + wb))
        np.testing.assert_allclose(m[:, 4], wb * 0.5 / (wa + wb))  # only b covers column 14
        single = fuse_instances([a, b], [1.0, 2.0], method=method, average_masks=False)
        assert single.masks[0].shape == (4, 4)


def test_skip_box_thr_and_empty_inputs():
    a = make([[10, 10, 30, 30], [50, 50, 70, 70]], scores=[0.9, 0.05])
    assert len(fuse_instances([a], method="wbf", skip_box_thr=0.1)) == 1
    empty = fuse_instances([Instances.empty(SIZE), Instances.empty(SIZE)], method="wbf")
    assert len(empty) == 0 and empty.image_size == SIZE
    # boxes are clipped to the image; zero-area boxes are dropped
    crops = [np.ones((10, 10), np.float32), np.ones((10, 1), np.float32)]
    out = make([[-5, -5, 10, 10], [20, 20, 20, 30]], masks=crops, origins=[(0, 0), (20, 20)])
    fused = fuse_instances([out], method="nms")
    assert len(fused) == 1 and fused.boxes[0].tolist() == [0, 0, 10, 10]


def test_bad_arguments_are_explained():
    a = make([[10, 10, 30, 30]])
    with pytest.raises(ValueError, match="unknown ensemble method"):
        fuse_instances([a], method="vote")
    with pytest.raises(ValueError, match="conf_type"):
        fuse_instances([a], conf_type="median")
    with pytest.raises(ValueError, match="2 weights for 1 sources"):
        fuse_instances([a], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        fuse_instances([a], [0])
    with pytest.raises(ValueError, match="different image sizes"):
        fuse_instances([a, make([[1, 1, 3, 3]], size=(50, 50))])
    with pytest.raises(ValueError, match="at least one source"):
        fuse_instances([])
