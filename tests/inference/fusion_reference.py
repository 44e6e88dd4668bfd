"""Slow reference implementations of the fusion internals, as they were before vectorising (kept here
so the tests can compare the fast versions with them on random inputs)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from napari_sartorius.inference.uncertainty import MATCH_IOU, UNCERTAINTY_WEIGHTS, combine


def reference_average_masks(members: list, weights: list, masks: list, origins: list):
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


def reference_cluster_wbf(b, key, w, src, iou_thr, conf_type, weights, allows_overflow):
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


class ReferenceClusterAgreement:
    """Collects fused cells (one :meth:`add` each), then computes their three agreements at once.

    All candidates are binarised in one pass; per member, one slice of the fused mask and one count;
    the IoUs, the best member per (cell, source) and the per-cell statistics are vectorised (fusion
    time matters: ``benchmarks/bench_review.py`` measures the cost).

    Args:
        masks, origins: every candidate's mask crop (float probabilities) and its ``(y0, x0)``.
        src: int ``(M,)`` source index of every candidate; scores: ``(M,)`` raw scores.
        source_weights: ``(S,)`` positive weight of each source.
        mask_threshold: probability at which masks are binarised.
        table: ignored (``ClusterAgreement``'s table built by the caller; the reference binarises the crops
            itself).
    """

    def __init__(self, masks, origins, src, scores, source_weights, mask_threshold: float = 0.5, table=None):
        self.masks, self.origins = masks, origins
        self.src = np.asarray(src, np.int64)
        self.scores = np.asarray(scores, np.float64)
        self.w = np.asarray(source_weights, np.float64)
        self.thr = np.float32(mask_threshold)
        # every candidate binarised in one pass: flat bits, offsets and areas
        sizes = np.fromiter((m.size for m in masks), np.int64, len(masks))
        self._ends = np.cumsum(sizes)
        self._starts = self._ends - sizes
        flat = np.concatenate([m.ravel() for m in masks]) if masks else np.zeros(0, np.float32)
        self._bits = flat >= self.thr
        # crops are never empty (at least 1 x 1), so reduceat's segments are the crops
        self.areas = (
            np.add.reduceat(self._bits.view(np.uint8), self._starts, dtype=np.int64)
            if len(masks) else np.zeros(0, np.int64)
        )
        self._starts_l = self._starts.tolist()
        self._cell: list[int] = []
        self._member: list[int] = []
        self._inter: list[int] = []
        self._fused_area: list[int] = []
        self._n = 0

    def add(self, crop: np.ndarray, origin, members: Sequence[int]) -> None:
        """One fused cell: its mask ``crop`` at ``(y0, x0)`` ``origin`` and its members' candidate indices."""
        k = self._n
        self._n += 1
        if len(members) == 1 and crop is self.masks[members[0]]:  # the fused mask is this member's crop
            m = members[0]
            a = int(self.areas[m])
            self._cell.append(k), self._member.append(m), self._inter.append(a), self._fused_area.append(a)
            return
        fb = crop >= self.thr
        fa = int(np.count_nonzero(fb))
        fy, fx = origin
        fh, fw = fb.shape
        bits, starts, origins, masks = self._bits, self._starts_l, self.origins, self.masks
        for m in members:
            h, w = masks[m].shape
            my, mx = origins[m]
            mb = bits[starts[m] : starts[m] + h * w].reshape(h, w)
            dy, dx = my - fy, mx - fx
            if dy >= 0 and dx >= 0 and dy + h <= fh and dx + w <= fw:  # inside the fused window (averaging)
                inter = int(np.count_nonzero(fb[dy : dy + h, dx : dx + w] & mb))
            else:
                y0, x0 = max(dy, 0), max(dx, 0)
                y1, x1 = min(dy + h, fh), min(dx + w, fw)
                inter = 0
                if y1 > y0 and x1 > x0:
                    inter = int(np.count_nonzero(fb[y0:y1, x0:x1] & mb[y0 - dy : y1 - dy, x0 - dx : x1 - dx]))
            self._cell.append(k)
            self._member.append(m)
            self._inter.append(inter)
            self._fused_area.append(fa)

    def columns(self, order: np.ndarray | None = None, weights=UNCERTAINTY_WEIGHTS) -> dict[str, np.ndarray]:
        """The columns ``uncertainty``, ``found``, ``mask_iou``, ``score_spread`` (float32, in ``order``)."""
        n = self._n
        cell = np.asarray(self._cell, np.int64)
        member = np.asarray(self._member, np.int64)
        inter = np.asarray(self._inter, np.float64)
        union = self.areas[member] + np.asarray(self._fused_area, np.float64) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        src = self.src[member]
        # the best member of each (cell, source): sort by cell, source, decreasing IoU
        order_p = np.lexsort((-iou, src, cell))
        cell, src, iou, member = cell[order_p], src[order_p], iou[order_p], member[order_p]
        first = np.ones(len(cell), bool)
        first[1:] = (cell[1:] != cell[:-1]) | (src[1:] != src[:-1])
        hit = first & (iou >= MATCH_IOU)
        c, s, v, sc = cell[hit], src[hit], iou[hit], self.scores[member[hit]]
        count = np.bincount(c, minlength=n).astype(np.float64)
        found = np.bincount(c, weights=self.w[s], minlength=n) / float(self.w.sum())
        safe = np.maximum(count, 1.0)
        mean_iou = np.bincount(c, weights=v, minlength=n) / safe
        m1 = np.bincount(c, weights=sc, minlength=n) / safe
        m2 = np.bincount(c, weights=sc * sc, minlength=n) / safe
        spread = np.where(count > 1, np.sqrt(np.maximum(m2 - m1 * m1, 0.0)), 0.0)
        found, mean_iou, spread = (np.clip(a, 0.0, 1.0).astype(np.float32) for a in (found, mean_iou, spread))
        if order is not None:
            found, mean_iou, spread = found[order], mean_iou[order], spread[order]
        return {
            "uncertainty": combine(found, mean_iou, spread, weights),
            "found": found,
            "mask_iou": mean_iou,
            "score_spread": spread,
        }


