"""Windows around the labelled cells of an image: what the quick fine-tuning preset trains on.

A corrected 520 x 704 image holds a few dozen cells; training the heads on a handful of windows of
e.g. 256 px around them, at a smaller input size, costs a fraction of a whole upscaled image per
iteration and still shows the model every corrected cell. numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["crop_windows", "crops_around_cells"]


def crop_windows(labels: np.ndarray, size: int, max_crops: int = 16) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` windows of side ``min(size, image side)`` that together contain
    every labelled cell's box (as far as ``max_crops`` allows).

    Greedy and deterministic: the first cell (in row-major order of its box's top-left corner) not yet
    inside a window gets a window centred on its box (shifted to stay in the image); every cell whose
    box then lies inside that window counts as covered. Cells larger than a window are covered by
    the window over their centre.

    Args:
        labels: ``(H, W)`` integer cell ids, 0 = background.
        size: the window side in pixels (>= 16).
        max_crops: at most this many windows.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {labels.shape}")
    if size < 16:
        raise ValueError(f"crop size must be at least 16 px, got {size}")
    h, w = labels.shape
    ch, cw = min(size, h), min(size, w)
    from scipy import ndimage

    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return []
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False))
    boxes = []
    for i in ids:
        sl = slices[int(i) - 1] if int(i) - 1 < len(slices) else None
        if sl is not None:
            boxes.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
    boxes.sort()
    covered = [False] * len(boxes)
    windows: list[tuple[int, int, int, int]] = []
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        if covered[k]:
            continue
        if len(windows) >= max_crops:
            break
        top = int(np.clip((y0 + y1) // 2 - ch // 2, 0, h - ch))
        left = int(np.clip((x0 + x1) // 2 - cw // 2, 0, w - cw))
        windows.append((top, left, ch, cw))
        for j, (a0, b0, a1, b1) in enumerate(boxes):
            if not covered[j] and a0 >= top and b0 >= left and a1 <= top + ch and b1 <= left + cw:
                covered[j] = True
        covered[k] = True
    return windows


def crops_around_cells(image: np.ndarray, labels: np.ndarray, size: int, max_crops: int = 16
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image crop, labels crop)`` pairs (copies) of :func:`crop_windows`; ``image`` is ``(H, W)`` or
    ``(H, W, C)`` with the labels' height and width. Cells cut by a window's edge keep their part."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    out = []
    for top, left, hh, ww in crop_windows(labels, size, max_crops):
        out.append((np.array(image[top : top + hh, left : left + ww]), np.array(labels[top : top + hh, left : left + ww])))
    return out
