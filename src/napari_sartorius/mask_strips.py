"""Clean many mask crops at once: threshold, fill holes and keep the largest piece of every crop with two
``scipy.ndimage.label`` calls per strip of crops (a few strips in all), instead of two per crop.

A ``label`` call costs ~20 us however small its input, so labelling 1000 crops of ~25 x 25 px one by one
spent most of post-processing's time in call overhead (issue 11). Here the crops are stacked into a few
**strips** (bool arrays, one per band of crop widths, one background row between crops and a background
frame around), and each step runs once over each strip:

* **holes**: background not 4-connected to the crop's border. Every crop's frame of background pixels
  belongs to one 4-connected network (the rows between crops and the strip's frame), so a crop's holes are exactly
  its background components other than that network's;
* **largest piece**: the 8-connected components cannot cross the one-pixel gaps, so each component
  lies in one crop; per crop the component with the most pixels stays (ties: the one whose first pixel
  comes first in raster order, as ``np.argmax`` over a per-crop labelling numbered by
  ``scipy.ndimage.label`` gives: labels follow the first pixel's raster order, and a strip keeps each
  crop's raster order).

The result is bit-identical to the per-crop steps of :mod:`napari_sartorius.postprocess` (tests compare
them on random crops). Memory per strip: one bool and one int32 array of about its crops' summed area
(plus under 1/8 padding); the sizes of pieces are counted only over the rows of crops with several.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["clean_crops", "largest_pieces"]

_EIGHT = np.ones((3, 3), bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


def _strip_width(w: int) -> int:
    """The strip a crop ``w`` px wide goes to: ``w`` rounded up to a step of ~1/8 of it (at least 8 px),
    so that no strip wastes much more than an eighth of its pixels on padding."""
    step = max(8, 1 << max(int(w).bit_length() - 4, 0))
    return -(-int(w) // step) * step


def clean_crops(
    probs: Sequence[np.ndarray], mask_threshold: float, fill_holes: bool, keep_largest: bool
) -> list[np.ndarray]:
    """Threshold each probability crop (``>= mask_threshold``), fill its holes, keep its largest
    8-connected piece.

    Args:
        probs: float32 ``(h_i, w_i)`` mask probabilities per crop.
        mask_threshold: in (0, 1].
        fill_holes: fill background not 4-connected to the crop's border.
        keep_largest: keep only the largest 8-connected component (ties: the first in raster order).

    Returns:
        One bool ``(h_i, w_i)`` array per crop (views into shared strips: do not write to them), the
        same values as thresholding, ``postprocess._fill_holes`` and ``postprocess._largest_component``
        applied crop by crop.
    """
    if not (fill_holes or keep_largest):  # nothing to label: plain thresholds (own arrays)
        return [p >= mask_threshold for p in probs]
    out: list = [None] * len(probs)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(probs):
        groups.setdefault(_strip_width(p.shape[1]), []).append(i)
    for width, idx in groups.items():
        for i, v in zip(idx, _clean_strip([probs[i] for i in idx], width, mask_threshold, fill_holes, keep_largest)):
            out[i] = v
    return out


def largest_pieces(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The largest 8-connected component of each bool ``(h_i, w_i)`` mask (ties: the first in raster
    order; all False stays all False), as ``postprocess._largest_component`` gives crop by crop; views
    into one shared strip (read-only; meant for a few masks at a time: one strip as wide as the widest)."""
    if not masks:
        return []
    width = max(m.shape[1] for m in masks)
    return _clean_strip(masks, width, None, False, True)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorised (int64)."""
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + shift


def _clean_strip(probs, width: int, mask_threshold: float | None, fill_holes: bool, keep_largest: bool) -> list:
    """:func:`clean_crops` of crops at most ``width`` px wide, stacked in one strip ``width + 2`` px wide:
    crop ``k`` owns rows ``y_k .. y_k + h_k - 1`` alone, left-aligned at column 1, with a background row
    between crops and a background frame around the strip. Crops own whole rows, so the components of
    crop ``k`` carry the labels after those of crop ``k - 1`` (labels follow raster order)."""
    hs = np.fromiter((p.shape[0] for p in probs), np.int64, len(probs))
    ys = 1 + np.concatenate([[0], np.cumsum(hs + 1)[:-1]])
    fg = np.zeros((int(ys[-1] + hs[-1]) + 1, width + 2), bool)
    views = []
    for p, y, h in zip(probs, ys.tolist(), hs.tolist()):
        v = fg[y : y + h, 1 : 1 + p.shape[1]]
        if mask_threshold is None:  # bool masks
            v[...] = p
        else:
            np.greater_equal(p, mask_threshold, out=v)
        views.append(v)
    if fill_holes:
        bg, _ = ndimage.label(~fg, structure=_FOUR)
        # column 0 is the frame, part of the one background network around every crop
        np.not_equal(bg, bg[0, 0], out=fg)
        del bg
    if keep_largest:
        lab, n_comp = ndimage.label(fg, structure=_EIGHT)
        # last label of each crop: the running maximum of the labels down to its last row
        ends = np.maximum.accumulate(lab.max(axis=1))[ys + hs - 1]
        counts = np.diff(ends, prepend=0)
        multi = np.flatnonzero(counts > 1)
        if multi.size:  # only the rows and labels of crops with several pieces are looked at
            rows = _ranges(ys[multi], hs[multi])
            sub = lab[rows]
            sizes = np.bincount(sub.ravel(), minlength=n_comp + 1)
            comp = _ranges(ends[multi] - counts[multi] + 1, counts[multi])
            owner = np.repeat(multi, counts[multi])
            # per crop: most pixels first, then the lowest label (the first in raster order)
            order = np.lexsort((comp, -sizes[comp], owner))
            first = np.ones(comp.size, bool)
            first[1:] = owner[order][1:] != owner[order][:-1]
            keep = np.ones(n_comp + 1, bool)
            keep[0] = False
            keep[comp] = False
            keep[comp[order[first]]] = True
            fg[rows] = keep[sub]
    return views
