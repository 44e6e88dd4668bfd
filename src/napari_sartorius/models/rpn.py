"""The region proposal network of every architecture: proposals ranked by raw objectness logits.

torchvision's ``RegionProposalNetwork.filter_proposals`` takes each level's top-k by logit but then runs
NMS and the post-NMS top-k on ``sigmoid(logit)`` in float32. ``sigmoid`` rounds to exactly 1.0 for
logits above ~16.6, so a trained model's confident proposals all tie at 1.0 and NMS keeps an arbitrary
one of two overlapping boxes, where detectron2 (``find_top_rpn_proposals``) ranks by the logit and keeps
the more confident one. :class:`LogitRankedRPN` ranks by the logit, as detectron2; the score threshold
still reads the probability (``sigmoid(logit) >= score_thresh``), and the scores it returns are the
probabilities of the kept proposals, in the logit order (the RoI heads use only the boxes).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

from .anchor_matching import ChunkedMatchRPN
from .detection_nms import first_kept

__all__ = ["LogitRankedRPN"]


class LogitRankedRPN(ChunkedMatchRPN):
    """:class:`~.anchor_matching.ChunkedMatchRPN` (torchvision's RPN, chunked training matching) whose
    proposals are selected by raw objectness logits: per-level top-k, then per-level NMS and the
    post-NMS top-k on the logit (float32), as detectron2."""

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Select proposals.

        Args:
            proposals: float ``(B, A, 4)`` decoded boxes (xyxy, input pixels), ``A`` anchors of all levels.
            objectness: ``(B * A, 1)`` or ``(B, A)`` logits.
            image_shapes: ``(h, w)`` of each resized image (boxes are clipped to it).
            num_anchors_per_level: anchors of each level, summing to ``A``.

        Returns:
            Per image: float ``(P, 4)`` boxes and float32 ``(P,)`` objectness probabilities, sorted by
            decreasing logit, ``P <= post_nms_top_n``.
        """
        num_images = proposals.shape[0]
        device = proposals.device
        logits = objectness.detach().reshape(num_images, -1).float()
        levels = torch.cat(
            [torch.full((n,), idx, dtype=torch.int64, device=device) for idx, n in enumerate(num_anchors_per_level)]
        )
        levels = levels.reshape(1, -1).expand_as(logits)
        top_n_idx = self._get_top_n_idx(logits, num_anchors_per_level)  # top-k per level, on logits
        batch_idx = torch.arange(num_images, device=device)[:, None]
        logits = logits[batch_idx, top_n_idx]
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]

        final_boxes, final_scores = [], []
        for boxes, lg, lvl, img_shape in zip(proposals, logits, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            # torchvision's remove_small_boxes and score threshold (>=) as one mask: one wait for the device
            ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            ok = (ws >= self.min_size) & (hs >= self.min_size) & (torch.sigmoid(lg) >= self.score_thresh)
            keep = torch.where(ok)[0]
            boxes, lg, lvl = boxes[keep], lg[keep], lvl[keep]
            # ranked by logit, not sigmoid; NMS on the best-ranked boxes when enough of them survive
            keep = first_kept(boxes, lg, lvl, self.nms_thresh, self.post_nms_top_n())
            final_boxes.append(boxes[keep])
            final_scores.append(torch.sigmoid(lg[keep]))
        return final_boxes, final_scores
