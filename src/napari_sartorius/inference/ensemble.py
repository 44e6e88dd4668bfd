"""Fusion of instance predictions from several sources (models x TTA variants) into one set.

:func:`fuse_instances` takes a list of :class:`Instances` of the same image, one per *source* (one
model run on one TTA variant, already mapped back to the image), with one weight per source, and
returns one :class:`Instances`. Methods (``METHODS``):

``"wbf"``       weighted boxes fusion (Solovyev et al. 2021), ``ensemble_boxes.weighted_boxes_fusion``;
``"nmw"``       non-maximum weighted, ``ensemble_boxes.non_maximum_weighted``;
``"nms"``       greedy non-maximum suppression, ``ensemble_boxes.nms``;
``"soft_nms"``  Soft-NMS (Bodla et al. 2017; gaussian or linear decay), ``ensemble_boxes.soft_nms``;
``"mask_nms"``  greedy NMS on the IoU of the binarised masks, computed on the crops.

The four box methods follow the algorithms of the ``ensemble-boxes`` package (version 1.0.9; the tests
compare boxes and scores with the package on random inputs), re-implemented here because the package
returns fused boxes but not which inputs went into each, and the masks of those members must be
averaged; its per-box Python loops are also too slow for 12 x 800 candidates. Matching rules are the
package's: per class; inputs visited in decreasing ``score x weight``; a box joins a cluster when its
IoU with the cluster's (current, for WBF) box is strictly greater than ``iou_thr``; boxes with
``score < skip_box_thr`` or zero area are dropped first. IoU is computed in pixels, which equals the
package's IoU on boxes normalised by the image size (IoU is invariant to scaling each axis); boxes
are clipped to the image as the package clips to [0, 1]. Ties in score are visited in input order
(the package's order for ties is that of an unstable sort). Deviations, on purpose:

- NMS and Soft-NMS scale scores by ``weight / max(weights)`` instead of the package's
  ``weight / sum(weights)``, so that with equal weights the fused scores stay on the model's score
  scale and the per-cell-type score thresholds still apply. The kept set is unchanged by this
  constant factor (except Soft-NMS's ``soft_nms_thr`` cut-off, which then acts on larger numbers).
- Soft-NMS returns the decayed scores (the point of Soft-NMS); the package returns the original ones.

Members and masks. Each fused instance has *members*: for WBF and NMW the inputs of its cluster, for
NMS and mask NMS the kept input plus the inputs it suppressed, for Soft-NMS the kept input alone
(Soft-NMS suppresses nothing outright). With ``average_masks=True`` the fused mask is the weighted
mean of the members' crops pasted into the union of their windows, member weight
``score x source weight``; where a member's crop does not reach, it counts as 0. The mean is over the
members only, not over all sources: a cell that only some sources (models or TTA variants) found keeps
its full mask probability, and the lack of support shows in the fused *score* instead (WBF's
``conf_type`` scaling: with ``"avg"`` a cluster's mean score is multiplied by
``min(n_sources, n_members) / sum(weights)`` with raw weights, i.e. by the fraction of sources that found
it when weights are 1). Every TTA variant is one source and carries its model's weight, so a model run
with 4 variants has up to 4 members per cell, and a model's total say is ``weight x n_variants``; when
all models use the same TTA mode this is proportional to the model weights.

Cost: candidate pairs come from one sort-and-sweep over x per class (no all-pairs matrix); NMS, NMW and
Soft-NMS then work on those sparse pairs; WBF's clustering is inherently sequential (the cluster boxes
move as members join) and runs one vectorised IoU per input against the current clusters of its class.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..instances import Instances

__all__ = ["METHODS", "CONF_TYPES", "fuse_instances", "box_iou_pairs", "mask_iou"]

METHODS: tuple[str, ...] = ("nms", "soft_nms", "nmw", "wbf", "mask_nms")
CONF_TYPES: tuple[str, ...] = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")

_MAX_PAIRS_PER_CHUNK = 1 << 21


# -- sparse pairs ----------------------------------------------------------------------------------
def box_iou_pairs(boxes: np.ndarray, min_iou: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of boxes (xyxy, float (N, 4)) whose IoU is strictly greater than ``min_iou``
    (and whose intersection is not empty). Returns int64 ``i``, ``j`` and float64 ``iou`` arrays.

    The image is cut into horizontal strips (about twice the median box height); a box is listed in
    every strip it overlaps, and within a strip each box is compared only with the boxes that start
    inside its x-extent (sort and sweep). A pair is reported by the first strip both boxes are in.
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
    k1 = strip_of * period + (boxes[box_of, 2] - x_min)
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


def _csr(n: int, i: np.ndarray, j: np.ndarray, v: np.ndarray):
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
    return _crop_iou(ma, a.mask_origins[i], int(ma.sum()), mb, b.mask_origins[j], int(mb.sum()))


def _crop_iou(ma, oa, area_a, mb, ob, area_b) -> float:
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


# -- clustering per class --------------------------------------------------------------------------
# Each routine gets the inputs of one class in visiting order (decreasing key) and returns
# (assign, rep_boxes, rep_scores, rep_index): assign[k] = cluster of input k or -1 (dropped),
# rep_index[c] = the visiting position of cluster c's first (highest-key) member.


def _greedy_keep(n: int, indptr: np.ndarray, nbrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS over inputs 0..n-1 in visiting order; neighbours are the pairs above the threshold.

    Returns (keep mask, owner): owner[k] = the kept input that suppressed k (or k itself)."""
    suppressed = np.zeros(n, bool)
    owner = np.arange(n)
    for k in range(n):
        if suppressed[k]:
            continue
        nb = nbrs[indptr[k] : indptr[k + 1]]
        if nb.size:
            nb = nb[(nb > k) & ~suppressed[nb]]
            suppressed[nb] = True
            owner[nb] = k
    return ~suppressed, owner


def _cluster_nms(b, key, iou_thr):
    n = len(b)
    i, j, v = box_iou_pairs(b, iou_thr)
    indptr, nbrs, _ = _csr(n, i, j, v)
    keep, owner = _greedy_keep(n, indptr, nbrs)
    kept = np.flatnonzero(keep)
    cluster_of = np.full(n, -1)
    cluster_of[kept] = np.arange(len(kept))
    return cluster_of[owner], b[kept], key[kept], kept


def _cluster_nmw(b, key, iou_thr):
    """Mains are the greedy-NMS keepers; every other input joins the earlier main of highest IoU."""
    n = len(b)
    i, j, v = box_iou_pairs(b, iou_thr)
    indptr, nbrs, vals = _csr(n, i, j, v)
    keep, _ = _greedy_keep(n, indptr, nbrs)
    mains = np.flatnonzero(keep)
    cluster_of = np.full(n, -1)
    cluster_of[mains] = np.arange(len(mains))
    # candidate (member, main) pairs: main visited earlier, IoU > thr
    lo, hi = np.minimum(i, j), np.maximum(i, j)  # lo is visited first
    cand = keep[lo] & ~keep[hi]
    mem, main, iou = hi[cand], lo[cand], v[cand]
    # per member: highest IoU, ties -> earliest main (the package scans mains in creation order)
    order = np.lexsort((main, -iou, mem))
    mem, main, iou = mem[order], main[order], iou[order]
    first = np.ones(len(mem), bool)
    first[1:] = mem[1:] != mem[:-1]
    assign = cluster_of.copy()
    iou_to_main = np.ones(n)
    assign[mem[first]] = cluster_of[main[first]]
    iou_to_main[mem[first]] = iou[first]
    # fused box: coordinates weighted by key x IoU with the main
    wgt = key * iou_to_main
    k = len(mains)
    num = np.zeros((k, 4))
    np.add.at(num, assign, b * wgt[:, None])
    den = np.bincount(assign, weights=wgt, minlength=k)
    return assign, num / den[:, None], key[mains], mains


def _cluster_wbf(b, key, w, src, iou_thr, conf_type, weights, allows_overflow):
    n = len(b)
    x0s, y0s, x1s, y1s = (b[:, c].copy() for c in range(4))
    fx0, fy0, fx1, fy1, farea = (np.empty(n) for _ in range(5))
    sx0, sy0, sx1, sy1, conf = (np.empty(n) for _ in range(5))
    assign = np.empty(n, np.int64)
    reps = []
    k = 0
    rows = b.tolist()
    keys = key.tolist()
    for t in range(n):
        x0, y0, x1, y1 = rows[t]
        s = keys[t]
        if k:
            iw = np.minimum(fx1[:k], x1)
            iw -= np.maximum(fx0[:k], x0)
            np.maximum(iw, 0.0, out=iw)
            ih = np.minimum(fy1[:k], y1)
            ih -= np.maximum(fy0[:k], y0)
            np.maximum(ih, 0.0, out=ih)
            iw *= ih
            iou = iw / (farea[:k] + ((x1 - x0) * (y1 - y0)) - iw)
            c = int(iou.argmax())
            if iou[c] > iou_thr:
                assign[t] = c
                sx0[c] += s * x0
                sy0[c] += s * y0
                sx1[c] += s * x1
                sy1[c] += s * y1
                conf[c] += s
                q = conf[c]
                fx0[c], fy0[c], fx1[c], fy1[c] = sx0[c] / q, sy0[c] / q, sx1[c] / q, sy1[c] / q
                farea[c] = (fx1[c] - fx0[c]) * (fy1[c] - fy0[c])
                continue
        assign[t] = k
        fx0[k], fy0[k], fx1[k], fy1[k] = x0, y0, x1, y1
        farea[k] = (x1 - x0) * (y1 - y0)
        sx0[k], sy0[k], sx1[k], sy1[k] = s * x0, s * y0, s * x1, s * y1
        conf[k] = s
        reps.append(t)
        k += 1
    fused = np.stack([fx0[:k], fy0[:k], fx1[:k], fy1[:k]], axis=1)
    count = np.bincount(assign, minlength=k).astype(np.float64)
    wsum = np.bincount(assign, weights=w, minlength=k)
    if conf_type == "max":
        score = np.full(k, -np.inf)
        np.maximum.at(score, assign, key)
        score = score / weights.max()
    else:
        score = conf[:k] / count
        if conf_type == "box_and_model_avg":
            present = _present_weight(assign, src, weights, k)
            score = score * count / wsum * present / weights.sum()
        elif conf_type == "absent_model_aware_avg":
            absent = weights.sum() - _present_weight(assign, src, weights, k)
            score = score * count / (wsum + absent)
        elif allows_overflow:
            score = score * count / weights.sum()
        else:
            score = score * np.minimum(len(weights), count) / weights.sum()
    return assign, fused, score, np.asarray(reps, np.int64)


def _present_weight(assign, src, weights, k):
    """Sum of the weights of the distinct sources in each cluster."""
    pairs = np.unique(assign * len(weights) + src)
    return np.bincount(pairs // len(weights), weights=weights[pairs % len(weights)], minlength=k)


def _cluster_soft_nms(b, key, iou_thr, sigma, thresh, linear):
    n = len(b)
    i, j, v = box_iou_pairs(b, 0.0)
    indptr, nbrs, vals = _csr(n, i, j, v)
    if linear:
        decay = np.where(vals > iou_thr, 1.0 - vals, 1.0)
    else:
        decay = np.exp(-(vals * vals) / sigma)
    cur = key.astype(np.float64).copy()
    final = np.empty(n)
    done = np.zeros(n, bool)
    for _ in range(n):
        k = int(cur.argmax())
        final[k] = cur[k]
        done[k] = True
        cur[k] = -np.inf
        lo, hi = indptr[k], indptr[k + 1]
        if hi > lo:
            nb = nbrs[lo:hi]
            todo = ~done[nb]
            cur[nb[todo]] *= decay[lo:hi][todo]
    kept = np.flatnonzero(final > thresh)
    kept = kept[np.argsort(-final[kept], kind="stable")]
    assign = np.full(n, -1)
    assign[kept] = np.arange(len(kept))
    return assign, b[kept], final[kept], kept


def _cluster_mask_nms(idx, binaries, areas, origins, b_windows, key, iou_thr):
    """Greedy NMS on mask IoU; ``idx`` maps visiting position -> input row of the crop lists."""
    n = len(idx)
    i, j, v = box_iou_pairs(b_windows, 0.0)
    indptr, nbrs, _ = _csr(n, i, j, v)
    suppressed = np.zeros(n, bool)
    owner = np.arange(n)
    for k in range(n):
        if suppressed[k]:
            continue
        nb = nbrs[indptr[k] : indptr[k + 1]]
        nb = nb[(nb > k) & ~suppressed[nb]]
        if not nb.size:
            continue
        a = idx[k]
        for m in nb.tolist():
            c = idx[m]
            if _crop_iou(binaries[a], origins[a], areas[a], binaries[c], origins[c], areas[c]) > iou_thr:
                suppressed[m] = True
                owner[m] = k
    kept = np.flatnonzero(~suppressed)
    cluster_of = np.full(n, -1)
    cluster_of[kept] = np.arange(len(kept))
    return cluster_of[owner], kept


# -- masks -----------------------------------------------------------------------------------------
def _average_masks(members: list, weights: list, masks: list, origins: list):
    """Weighted mean of member crops over the union of their windows; returns (crop, (y0, x0)).

    ``members`` index ``masks`` and ``origins`` (lists of crops and ``(y0, x0)`` tuples)."""
    if len(members) == 1:
        m = members[0]
        return masks[m], origins[m]
    y0 = x0 = 1 << 62
    y1 = x1 = -1
    for m in members:
        oy, ox = origins[m]
        h, w = masks[m].shape
        y0, x0 = min(y0, oy), min(x0, ox)
        y1, x1 = max(y1, oy + h), max(x1, ox + w)
    acc = np.zeros((y1 - y0, x1 - x0), np.float32)
    total = 0.0
    for m, wgt in zip(members, weights):
        oy, ox = origins[m]
        crop = masks[m]
        h, w = crop.shape
        acc[oy - y0 : oy - y0 + h, ox - x0 : ox - x0 + w] += np.float32(wgt) * crop
        total += wgt
    if total > 0:
        acc *= np.float32(1.0 / total)
    np.clip(acc, 0.0, 1.0, out=acc)
    return acc, (y0, x0)


# -- public ----------------------------------------------------------------------------------------
def fuse_instances(
    sources: Sequence[Instances],
    weights: Sequence[float] | None = None,
    method: str = "wbf",
    *,
    iou_thr: float = 0.5,
    skip_box_thr: float = 0.0,
    conf_type: str = "avg",
    allows_overflow: bool = False,
    soft_nms_method: str = "gaussian",
    sigma: float = 0.5,
    soft_nms_thr: float = 0.001,
    mask_threshold: float = 0.5,
    average_masks: bool = True,
) -> Instances:
    """Fuse the instances of several sources of one image into one :class:`Instances`.

    Args:
        sources: predictions of one image, one Instances per source (model x TTA variant), all with the
            same ``image_size``; classes index the same class names in every source.
        weights: one positive weight per source (default 1 each); see the module docstring.
        method: one of ``METHODS``.
        iou_thr: box IoU (mask IoU for ``"mask_nms"``) above which two instances are the same cell;
            for ``"soft_nms"`` with linear decay, the IoU above which scores decay.
        skip_box_thr: inputs with a raw score below this are dropped before fusion.
        conf_type: how WBF scores a cluster, one of ``CONF_TYPES`` (the package's meanings).
        allows_overflow: WBF with ``conf_type="avg"``: let scores exceed 1 when a cluster has more
            members than there are sources.
        soft_nms_method: ``"gaussian"`` (score x exp(-IoU^2 / sigma)) or ``"linear"``.
        sigma, soft_nms_thr: Soft-NMS's gaussian width and the decayed score an input must exceed to stay.
        mask_threshold: probability at which masks are binarised for ``"mask_nms"``.
        average_masks: average the members' masks (weighted); else keep the top member's crop.

    Returns:
        Instances of the image, ordered by decreasing fused score; float32 boxes (clipped to the image),
        scores, int64 classes (kept per class: instances of different classes never fuse), crops.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}: use one of {', '.join(METHODS)}")
    if conf_type not in CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}: use one of {', '.join(CONF_TYPES)}")
    if soft_nms_method not in ("gaussian", "linear"):
        raise ValueError(f"unknown soft_nms_method {soft_nms_method!r}: use 'gaussian' or 'linear'")
    sources = list(sources)
    if not sources:
        raise ValueError("fuse_instances needs at least one source")
    size = sources[0].image_size
    if any(s.image_size != size for s in sources):
        sizes = sorted({s.image_size for s in sources})
        raise ValueError(f"cannot fuse predictions of different image sizes {sizes}")
    w_src = np.ones(len(sources)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if len(w_src) != len(sources):
        raise ValueError(f"{len(w_src)} weights for {len(sources)} sources")
    if not np.all(np.isfinite(w_src)) or np.any(w_src <= 0):
        raise ValueError(f"source weights must be positive numbers, got {w_src.tolist()}")

    # flat views of all candidates (not Instances.cat: that would re-validate every crop)
    all_masks = [m for s in sources for m in s.masks]
    all_origins = np.concatenate([s.mask_origins for s in sources]).reshape(-1, 2)
    all_classes = np.concatenate([s.classes for s in sources])
    src = np.repeat(np.arange(len(sources)), [len(s) for s in sources])
    h, w = size
    boxes = np.concatenate([s.boxes for s in sources]).astype(np.float64).reshape(-1, 4)
    boxes = np.stack(
        [
            np.minimum(boxes[:, 0], boxes[:, 2]),
            np.minimum(boxes[:, 1], boxes[:, 3]),
            np.maximum(boxes[:, 0], boxes[:, 2]),
            np.maximum(boxes[:, 1], boxes[:, 3]),
        ],
        axis=1,
    )
    boxes = np.clip(boxes, 0.0, np.array([w, h, w, h], np.float64))
    scores = np.concatenate([s.scores for s in sources]).astype(np.float64)
    valid = (scores >= skip_box_thr) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    rows = np.flatnonzero(valid)
    wt = w_src[src]
    # visiting key: score x weight; NMS-type methods scale weights by their maximum
    key_all = scores * (wt if method == "wbf" else wt / w_src.max())

    origins_list = [tuple(o) for o in all_origins.tolist()]
    out_boxes, out_scores, out_classes, out_masks, out_origins = [], [], [], [], []
    if method == "mask_nms":
        binaries = [m >= mask_threshold for m in all_masks]
        bin_areas = [int(np.count_nonzero(m)) for m in binaries]
        crop_windows = np.array(
            [(ox, oy, ox + m.shape[1], oy + m.shape[0]) for m, (oy, ox) in zip(all_masks, all_origins)],
            np.float64,
        ).reshape(-1, 4)
    for cls in np.unique(all_classes[rows]):
        r = rows[all_classes[rows] == cls]
        r = r[np.argsort(-key_all[r], kind="stable")]
        b, key = boxes[r], key_all[r]
        if method == "wbf":
            assign, fb, fs, reps = _cluster_wbf(
                b, key, wt[r], src[r], iou_thr, conf_type, w_src, allows_overflow
            )
        elif method == "nmw":
            assign, fb, fs, reps = _cluster_nmw(b, key, iou_thr)
        elif method == "nms":
            assign, fb, fs, reps = _cluster_nms(b, key, iou_thr)
        elif method == "soft_nms":
            assign, fb, fs, reps = _cluster_soft_nms(
                b, key, iou_thr, sigma, soft_nms_thr, soft_nms_method == "linear"
            )
        else:
            assign, reps = _cluster_mask_nms(
                r, binaries, bin_areas, all_origins, crop_windows[r], key, iou_thr
            )
            fb, fs = b[reps], key[reps]
        # members of each cluster, grouped
        ok = assign >= 0
        pos = np.flatnonzero(ok)
        pos = pos[np.argsort(assign[pos], kind="stable")]
        bounds = np.searchsorted(assign[pos], np.arange(len(reps) + 1))
        member_rows = r[pos].tolist()
        member_w = (scores[r] * wt[r])[pos].tolist()
        bounds = bounds.tolist()
        top_rows = r[reps].tolist()
        for c in range(len(reps)):
            if average_masks:
                lo, hi = bounds[c], bounds[c + 1]
                crop, origin = _average_masks(member_rows[lo:hi], member_w[lo:hi], all_masks, origins_list)
            else:
                crop, origin = all_masks[top_rows[c]], origins_list[top_rows[c]]
            out_masks.append(crop)
            out_origins.append(origin)
        out_boxes.append(fb)
        out_scores.append(fs)
        out_classes.append(np.full(len(reps), cls, np.int64))

    if not out_masks:
        return Instances.empty(size)
    fused_scores = np.concatenate(out_scores)
    order = np.argsort(-fused_scores, kind="stable")
    return Instances(
        image_size=size,
        boxes=np.concatenate(out_boxes)[order].astype(np.float32),
        scores=fused_scores[order].astype(np.float32),
        classes=np.concatenate(out_classes)[order],
        masks=[out_masks[k] for k in order],
        mask_origins=np.asarray(out_origins, np.int64).reshape(-1, 2)[order],
    )
