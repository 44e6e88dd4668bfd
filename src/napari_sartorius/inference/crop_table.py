"""Many mask crops as one flat table, and the vectorised crop operations fusion needs.

Fusion averages the crops of each cluster's members and the uncertainty counts how many pixels of each
member's binarised crop fall on the fused cell's; with 12 sources x 1000 detections that is 12,000
small crops, and a Python loop over them costs more than a GPU forward. Both operations work on the
member crops' pixels laid end to end in one flat float32 array, and on *row segments*: each row of a
member crop lands on one contiguous run of its target window, so one ``np.repeat`` of the per-row
offsets plus one ``np.arange`` gives every pixel's index in the target, whatever the number of crops.

- :func:`average_groups` (fusion's mask averaging, and the uncertainty's counts on the way): every member
  lies inside its group's window; sums with ``np.add.at`` in member order, as a per-group loop would.
- :func:`count_intersections` (the uncertainty of cells added one by one, e.g. Soft-NMS's support,
  which may reach outside the fused window): crops anywhere against windows anywhere, through
  :func:`row_segments`, which clips each row to the target; the crops come from a :class:`CropTable`.

Pairs or groups are processed in chunks of at most ``CHUNK_PIXELS`` member pixels, so the temporary
index arrays stay small (a few MB).

Coordinates: a crop ``(h, w)`` at origin ``(y0, x0)`` covers image rows ``y0 .. y0 + h - 1`` and
columns ``x0 .. x0 + w - 1``; flat crops are row-major.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["CropTable", "GroupMeans", "CHUNK_PIXELS", "binarised", "pair_chunks", "row_segments", "average_groups",
           "count_intersections"]

#: Member pixels expanded at once (bounds the temporary index arrays: 8 bytes each).
CHUNK_PIXELS = 1 << 18


@dataclass
class CropTable:
    """N crops flattened: ``flat`` float32 ``(P,)`` row-major pixels of every crop, one after the other;
    ``starts`` int64 ``(N,)`` offset of each crop in ``flat``; ``hs``, ``ws`` int64 ``(N,)`` crop shape;
    ``oy``, ``ox`` int64 ``(N,)`` crop origin ``(y0, x0)`` in image pixels."""

    flat: np.ndarray
    starts: np.ndarray
    hs: np.ndarray
    ws: np.ndarray
    oy: np.ndarray
    ox: np.ndarray

    @classmethod
    def from_crops(cls, masks: Sequence[np.ndarray], origins) -> CropTable:
        """From a list of 2-D float crops and their ``(N, 2)`` int ``(y0, x0)`` origins."""
        n = len(masks)
        hs = np.fromiter((m.shape[0] for m in masks), np.int64, n)
        ws = np.fromiter((m.shape[1] for m in masks), np.int64, n)
        sizes = hs * ws
        starts = np.cumsum(sizes) - sizes
        flat = np.concatenate([m.ravel() for m in masks]).astype(np.float32, copy=False) if n else np.zeros(0, np.float32)
        origins = np.asarray(origins, np.int64).reshape(-1, 2)
        return cls(flat, starts, hs, ws, origins[:, 0].copy(), origins[:, 1].copy())

    @property
    def sizes(self) -> np.ndarray:
        return self.hs * self.ws

    def crop(self, i: int) -> np.ndarray:
        """Crop ``i`` as a ``(h, w)`` view of ``flat``."""
        s = int(self.starts[i])
        return self.flat[s : s + int(self.hs[i] * self.ws[i])].reshape(int(self.hs[i]), int(self.ws[i]))


def binarised(table: CropTable, threshold) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel of ``table`` at ``>= threshold`` (float32 comparison): bool ``(P,)`` laid out as
    ``table.flat``, and int64 ``(N,)`` the pixels set in each crop (counted crop by crop: no large
    temporary)."""
    bits = table.flat >= np.float32(threshold)
    starts, sizes = table.starts.tolist(), table.sizes.tolist()
    areas = np.fromiter((np.count_nonzero(bits[s : s + n]) for s, n in zip(starts, sizes)), np.int64, len(sizes))
    return bits, areas


def pair_chunks(pixels: np.ndarray, budget: int = CHUNK_PIXELS) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` consecutive ranges of pairs whose ``pixels`` add up to at most ``budget``
    (a single pair larger than the budget gets a range of its own)."""
    n = len(pixels)
    if n == 0:
        return []
    cum = np.cumsum(pixels)
    out = []
    lo = 0
    while lo < n:
        base = cum[lo - 1] if lo else 0
        hi = int(np.searchsorted(cum, base + budget, side="right"))
        hi = min(max(hi, lo + 1), n)
        out.append((lo, hi))
        lo = hi
    return out


def row_segments(m_start, m_h, m_w, m_oy, m_ox, t_start, t_h, t_w, t_oy, t_ox):
    """Flat pixel indices of the member crops that fall inside the target windows, pair by pair.

    Every argument is an int64 array over the pairs ``(P,)``: the member crop's offset in its flat
    array, shape and origin; the target window's offset in its flat array, shape and origin.

    Returns ``(src, dst, pair)``: int64 arrays over the overlapping pixels, ``src`` the pixel's index in
    the members' flat array, ``dst`` in the targets' flat array, ``pair`` the pair it belongs to
    (pixels of a pair are consecutive, in row-major order of the member crop).
    """
    n_pairs = len(m_start)
    pair_row = np.repeat(np.arange(n_pairs), m_h)
    i = np.arange(len(pair_row)) - np.repeat(np.cumsum(m_h) - m_h, m_h)  # row inside the member crop
    ty = (m_oy - t_oy)[pair_row] + i  # the same row inside the target window
    lo = np.maximum(t_ox - m_ox, 0)  # columns of the member crop inside the target window
    hi = np.minimum(m_w, t_ox + t_w - m_ox)
    span = np.maximum(hi - lo, 0)[pair_row]
    length = np.where((ty >= 0) & (ty < t_h[pair_row]), span, 0)
    src0 = m_start[pair_row] + i * m_w[pair_row] + lo[pair_row]
    dst0 = t_start[pair_row] + ty * t_w[pair_row] + (m_ox + lo - t_ox)[pair_row]
    done = np.cumsum(length) - length
    ar = np.arange(int(length.sum()))
    src = np.repeat(src0 - done, length) + ar
    dst = np.repeat(dst0 - done, length) + ar
    return src, dst, np.repeat(pair_row, length)


@dataclass
class GroupMeans:
    """What :func:`average_groups` returns.

    Attributes:
        flat: float32 ``(Q,)`` the averaged crops one after the other (row-major).
        starts: int64 ``(G,)`` offset of each group's crop in ``flat``.
        windows: int64 ``(G, 4)`` ``(y0, x0, h, w)`` of each group's crop in image pixels.
        member_area: int64 ``(R,)`` pixels of each member's crop at ``>= threshold`` (with a threshold).
        inter: int64 ``(R,)`` pixels at ``>= threshold`` in both the member's crop and its group's mean.
        group_area: int64 ``(G,)`` pixels of each group's mean at ``>= threshold``.
    """

    flat: np.ndarray
    starts: np.ndarray
    windows: np.ndarray
    member_area: np.ndarray | None = None
    inter: np.ndarray | None = None
    group_area: np.ndarray | None = None

    def crop(self, g: int) -> np.ndarray:
        s = int(self.starts[g])
        h, w = int(self.windows[g, 2]), int(self.windows[g, 3])
        return self.flat[s : s + h * w].reshape(h, w)


def average_groups(masks: Sequence[np.ndarray], origins: np.ndarray, rows, bounds, weights,
                   threshold: float | None = None, budget: int = CHUNK_PIXELS,
                   shapes: np.ndarray | None = None) -> GroupMeans:
    """Weighted mean of each group's crops over the union of their windows (0 where a crop does not
    reach), clipped to [0, 1]; with ``threshold``, also the pixel counts the uncertainty needs.

    Args:
        masks: 2-D float crops; origins: int ``(N, 2)`` their ``(y0, x0)``.
        rows: int ``(R,)`` crop indices, grouped: group ``g`` is ``rows[bounds[g] : bounds[g + 1]]``
            (every group non-empty).
        bounds: int ``(G + 1,)`` group boundaries in ``rows``.
        weights: float ``(R,)`` weight of each row; a group whose weights sum to 0 is left unscaled.
        threshold: binarise at ``>=`` this and count member areas, overlaps and group areas.
        budget: member pixels processed at once (whole groups; a larger group goes alone).
        shapes: int ``(N, 2)`` the crops' shapes, when the caller has them.

    Member pixels are gathered group by group into one flat array; every member row lands on a
    contiguous run of its group's window, so one ``np.repeat`` gives every pixel's destination and one
    unbuffered ``np.add.at`` sums them. The arithmetic is the per-group loop's it replaces, in the same
    order: float32 products ``float32(weight) x crop`` added in member order in float32, times
    ``float32(1 / sum of weights)`` (the sum in float64, in member order), clipped: the results are equal
    bit for bit.
    """
    rows = np.asarray(rows, np.int64)
    bounds = np.asarray(bounds, np.int64)
    weights = np.asarray(weights, np.float64)
    origins = np.asarray(origins, np.int64).reshape(-1, 2)
    n_groups = len(bounds) - 1
    n_rows = len(rows)
    row_list = rows.tolist()
    if shapes is None:
        shapes = np.array([m.shape for m in masks], np.int64).reshape(-1, 2)
    hs, ws = shapes[rows, 0], shapes[rows, 1]
    oy, ox = origins[rows, 0], origins[rows, 1]
    if n_groups == 0:
        empty = np.zeros(0, np.int64)
        return GroupMeans(np.zeros(0, np.float32), empty, np.zeros((0, 4), np.int64), empty, empty, empty)
    y0 = np.minimum.reduceat(oy, bounds[:-1])
    x0 = np.minimum.reduceat(ox, bounds[:-1])
    gh = np.maximum.reduceat(oy + hs, bounds[:-1]) - y0
    gw = np.maximum.reduceat(ox + ws, bounds[:-1]) - x0
    gsize = gh * gw
    gstart = np.cumsum(gsize) - gsize
    counts = np.diff(bounds)
    group = np.repeat(np.arange(n_groups), counts)
    msize = hs * ws
    total = np.bincount(group, weights=weights, minlength=n_groups)  # float64, in member order
    scale = np.where(total > 0, 1.0 / np.where(total > 0, total, 1.0), 1.0).astype(np.float32)
    w32 = weights.astype(np.float32)
    out = np.empty(int(gsize.sum()), np.float32)
    counting = threshold is not None
    if counting:
        thr = np.float32(threshold)
        member_area = np.zeros(n_rows, np.int64)
        inter = np.zeros(n_rows, np.int64)
        group_area = np.zeros(n_groups, np.int64)
    group_pixels = np.bincount(group, weights=msize, minlength=n_groups).astype(np.int64)
    for glo, ghi in pair_chunks(group_pixels, budget):
        rlo, rhi = int(bounds[glo]), int(bounds[ghi])
        base = int(gstart[glo])
        top = int(gstart[ghi - 1] + gsize[ghi - 1])
        m_h, m_w, g = hs[rlo:rhi], ws[rlo:rhi], group[rlo:rhi]
        m_size = msize[rlo:rhi]
        mflat = np.concatenate([masks[m].ravel() for m in row_list[rlo:rhi]])
        # per member row: where it starts in mflat and in the chunk's windows
        row_member = np.repeat(np.arange(rhi - rlo), m_h)
        i = np.arange(len(row_member)) - np.repeat(np.cumsum(m_h) - m_h, m_h)
        src0 = (np.cumsum(m_size) - m_size)[row_member] + i * m_w[row_member]
        gm = g[row_member]
        dst0 = (gstart[gm] - base) + (oy[rlo:rhi][row_member] - y0[gm] + i) * gw[gm] + (ox[rlo:rhi] - x0[g])[row_member]
        dst = np.repeat(dst0 - src0, m_w[row_member])
        dst += np.arange(len(mflat), dtype=np.int64)
        vals = mflat * np.repeat(w32[rlo:rhi], m_size)
        mean = out[base:top]
        mean[:] = 0.0
        np.add.at(mean, dst, vals)  # in index order: each pixel's sum runs over the members in order
        mean *= np.repeat(scale[glo:ghi], gsize[glo:ghi])
        np.clip(mean, 0.0, 1.0, out=mean)
        if counting:  # (int32 sums: a chunk holds at most ``budget`` pixels, or one group's)
            mbits = mflat >= thr
            fbits = mean >= thr
            m_starts = np.cumsum(m_size) - m_size
            member_area[rlo:rhi] = np.add.reduceat(mbits, m_starts, dtype=np.int32)
            both = np.take(fbits, dst)
            both &= mbits
            inter[rlo:rhi] = np.add.reduceat(both, m_starts, dtype=np.int32)
            group_area[glo:ghi] = np.add.reduceat(fbits, gstart[glo:ghi] - base, dtype=np.int32)
    windows = np.stack([y0, x0, gh, gw], axis=1)
    if counting:
        return GroupMeans(out, gstart, windows, member_area, inter, group_area)
    return GroupMeans(out, gstart, windows)


def count_intersections(m_bits, m_table: CropTable, members, t_bits, t_starts, t_windows, targets) -> np.ndarray:
    """int64 ``(P,)`` pixels set in both the member crop and the target window, for each pair.

    Args:
        m_bits: bool ``(P_m,)`` the members' binarised flat pixels (laid out as ``m_table.flat``).
        m_table: the members' geometry; members: int ``(P,)`` member crop of each pair.
        t_bits: bool ``(P_t,)`` the targets' binarised flat pixels; t_starts: int64 ``(T,)`` offsets;
        t_windows: int64 ``(T, 4)`` ``(y0, x0, h, w)``; targets: int ``(P,)`` target of each pair.
    """
    members = np.asarray(members, np.int64)
    targets = np.asarray(targets, np.int64)
    out = np.zeros(len(members), np.int64)
    m_h, m_w = m_table.hs[members], m_table.ws[members]
    for lo, hi in pair_chunks(m_h * m_w):
        m, t = members[lo:hi], targets[lo:hi]
        src, dst, pair = row_segments(
            m_table.starts[m], m_h[lo:hi], m_w[lo:hi], m_table.oy[m], m_table.ox[m],
            t_starts[t], t_windows[t, 2], t_windows[t, 3], t_windows[t, 0], t_windows[t, 1],
        )
        hit = m_bits[src] & t_bits[dst]
        out[lo:hi] = np.bincount(pair[hit], minlength=hi - lo)
    return out
