"""One clustering routine per fusion method (see :mod:`napari_sartorius.inference.ensemble`).

Each routine gets the inputs of one class in visiting order (decreasing ``score x weight`` key) and
returns ``(assign, rep_boxes, rep_scores, rep_index)``: ``assign[k]`` is the cluster of input ``k``
or -1 (dropped), ``rep_index[c]`` the visiting position of cluster ``c``'s first (highest-key)
member. Boxes are xyxy float64 ``(n, 4)`` in pixels.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np

from .crop_table import CropTable
from .pairs import box_iou_pairs, crop_iou, csr

__all__ = ["cluster_nms", "cluster_nmw", "cluster_wbf", "cluster_soft_nms", "cluster_mask_nms", "support_of_kept"]

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


def cluster_nms(b, key, iou_thr):
    n = len(b)
    i, j, v = box_iou_pairs(b, iou_thr)
    indptr, nbrs, _ = csr(n, i, j, v)
    keep, owner = _greedy_keep(n, indptr, nbrs)
    kept = np.flatnonzero(keep)
    cluster_of = np.full(n, -1)
    cluster_of[kept] = np.arange(len(kept))
    return cluster_of[owner], b[kept], key[kept], kept


def cluster_nmw(b, key, iou_thr):
    """Mains are the greedy-NMS keepers; every other input joins the earlier main of highest IoU."""
    n = len(b)
    i, j, v = box_iou_pairs(b, iou_thr)
    indptr, nbrs, vals = csr(n, i, j, v)
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


def cluster_wbf(b, key, w, src, iou_thr, conf_type, weights, allows_overflow):
    """WBF's clustering: inputs in visiting order join the current cluster of highest box IoU when it is
    above ``iou_thr`` (ties: the earliest cluster), else open a cluster; a cluster's box is the
    key-weighted mean of its members' boxes. Returns ``(assign, fused boxes, scores, reps)``.

    Inherently sequential (a cluster's box moves as members join), so it is a loop over the inputs
    (compiled by numba where available, :mod:`.fusion_kernels`; else in Python), but each input is
    compared only with the clusters registered in the grid buckets its box touches: a cluster is
    registered in every bucket of the hull of its members' boxes, and its box, a weighted mean of those
    boxes, never leaves that hull; a cluster outside the buckets has IoU 0
    and cannot be chosen. IoUs and updates are the same float64 operations, in the same order, as a
    vectorised IoU against every cluster (``_cluster_wbf_dense``, kept for ``iou_thr < 0``, where a
    cluster of IoU 0 may be chosen): the results are identical.
    """
    n = len(b)
    if iou_thr < 0 or n == 0:
        assign, fused, conf, reps = _cluster_wbf_dense(b, key, iou_thr)
    else:
        assign, fused, conf, reps = _cluster_wbf_grid(b, key, iou_thr)
    k = len(reps)
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


def _cluster_wbf_dense(b, key, iou_thr):
    """WBF clustering with one vectorised IoU per input against every current cluster.
    Returns ``(assign, fused boxes (k, 4), conf (k,), reps)``."""
    n = len(b)
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
    return assign, fused, conf[:k].copy(), np.asarray(reps, np.int64)


#: Padding (in grid buckets) of the buckets a cluster is registered in.
_PAD = 1e-6


def _grid(b):
    """The bucket grid of :func:`_cluster_wbf_grid`: ``(query, reg, areas, nx, ny)``; per input (rows of
    ``b``), the buckets its box touches (``query``, inclusive ranges ``[ix0, iy0, ix1, iy1]``) and, padded
    by a hair in case a rounded mean lands a hair outside the hull, those it registers a cluster in
    (``reg``), both int64 ``(n, 4)``; ``areas`` float64 ``(n,)``; ``nx`` x ``ny`` buckets of ~2 median box
    sides (at least 8 px)."""
    side = float(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))
    cell = max(2.0 * side, 8.0)
    gx_min, gy_min = float(b[:, 0].min()), float(b[:, 1].min())
    nx = int((float(b[:, 2].max()) - gx_min) / cell) + 1
    ny = int((float(b[:, 3].max()) - gy_min) / cell) + 1
    u = (b - np.array([gx_min, gy_min, gx_min, gy_min])) / cell
    query = u.astype(np.int64)
    pad = u + np.array([-_PAD, -_PAD, _PAD, _PAD])
    reg = np.stack([np.maximum(pad[:, 0], 0), np.maximum(pad[:, 1], 0),
                    np.minimum(pad[:, 2], nx - 1), np.minimum(pad[:, 3], ny - 1)], axis=1).astype(np.int64)
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return query, reg, areas, nx, ny


#: Inputs (of one class) from which a fusion loop is worth loading numba in a process that has not yet
#: (~0.5 s to import numba and load the cached loops; a few seconds for the first compilation after an
#: installation): below, the Python loops take ~20 ms or less.
COMPILE_FROM = 2000


def _compiled(name: str, n: int, compiled: bool | None):
    """The compiled loop ``name`` of :mod:`.fusion_kernels` for a loop over ``n`` inputs, or None for the
    Python loop: ``compiled`` False: None; True: the compiled loop where numba can be imported; None
    (automatic): the same, when the loops are already loaded or ``n >= COMPILE_FROM``."""
    if compiled is False:
        return None
    if compiled is None and n < COMPILE_FROM and f"{__package__}.fusion_kernels" not in sys.modules:
        return None
    try:
        kernels = importlib.import_module(f"{__package__}.fusion_kernels")
    except Exception:  # noqa: BLE001 - numba missing or broken (e.g. built for another numpy): Python loops
        return None
    return getattr(kernels, name)


def _cluster_wbf_grid(b, key, iou_thr, compiled: bool | None = None):
    """:func:`_cluster_wbf_dense`'s result, comparing each input only with the clusters of the grid
    buckets its box touches (see :func:`cluster_wbf`); ``iou_thr >= 0``. ``compiled``: run numba's
    compiled loop (:mod:`.fusion_kernels`; identical results) or this module's Python loop, as
    :func:`_compiled` decides."""
    query, reg, areas, nx, ny = _grid(b)
    loop = _compiled("wbf_grid_loop", len(b), compiled)
    if loop is not None:
        b = np.ascontiguousarray(b, np.float64)
        return loop(b, np.ascontiguousarray(key, np.float64), areas, query, reg, nx, ny, float(iou_thr))
    return _wbf_grid_python(b.tolist(), key.tolist(), areas.tolist(), query.tolist(), reg.tolist(), nx, ny, iou_thr)


def _wbf_grid_python(rows, keys, areas, query, reg, nx, ny, iou_thr):
    """The loop of :func:`_cluster_wbf_grid` in Python, on lists (the rows of :func:`_grid`'s arrays)."""
    n = len(rows)
    buckets: list[list[int]] = [[] for _ in range(nx * ny)]
    fx0: list[float] = []
    fy0: list[float] = []
    fx1: list[float] = []
    fy1: list[float] = []
    farea: list[float] = []
    sx0: list[float] = []
    sy0: list[float] = []
    sx1: list[float] = []
    sy1: list[float] = []
    conf: list[float] = []
    hull: list[list[int]] = []  # bucket range [ix0, iy0, ix1, iy1] (inclusive) each cluster is registered in
    assign = [0] * n
    reps = []
    for t in range(n):
        x0, y0, x1, y1 = rows[t]
        s = keys[t]
        ix0, iy0, ix1, iy1 = query[t]
        area = areas[t]
        best, best_iou = -1, -1.0
        for ix in range(ix0, ix1 + 1):
            for iy in range(iy0, iy1 + 1):
                for c in buckets[ix * ny + iy]:
                    # min() and max() written out: the same values, without two calls per comparison
                    a, z = fx1[c], fx0[c]
                    iw = (a if a < x1 else x1) - (z if z > x0 else x0)
                    if iw <= 0.0:
                        continue
                    a, z = fy1[c], fy0[c]
                    ih = (a if a < y1 else y1) - (z if z > y0 else y0)
                    if ih <= 0.0:
                        continue
                    inter = iw * ih
                    iou = inter / (farea[c] + area - inter)
                    if iou > best_iou or (iou == best_iou and c < best):
                        best, best_iou = c, iou
        if best >= 0 and best_iou > iou_thr:
            c = best
            assign[t] = c
            sx0[c] += s * x0
            sy0[c] += s * y0
            sx1[c] += s * x1
            sy1[c] += s * y1
            conf[c] += s
            q = conf[c]
            fx0[c], fy0[c], fx1[c], fy1[c] = sx0[c] / q, sy0[c] / q, sx1[c] / q, sy1[c] / q
            farea[c] = (fx1[c] - fx0[c]) * (fy1[c] - fy0[c])
            h = hull[c]
            ix0, iy0, ix1, iy1 = reg[t]
            if ix0 < h[0] or iy0 < h[1] or ix1 > h[2] or iy1 > h[3]:  # the hull grew: register the new buckets
                nx0, ny0, nx1, ny1 = min(ix0, h[0]), min(iy0, h[1]), max(ix1, h[2]), max(iy1, h[3])
                for ix in range(nx0, nx1 + 1):
                    for iy in range(ny0, ny1 + 1):
                        if not (h[0] <= ix <= h[2] and h[1] <= iy <= h[3]):
                            buckets[ix * ny + iy].append(c)
                hull[c] = [nx0, ny0, nx1, ny1]
            continue
        c = len(reps)
        assign[t] = c
        ix0, iy0, ix1, iy1 = reg[t]
        fx0.append(x0), fy0.append(y0), fx1.append(x1), fy1.append(y1), farea.append(area)
        sx0.append(s * x0), sy0.append(s * y0), sx1.append(s * x1), sy1.append(s * y1), conf.append(s)
        hull.append([ix0, iy0, ix1, iy1])
        for ix in range(ix0, ix1 + 1):
            for iy in range(iy0, iy1 + 1):
                buckets[ix * ny + iy].append(c)
        reps.append(t)
    fused = np.array([fx0, fy0, fx1, fy1], np.float64).T.reshape(-1, 4)
    return np.asarray(assign, np.int64), fused, np.asarray(conf, np.float64), np.asarray(reps, np.int64)


def _present_weight(assign, src, weights, k):
    """Sum of the weights of the distinct sources in each cluster."""
    pairs = np.unique(assign * len(weights) + src)
    return np.bincount(pairs // len(weights), weights=weights[pairs % len(weights)], minlength=k)


def cluster_soft_nms(b, key, iou_thr, sigma, thresh, linear):
    """Soft-NMS: inputs taken in order of their current (decayed) score, ties in input order. The
    loop's ``argmax`` over all inputs per step is quadratic but runs in C; a compiled heap loop was
    measured no faster (~90 ms for 12,000 inputs with 400,000 overlapping pairs, where gaussian decay
    re-queues an input at every pair)."""
    n = len(b)
    i, j, v = box_iou_pairs(b, 0.0)
    indptr, nbrs, vals = csr(n, i, j, v)
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


def cluster_mask_nms(idx, table: CropTable, bits, areas, b_windows, key, iou_thr, compiled: bool | None = None):
    """Greedy NMS on mask IoU; ``idx`` maps visiting position -> crop of ``table`` (all candidates'
    crops), ``bits`` bool the table's pixels binarised (laid out as ``table.flat``), ``areas`` int64 the
    pixels set per crop, ``b_windows`` the visited crops' windows as xyxy boxes (pairs whose windows
    overlap are compared). ``compiled``: numba's loop (:func:`~.fusion_kernels.mask_nms_loop`, identical
    results) or the Python loop, as :func:`_compiled` decides. Returns ``(assign, kept)``."""
    n = len(idx)
    i, j, v = box_iou_pairs(b_windows, 0.0)
    indptr, nbrs, _ = csr(n, i, j, v)
    loop = _compiled("mask_nms_loop", n, compiled)
    if loop is not None:
        t = table
        suppressed, owner = loop(np.asarray(idx, np.int64), bits, t.starts, t.hs, t.ws, t.oy, t.ox,
                                 np.asarray(areas, np.int64), indptr, nbrs, float(iou_thr))
    else:
        suppressed, owner = _mask_nms_python(idx, table, bits, areas, indptr, nbrs, iou_thr)
    kept = np.flatnonzero(~suppressed)
    cluster_of = np.full(n, -1)
    cluster_of[kept] = np.arange(len(kept))
    return cluster_of[owner], kept


def _mask_nms_python(idx, table: CropTable, bits, areas, indptr, nbrs, iou_thr):
    """The loop of :func:`cluster_mask_nms` in Python: ``(suppressed, owner)``."""
    n = len(idx)
    suppressed = np.zeros(n, bool)
    owner = np.arange(n)
    origins = np.stack([table.oy, table.ox], 1).tolist()
    starts, hs, ws = table.starts.tolist(), table.hs.tolist(), table.ws.tolist()
    areas = np.asarray(areas).tolist()

    def crop(i: int) -> np.ndarray:
        return bits[starts[i] : starts[i] + hs[i] * ws[i]].reshape(hs[i], ws[i])

    for k in range(n):
        if suppressed[k]:
            continue
        nb = nbrs[indptr[k] : indptr[k + 1]]
        nb = nb[(nb > k) & ~suppressed[nb]]
        if not nb.size:
            continue
        a = idx[k]
        crop_a = crop(a)
        for m in nb.tolist():
            c = idx[m]
            if crop_iou(crop_a, origins[a], areas[a], crop(c), origins[c], areas[c]) > iou_thr:
                suppressed[m] = True
                owner[m] = k
    return suppressed, owner


def support_of_kept(b, assign, iou_thr):
    """Soft-NMS suppresses nothing outright (overlapping duplicates stay, with decayed scores), so its
    clusters have one member each. For the uncertainty, which counts the sources that found a cell,
    a kept input is *supported* by itself and by every input whose box IoU with it is above
    ``iou_thr``, kept or not. Returns ``(cluster, position)`` int arrays: one row per (cluster,
    supporting input) pair; an input may support several clusters."""
    i, j, _ = box_iou_pairs(b, iou_thr)
    kept = np.flatnonzero(assign >= 0)
    ki, kj = assign[i] >= 0, assign[j] >= 0
    cluster = np.concatenate([assign[kept], assign[i[ki]], assign[j[kj]]])
    position = np.concatenate([kept, j[ki], i[kj]])
    return cluster.astype(np.int64), position.astype(np.int64)
