"""box_iou_pairs (inference/pairs.py) against the dense IoU matrix at the thresholds fusion uses."""

import numpy as np
import pytest

from napari_sartorius.inference.pairs import box_iou_pairs


@pytest.mark.parametrize("min_iou", [0.0, 0.3, 0.5, 0.8, 0.95])
def test_pairs_above_a_threshold_equal_the_dense_computation(min_iou):
    rng = np.random.default_rng(4)
    centres = rng.uniform(0, 120, (40, 2))[rng.integers(0, 40, 500)]
    half = rng.uniform(2, 10, (500, 2))
    boxes = np.concatenate([centres - half, centres + half], 1) + rng.normal(0, 1.0, (500, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    # pairs right at the bounds: a box shifted by exactly (1 - t) of its width, and nested boxes
    base = np.array([[10.0, 10.0, 20.0, 20.0]])
    shifted = base + np.array([[10.0 * (1 - min_iou), 0, 10.0 * (1 - min_iou), 0]])
    nested = np.array([[11.0, 11.0, 19.0, 19.0]])
    boxes = np.concatenate([boxes, boxes[:30], base, shifted, nested])
    i, j, v = box_iou_pairs(boxes, min_iou)
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    dense = inter / (area[:, None] + area[None] - inter)
    ii, jj = np.nonzero(np.triu((dense > min_iou) & (inter > 0), 1))
    assert len(ii) >= 30  # the duplicated boxes at least
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(ii.tolist(), jj.tolist()))
    np.testing.assert_allclose(v[np.lexsort((j, i))], dense[ii, jj])
