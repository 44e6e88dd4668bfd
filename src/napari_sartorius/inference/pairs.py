"""Sparse pairs of overlapping boxes and the IoU of mask crops, shared by fusion, tiling and uncertainty.

Boxes are xyxy float arrays ``(N, 4)`` in pixels; crops are 2-D arrays placed at ``(y0, x0)`` origins.
"""

from __future__ import annotations

import numpy as np

from ..instances import Instances

__all__ = ["box_iou_pairs", "mask_iou", "crop_iou", "csr"]

_MAX_PAIRS_PER_CHUNK = 1 << 21


# -- sparse pairs ----------------------------------------------------------------------------------
def box_iou_pairs(boxes: np.ndarray, min_iou: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of boxes (xyxy, float (N, 4)) whose IoU is strictly greater than ``min_iou``
    (and whose intersection is not empty). Returns int64 ``i``, ``j`` and float64 ``iou`` arrays.

    The image is cut into horizontal strips (about twice the median box height); a box is listed in
    every strip it overlaps, and within a strip each box is compared only with the boxes that start
    inside its x-extent (sort and sweep; with ``min_iou > 0``, only those starting early enough in it
    for the IoU to exceed ``min_iou``). A pair is reported by the first strip both boxes are in.
    Work is done in chunks of at most ~2M candidate pairs, so memory stays bounded.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(boxes)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if n < 2:
        return empty
    y_min = boxes[:, 1].min()
    heights = boxes[:, 3] - boxes[:, 1]
    strip = max(2.0 * float(np.median(heights)), 8.0)
    first = np.floor((boxes[:, 1] - y_min) / strip).astype(np.int64)
    last = np.maximum(np.ceil((boxes[:, 3] - y_min) / strip).astype(np.int64) - 1, first)
    span = last - first + 1
    box_of = np.repeat(np.arange(n), span)
    strip_of = np.repeat(first, span) + (np.arange(len(box_of)) - np.repeat(np.cumsum(span) - span, span))
    # one sorted sweep over all strips: key = strip * period + x (x shifted to be >= 0)
    x_min = boxes[:, 0].min()
    period = float(boxes[:, 2].max() - x_min) + 1.0
    k0 = strip_of * period + (boxes[box_of, 0] - x_min)
    # box j is compared with box i when it starts inside i's x-extent; with IoU > t > 0 it must also
    # start before x1_i - t * w_i (IoU > t needs an overlap wider than t * w_i), which halves the pairs
    # at t = 0.5 (the bound is loosened by a hair against rounding; every reported pair is still tested)
    reach = boxes[:, 2] - x_min
    if min_iou > 0:
        reach = reach - min(float(min_iou), 1.0) * (1.0 - 1e-9) * (boxes[:, 2] - boxes[:, 0])
    k1 = strip_of * period + reach[box_of]
    order = np.argsort(k0, kind="stable")
    box_of, strip_of, k0, k1 = box_of[order], strip_of[order], k0[order], k1[order]
    m = len(box_of)
    ends = np.searchsorted(k0, k1, side="left")
    counts = np.maximum(ends - np.arange(m) - 1, 0)
    cum = np.cumsum(counts)
    area = heights * (boxes[:, 2] - boxes[:, 0])
    out_i, out_j, out_v = [], [], []
    start = 0
    while start < m:
        base = cum[start - 1] if start else 0
        stop = int(np.searchsorted(cum, base + _MAX_PAIRS_PER_CHUNK, side="right"))
        stop = min(max(stop, start + 1), m)
        c = counts[start:stop]
        total = int(c.sum())
        if total:
            pa = np.repeat(np.arange(start, stop), c)
            pb = pa + 1 + (np.arange(total) - np.repeat(np.cumsum(c) - c, c))
            ii, jj = box_of[pa], box_of[pb]
            # report a pair only in the first strip both boxes share
            ok = strip_of[pa] == np.maximum(first[ii], first[jj])
            ii, jj = ii[ok], jj[ok]
            bi, bj = boxes[ii], boxes[jj]
            iw = np.minimum(bi[:, 2], bj[:, 2]) - np.maximum(bi[:, 0], bj[:, 0])
            ih = np.minimum(bi[:, 3], bj[:, 3]) - np.maximum(bi[:, 1], bj[:, 1])
            ok = (iw > 0) & (ih > 0)
            ii, jj = ii[ok], jj[ok]
            inter = iw[ok] * ih[ok]
            iou = inter / (area[ii] + area[jj] - inter)
            keep = iou > min_iou
            out_i.append(ii[keep])
            out_j.append(jj[keep])
            out_v.append(iou[keep])
        start = stop
    if not out_i:
        return empty
    i, j, v = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_v)
    swap = i > j
    i[swap], j[swap] = j[swap], i[swap]
    return i.astype(np.int64), j.astype(np.int64), v


def csr(n: int, i: np.ndarray, j: np.ndarray, v: np.ndarray):
    """Symmetric adjacency (indptr, neighbours, values) from pairs."""
    rows = np.concatenate([i, j])
    cols = np.concatenate([j, i])
    vals = np.concatenate([v, v])
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, cols[order], vals[order]


def mask_iou(a: Instances, i: int, b: Instances, j: int, threshold: float = 0.5) -> float:
    """IoU of instance ``i`` of ``a`` and instance ``j`` of ``b`` (masks >= threshold), from the crops."""
    ma, mb = a.masks[i] >= threshold, b.masks[j] >= threshold
    return crop_iou(ma, a.mask_origins[i], int(ma.sum()), mb, b.mask_origins[j], int(mb.sum()))


def crop_iou(ma, oa, area_a, mb, ob, area_b) -> float:
    y0, x0 = max(oa[0], ob[0]), max(oa[1], ob[1])
    y1 = min(oa[0] + ma.shape[0], ob[0] + mb.shape[0])
    x1 = min(oa[1] + ma.shape[1], ob[1] + mb.shape[1])
    inter = 0
    if y1 > y0 and x1 > x0:
        sa = ma[y0 - oa[0] : y1 - oa[0], x0 - oa[1] : x1 - oa[1]]
        sb = mb[y0 - ob[0] : y1 - ob[0], x0 - ob[1] : x1 - ob[1]]
        inter = int(np.count_nonzero(sa & sb))
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0

