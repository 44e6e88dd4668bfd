"""The per-instance post-processing as it was before the batched cleaning (issue 11), kept verbatim as
the reference that :func:`napari_sartorius.postprocess.postprocess` must match bit for bit.

One ``scipy.ndimage.label`` call per crop for the holes, one for the largest piece, one for the
remainder after overlap removal; slow, but obviously the documented steps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_sartorius.postprocess import PostprocessSettings, majority_class

_EIGHT = np.ones((3, 3), bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask, structure=_EIGHT)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    if h < 3 or w < 3:
        return mask
    bg, n = ndimage.label(~mask, structure=_FOUR)
    if n == 0:
        return mask
    border = np.zeros(n + 1, bool)
    border[bg[0]] = True
    border[bg[-1]] = True
    border[bg[:, 0]] = True
    border[bg[:, -1]] = True
    if border[1:].all():
        return mask
    border[0] = False
    return ~border[bg]


def clean_crop(prob: np.ndarray, s: PostprocessSettings) -> np.ndarray:
    m = prob >= s.mask_threshold
    if not m.any():
        return m
    if s.fill_holes:
        m = fill_holes(m)
    if s.keep_largest:
        m = largest_component(m)
    return m


def reference_postprocess(instances, s: PostprocessSettings, exclude=None):
    """``(labels, kept, areas, cell_type)`` of the pre-issue-11 implementation."""
    n_cls = len(s.class_names)
    h, w = instances.image_size
    if s.cell_type is not None:
        ctype = s.cell_type
    else:
        k = majority_class(instances, n_cls)
        ctype = None if k is None else s.class_names[k]
    score_thr, min_area = s.for_type(ctype) if ctype is not None else (0.0, 0)
    scores = instances.scores
    ok = scores >= score_thr
    if exclude is not None:
        ok &= ~np.asarray(exclude, bool)
    cand = np.flatnonzero(ok)
    cand = cand[np.argsort(-scores[cand], kind="stable")]
    labels = np.zeros((h, w), np.uint16 if cand.size < 65535 else np.uint32)
    kept, areas = [], []
    for i in cand:
        m = clean_crop(instances.masks[i], s)
        total = int(np.count_nonzero(m))
        if total < min_area or total == 0:
            continue
        y0, x0 = int(instances.mask_origins[i, 0]), int(instances.mask_origins[i, 1])
        window = labels[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]]
        rem = m & (window == 0)
        left = int(np.count_nonzero(rem))
        if left < total:
            if (total - left) > s.max_overlap * total:
                continue
            if s.keep_largest and left:
                rem = largest_component(rem)
                left = int(np.count_nonzero(rem))
        if left < min_area or left == 0:
            continue
        kept.append(int(i))
        areas.append(left)
        window[rem] = len(kept)
    return labels, np.asarray(kept, np.int64), np.asarray(areas, np.int64), ctype
