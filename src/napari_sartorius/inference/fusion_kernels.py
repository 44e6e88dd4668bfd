"""Fusion's sequential loops compiled with numba (a dependency of ``ensemble-boxes``, so present wherever
this package is installed); :mod:`.fusion_methods` keeps the same loops in Python as the fallback.

- :func:`wbf_grid_loop`: WBF's clustering (the Python loop is
  :func:`~napari_sartorius.inference.fusion_methods._wbf_grid_python`);
- :func:`mask_nms_loop`: greedy NMS on the IoU of binarised mask crops (the Python loop is
  :func:`~napari_sartorius.inference.fusion_methods._mask_nms_python`).

Why: on a GPU the network no longer dominates an ensemble run; with 3 models x 4 flips x 1000
detections, WBF's Python loop over 12,000 candidates took ~30 % of the time on an H200 (README,
throughput table; ~11 us per candidate), and mask NMS's pairwise crop IoUs in Python ~1.4 s per image.
The compiled loops make the same float64 operations in the same order and break ties the same way, so
their results are identical to the Python loops' (tests compare them, ties and identical boxes included).
They run without the GIL, so a thread can fuse one image while another drives the GPU.

The functions are compiled on first call and cached on disk (``cache=True``: next to this module, or
numba's user-wide cache where that is not writable), so the compilation (a few seconds) is paid once per
installation. This module imports numba at its top (~0.5 s): callers import it lazily and fall back to
the Python loops when that import fails (an unsupported numpy, say).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["wbf_grid_loop", "mask_nms_loop"]


@numba.njit(cache=True, nogil=True)
def _grown(a, cap):
    """``a`` copied into a new array of ``cap`` entries (the rest uninitialised)."""
    out = np.empty(cap, a.dtype)
    out[: a.shape[0]] = a
    return out


@numba.njit(cache=True, nogil=True)
def _register(head, nxt, who, used, bucket, c):
    """Cluster ``c`` added to the front of ``bucket``'s list (entry ``used``; the entry arrays double
    when full). Returns ``(nxt, who, used + 1)``."""
    if used == nxt.shape[0]:
        nxt = _grown(nxt, 2 * used)
        who = _grown(who, 2 * used)
    who[used] = c
    nxt[used] = head[bucket]
    head[bucket] = used
    return nxt, who, used + 1


@numba.njit(cache=True, nogil=True)
def wbf_grid_loop(b, key, areas, query, reg, nx, ny, iou_thr):
    """The clustering loop on arrays: ``b`` (n, 4) float64 boxes in visiting order, ``key`` (n,) and
    ``areas`` (n,) float64, ``query`` / ``reg`` (n, 4) int64 bucket ranges (inclusive) each box looks
    in / registers its cluster in, on a grid of ``nx`` x ``ny`` buckets, ``iou_thr`` >= 0. Returns
    ``(assign (n,), fused (k, 4), conf (k,), reps (k,))``.

    Buckets are singly linked lists in flat arrays (``head`` per bucket, ``nxt`` / ``who`` per entry);
    the order in which a bucket lists its clusters does not matter, since the choice (highest IoU,
    then lowest cluster index) does not depend on the visiting order."""
    n = b.shape[0]
    head = np.full(nx * ny, -1, np.int64)
    cap = max(4 * n, 16)
    nxt = np.empty(cap, np.int64)
    who = np.empty(cap, np.int64)
    used = 0
    fx0 = np.empty(n)
    fy0 = np.empty(n)
    fx1 = np.empty(n)
    fy1 = np.empty(n)
    farea = np.empty(n)
    sx0 = np.empty(n)
    sy0 = np.empty(n)
    sx1 = np.empty(n)
    sy1 = np.empty(n)
    conf = np.empty(n)
    hull = np.empty((n, 4), np.int64)
    assign = np.empty(n, np.int64)
    reps = np.empty(n, np.int64)
    k = 0
    for t in range(n):
        x0 = b[t, 0]
        y0 = b[t, 1]
        x1 = b[t, 2]
        y1 = b[t, 3]
        s = key[t]
        area = areas[t]
        best = -1
        best_iou = -1.0
        for ix in range(query[t, 0], query[t, 2] + 1):
            for iy in range(query[t, 1], query[t, 3] + 1):
                e = head[ix * ny + iy]
                while e >= 0:
                    c = who[e]
                    e = nxt[e]
                    a = fx1[c]
                    z = fx0[c]
                    iw = (a if a < x1 else x1) - (z if z > x0 else x0)
                    if iw <= 0.0:
                        continue
                    a = fy1[c]
                    z = fy0[c]
                    ih = (a if a < y1 else y1) - (z if z > y0 else y0)
                    if ih <= 0.0:
                        continue
                    inter = iw * ih
                    iou = inter / (farea[c] + area - inter)
                    if iou > best_iou or (iou == best_iou and c < best):
                        best = c
                        best_iou = iou
        if best >= 0 and best_iou > iou_thr:
            c = best
            assign[t] = c
            sx0[c] += s * x0
            sy0[c] += s * y0
            sx1[c] += s * x1
            sy1[c] += s * y1
            conf[c] += s
            q = conf[c]
            fx0[c] = sx0[c] / q
            fy0[c] = sy0[c] / q
            fx1[c] = sx1[c] / q
            fy1[c] = sy1[c] / q
            farea[c] = (fx1[c] - fx0[c]) * (fy1[c] - fy0[c])
            h0, h1, h2, h3 = hull[c, 0], hull[c, 1], hull[c, 2], hull[c, 3]
            r0, r1, r2, r3 = reg[t, 0], reg[t, 1], reg[t, 2], reg[t, 3]
            if r0 < h0 or r1 < h1 or r2 > h2 or r3 > h3:  # the hull grew: register the new buckets
                n0, n1, n2, n3 = min(r0, h0), min(r1, h1), max(r2, h2), max(r3, h3)
                for ix in range(n0, n2 + 1):
                    for iy in range(n1, n3 + 1):
                        if not (h0 <= ix <= h2 and h1 <= iy <= h3):
                            nxt, who, used = _register(head, nxt, who, used, ix * ny + iy, c)
                hull[c, 0], hull[c, 1], hull[c, 2], hull[c, 3] = n0, n1, n2, n3
            continue
        c = k
        assign[t] = c
        fx0[c], fy0[c], fx1[c], fy1[c], farea[c] = x0, y0, x1, y1, area
        sx0[c], sy0[c], sx1[c], sy1[c], conf[c] = s * x0, s * y0, s * x1, s * y1, s
        for j in range(4):
            hull[c, j] = reg[t, j]
        for ix in range(reg[t, 0], reg[t, 2] + 1):
            for iy in range(reg[t, 1], reg[t, 3] + 1):
                nxt, who, used = _register(head, nxt, who, used, ix * ny + iy, c)
        reps[c] = t
        k += 1
    fused = np.empty((k, 4))
    fused[:, 0] = fx0[:k]
    fused[:, 1] = fy0[:k]
    fused[:, 2] = fx1[:k]
    fused[:, 3] = fy1[:k]
    return assign, fused, conf[:k].copy(), reps[:k].copy()


@numba.njit(cache=True, nogil=True)
def mask_nms_loop(idx, flat, starts, hs, ws, oy, ox, areas, indptr, nbrs, iou_thr):
    """Greedy NMS on mask IoU over inputs ``0 .. n-1`` in visiting order.

    ``idx`` (n,) maps a visiting position to a crop of ``flat`` (bool, the binarised crops row-major one
    after the other, as a :class:`~.crop_table.CropTable`'s pixels), ``starts``, ``hs``, ``ws``, ``oy``,
    ``ox``, ``areas`` (int64, per crop:
    offset in ``flat``, shape, origin in image pixels, pixels set); ``indptr`` / ``nbrs`` the candidate
    pairs (CSR over visiting positions: the pairs whose crop windows overlap). An input not yet suppressed
    suppresses every later neighbour whose mask IoU with it is above ``iou_thr``.

    Returns ``(suppressed (n,) bool, owner (n,) int64)``: ``owner[m]`` the input that suppressed ``m``
    (or ``m`` itself)."""
    n = idx.shape[0]
    suppressed = np.zeros(n, np.bool_)
    owner = np.arange(n)
    for k in range(n):
        if suppressed[k]:
            continue
        a = idx[k]
        for e in range(indptr[k], indptr[k + 1]):
            m = nbrs[e]
            if m <= k or suppressed[m]:
                continue
            c = idx[m]
            y0 = max(oy[a], oy[c])
            x0 = max(ox[a], ox[c])
            y1 = min(oy[a] + hs[a], oy[c] + hs[c])
            x1 = min(ox[a] + ws[a], ox[c] + ws[c])
            inter = 0
            for y in range(y0, y1):
                ra = starts[a] + (y - oy[a]) * ws[a] - ox[a]
                rc = starts[c] + (y - oy[c]) * ws[c] - ox[c]
                for x in range(x0, x1):
                    if flat[ra + x] and flat[rc + x]:
                        inter += 1
            union = areas[a] + areas[c] - inter
            iou = inter / union if union > 0 else 0.0
            if iou > iou_thr:
                suppressed[m] = True
                owner[m] = k
    return suppressed, owner
