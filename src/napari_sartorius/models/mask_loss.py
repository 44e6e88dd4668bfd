"""Mask R-CNN mask loss without full-image float copies of the ground-truth masks.

torchvision's ``maskrcnn_loss`` (``project_masks_on_boxes``) converts each image's ``(G, H, W)``
ground-truth masks to float and RoIAligns the matched mask of every positive RoI from that tensor:
for a dense SH-SY5Y image at short edge 1024 (300 cells, 1024 x 1386) that is 1.7 GB of float masks
per image. Here each positive RoI reads only a window of its matched uint8 mask around its box, a
chunk of windows at a time, converted to float per chunk; RoIAlign (``aligned=False``, adaptive
sampling, as torchvision) then runs on the windows with the boxes shifted into them.

Equivalence: a window spans the box plus two pixels on each side (every bilinear sample and its
neighbour), clipped to the image, and is never padded: windows of a chunk share one size and are
slid to stay inside the image. So each sample sees the same pixels as on the full mask, and a
window edge that a sample can reach is the image edge, where RoIAlign's border rule (clamp to the
last pixel up to one pixel out, zero beyond) is the same. Targets agree with torchvision's to float
rounding of the shifted coordinates (about 1e-5).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["MASK_TARGET_CHUNK_PIXELS", "mask_rcnn_loss", "mask_targets"]

#: Window pixels per RoIAlign pass (all windows of a chunk have its largest height and width):
#: 2**22 float pixels are 16 MB.
MASK_TARGET_CHUNK_PIXELS = 2**22


def _windows(boxes: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per box the first row/column and the size of the pixels its RoIAlign samples can touch.

    Returns int64 ``(y0, x0, h, w)``, each ``(R,)``: window ``[y0, y0 + h) x [x0, x0 + w)`` inside the
    image, ``h, w >= 1``.
    """
    x0, y0, x1, y1 = boxes.detach().float().unbind(1)
    # aligned=False RoIAlign stretches boxes narrower than 1 px to 1 px
    x1, y1 = torch.maximum(x1, x0 + 1), torch.maximum(y1, y0 + 1)
    # samples lie in [x0, x1] and read pixels floor(x) and floor(x) + 1: one more pixel of margin each side
    sx = (x0.floor() - 1).clamp(0, width).long()
    ex = (x1.floor() + 3).clamp(0, width).long()
    sy = (y0.floor() - 1).clamp(0, height).long()
    ey = (y1.floor() + 3).clamp(0, height).long()
    return sy, sx, (ey - sy).clamp(min=1), (ex - sx).clamp(min=1)


def _chunks(h: list[int], w: list[int], max_pixels: int) -> list[tuple[int, int]]:
    """``(start, stop)`` runs of boxes whose windows, padded to the run's largest height and width,
    hold at most ``max_pixels`` (a single box may exceed it)."""
    runs, start, mh, mw = [], 0, 0, 0
    for i, (hi, wi) in enumerate(zip(h, w)):
        nh, nw = max(mh, hi), max(mw, wi)
        if i > start and (i + 1 - start) * nh * nw > max_pixels:
            runs.append((start, i))
            start, nh, nw = i, hi, wi
        mh, mw = nh, nw
    runs.append((start, len(h)))
    return runs


def mask_targets(
    gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int, *, max_pixels: int = MASK_TARGET_CHUNK_PIXELS
) -> Tensor:
    """Mask targets of one image's positive RoIs, as torchvision's ``project_masks_on_boxes``.

    Args:
        gt_masks: ``(G, H, W)`` ground-truth masks, uint8/bool 0/1 (or float), in the resized image's pixels.
        boxes: float ``(R, 4)`` xyxy RoIs in the same pixels.
        matched_idxs: int64 ``(R,)`` index into ``gt_masks`` of each RoI's ground truth.
        size: M, the side of the targets.
        max_pixels: window pixels converted to float per pass (bounds memory).

    Returns:
        ``(R, M, M)`` targets in [0, 1], ``boxes``' dtype and device: the RoIAlign (spatial scale 1,
        adaptive sampling, not aligned) of each matched mask over its box.
    """
    n = int(boxes.shape[0])
    if n == 0:
        return boxes.new_zeros((0, size, size))
    height, width = int(gt_masks.shape[-2]), int(gt_masks.shape[-1])
    sy, sx, h, w = _windows(boxes, height, width)
    idx = matched_idxs.to(device=gt_masks.device, dtype=torch.int64)
    out = []
    for a, b in _chunks(h.tolist(), w.tolist(), max_pixels):
        hc, wc = int(h[a:b].max()), int(w[a:b].max())
        # slide each window so that the common size stays inside the image (no padding)
        y0 = torch.minimum(sy[a:b], torch.full_like(sy[a:b], height - hc))
        x0 = torch.minimum(sx[a:b], torch.full_like(sx[a:b], width - wc))
        rows = (y0[:, None] + torch.arange(hc, device=y0.device)).to(gt_masks.device)
        cols = (x0[:, None] + torch.arange(wc, device=x0.device)).to(gt_masks.device)
        crops = gt_masks[idx[a:b, None, None], rows[:, :, None], cols[:, None, :]].to(boxes)
        shift = torch.stack([x0, y0, x0, y0], dim=1).to(boxes)
        rois = torch.cat([torch.arange(b - a, device=boxes.device, dtype=boxes.dtype)[:, None], boxes[a:b] - shift], dim=1)
        out.append(roi_align(crops[:, None], rois, (size, size), 1.0)[:, 0])
    return torch.cat(out)


def mask_rcnn_loss(
    mask_logits: Tensor,
    proposals: Sequence[Tensor],
    gt_masks: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    mask_matched_idxs: Sequence[Tensor],
    *,
    max_pixels: int = MASK_TARGET_CHUNK_PIXELS,
) -> Tensor:
    """Mean per-pixel binary cross-entropy of the matched class's mask logits (torchvision's
    ``maskrcnn_loss``, same arguments and value, without full-image float masks).

    Args:
        mask_logits: ``(P, K + 1, M, M)`` logits of the positive RoIs of all images, in order.
        proposals: per image, float ``(P_i, 4)`` positive RoIs.
        gt_masks: per image, ``(G_i, H, W)`` uint8 ground-truth masks (bool or float work too).
        gt_labels: per image, int64 ``(G_i,)`` classes 1..K.
        mask_matched_idxs: per image, int64 ``(P_i,)`` matched ground truth of each RoI.

    Returns:
        the scalar loss (``0 * mask_logits.sum()`` without positive RoIs, so the graph stays connected).
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([lab[i] for lab, i in zip(gt_labels, mask_matched_idxs)])
    targets = torch.cat(
        [mask_targets(m, p, i, size, max_pixels=max_pixels) for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)]
    )
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(picked, targets)
