"""RPN training-time anchor matching over chunks of anchors, to bound memory.

torchvision's ``RegionProposalNetwork`` matches anchors to the ground truth through the full
``(G, A)`` IoU matrix: for a dense SH-SY5Y image at short edge 1024 (~280 cells, ~360k anchors)
``box_iou`` and the ``Matcher`` hold about 6 GB at once (its ``(G, A, 2)`` intermediates, the IoU,
the low-quality-match equality mask). Every entry of the matrix depends on one (box, anchor) pair
only, so the same matching can be computed chunk by chunk of anchors: the best ground truth of each
anchor lies in its chunk's columns, and each ground truth's best IoU is the maximum of its chunk
maxima. A second pass recomputes the (bit-identical) IoU to find the anchors tied at that best IoU
(the Matcher's low-quality matches). The result equals torchvision's exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

__all__ = ["MATCH_CHUNK_PAIRS", "ChunkedMatchRPN", "match_in_chunks"]

#: (ground truth, anchor) pairs per IoU chunk: box_iou holds ~9 floats per pair, 2**22 pairs ~150 MB.
MATCH_CHUNK_PAIRS = 2**22


def match_in_chunks(gt_boxes: Tensor, anchors: Tensor, matcher: Matcher, max_pairs: int = MATCH_CHUNK_PAIRS) -> Tensor:
    """``matcher(box_iou(gt_boxes, anchors))`` without the full IoU matrix.

    Args:
        gt_boxes: float ``(G, 4)`` xyxy, ``G >= 1``.
        anchors: float ``(A, 4)`` xyxy, ``A >= 1``.
        matcher: torchvision ``Matcher`` (thresholds, ``allow_low_quality_matches``).
        max_pairs: IoU entries per chunk (at least one column of ``G``).

    Returns:
        int64 ``(A,)``: index of each anchor's ground truth, ``Matcher.BELOW_LOW_THRESHOLD`` (-1) or
        ``Matcher.BETWEEN_THRESHOLDS`` (-2).
    """
    g, a = int(gt_boxes.shape[0]), int(anchors.shape[0])
    if g == 0 or a == 0:
        return matcher(box_iou(gt_boxes, anchors))  # torchvision's error for empty inputs
    step = max(1, int(max_pairs) // g)
    vals, idxs = [], []
    best_per_gt = None
    for s in range(0, a, step):
        iou = box_iou(gt_boxes, anchors[s : s + step])
        v, i = iou.max(dim=0)
        vals.append(v)
        idxs.append(i)
        row = iou.max(dim=1).values
        best_per_gt = row if best_per_gt is None else torch.maximum(best_per_gt, row)
    matched_vals, matches = torch.cat(vals), torch.cat(idxs)
    all_matches = matches.clone()
    matches[matched_vals < matcher.low_threshold] = matcher.BELOW_LOW_THRESHOLD
    between = (matched_vals >= matcher.low_threshold) & (matched_vals < matcher.high_threshold)
    matches[between] = matcher.BETWEEN_THRESHOLDS
    if matcher.allow_low_quality_matches:
        # every anchor tied at a ground truth's best IoU keeps its best match, even if low
        for s in range(0, a, step):
            tied = (box_iou(gt_boxes, anchors[s : s + step]) == best_per_gt[:, None]).any(dim=0)
            part = matches[s : s + step]
            part[tied] = all_matches[s : s + step][tied]
    return matches


class ChunkedMatchRPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` whose training targets come from
    :func:`match_in_chunks`: the same labels and matched boxes, memory bounded by the chunk."""

    match_chunk_pairs: int = MATCH_CHUNK_PAIRS

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: float32 ``(A,)`` labels (1 object, 0 background, -1 ignored) and float ``(A, 4)``
        matched ground-truth boxes (zeros where none), as torchvision's."""
        labels, matched_boxes = [], []
        for anchors_i, target in zip(anchors, targets):
            gt = target["boxes"]
            if gt.numel() == 0:  # an image without cells: every anchor is background
                matched_boxes.append(torch.zeros(anchors_i.shape, dtype=torch.float32, device=anchors_i.device))
                labels.append(torch.zeros((anchors_i.shape[0],), dtype=torch.float32, device=anchors_i.device))
                continue
            idx = match_in_chunks(gt, anchors_i, self.proposal_matcher, self.match_chunk_pairs)
            matched_boxes.append(gt[idx.clamp(min=0)])
            lab = (idx >= 0).to(torch.float32)
            lab[idx == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(lab)
        return labels, matched_boxes
