"""NMS at the two places a Mask R-CNN keeps only the first boxes NMS lets through: the RPN's
``post_nms_top_n`` proposals and the box head's ``detections_per_img`` detections.

:func:`first_kept` gives the first ``k`` boxes that batched NMS keeps, computed on a prefix of the boxes
when that suffices; :func:`select_detections` is the box head's per-image selection (threshold, NMS per
class, top-k) on it; :class:`FirstKeptDetections` puts it into torchvision's ``RoIHeads``.

The RPN keeps ``post_nms_top_n`` (3,000 for FPN) of the proposals that survive NMS, and the box head
``detections_per_img`` (1,000) detections, yet both ran NMS on every candidate: ~25,700 proposals per image
at test size 1024 (6,000 per level), ~0.3 s of one CPU core per image, and on CUDA torchvision's NMS
reduces its suppression mask in one thread block, one box after the other, so a long list costs
milliseconds per image while the rest of the GPU waits.

Greedy NMS decides a box by the boxes scored above it alone, so NMS on the ``m`` best-scored boxes keeps
exactly the boxes that NMS on all of them keeps among those ``m``. When at least ``k`` survive, the first
``k`` of them (in decreasing score) are the first ``k`` of the full result. :func:`first_kept` tries a
prefix of ``2k`` boxes, then a longer one sized by the fraction kept so far, and only then all of them.
The prefix is extended over boxes tied with its last score, so a tie never straddles the cut (the order of
tied boxes is left to the sort, as in the full call). Suppression is computed by
``torchvision.ops.batched_nms`` on the prefix, whose coordinate offsets between classes depend on the
boxes given: an IoU within float32 rounding of the threshold could be decided differently than in the
full call (as between torchvision's CPU and CUDA paths).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import boxes as box_ops

__all__ = ["first_kept", "select_detections", "FirstKeptDetections"]


def first_kept(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, k: int) -> Tensor:
    """``batched_nms(boxes, scores, idxs, iou_threshold)[:k]`` (indices into ``boxes``, decreasing score).

    Args:
        boxes: float ``(N, 4)`` xyxy; scores: ``(N,)``; idxs: int ``(N,)`` category of each box (boxes of
            different categories never suppress each other); k: how many kept boxes are wanted.
    """
    n = boxes.shape[0]
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    m = 2 * k
    if n > m:
        sorted_scores, order = torch.sort(scores, descending=True, stable=True)
        while m < n:
            m = int((sorted_scores >= sorted_scores[m - 1]).sum())  # the last score's ties along (a prefix)
            if m >= n:
                break
            head = order[:m]
            keep = box_ops.batched_nms(boxes[head], scores[head], idxs[head], iou_threshold)
            kept = keep.numel()
            if kept >= k:
                return head[keep[:k]]
            # too few survive: a prefix long enough at this survival rate, with a margin, at least twice as long
            m = max(2 * m, math.ceil(1.25 * k * m / max(kept, 1)))
    return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)[:k]  # all of them


def select_detections(
    boxes: Tensor, scores: Tensor, *, score_thresh: float, nms_thresh: float, detections_per_img: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class thresholding, NMS and top-k of one image (torchvision's ``postprocess_detections`` for
    one image, with :func:`first_kept`).

    Args:
        boxes: ``(R, K, 4)`` xyxy boxes per candidate and foreground class (clipped).
        scores: ``(R, K)`` foreground class probabilities.

    Returns:
        boxes ``(N, 4)``, scores ``(N,)``, labels int64 ``(N,)`` in 1..K, best score first.
    """
    num_fg = scores.shape[1]
    labels = torch.arange(1, num_fg + 1, device=scores.device).view(1, -1).expand_as(scores)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    # the score threshold and torchvision's remove_small_boxes(min_size=1e-2) as one mask: one wait for the device
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = torch.where((scores > score_thresh) & (ws >= 1e-2) & (hs >= 1e-2))[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = first_kept(boxes, scores, labels, nms_thresh, detections_per_img)
    return boxes[keep], scores[keep], labels[keep]


class FirstKeptDetections:
    """Mixin for subclasses of torchvision's ``RoIHeads``: ``postprocess_detections`` as torchvision's
    (decode, softmax, clip, then per image :func:`select_detections`), with NMS on a prefix of the
    candidates when that suffices (:func:`first_kept`)."""

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(per_image, 0)
        pred_scores = F.softmax(class_logits, -1).split(per_image, 0)
        out: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for boxes, scores, shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            kept = select_detections(
                boxes[:, 1:], scores[:, 1:], score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                detections_per_img=self.detections_per_img,
            )
            for lst, value in zip(out, kept):
                lst.append(value)
        return out
