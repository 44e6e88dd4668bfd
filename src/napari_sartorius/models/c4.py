"""The C4 RoI head of detectron2's ``Res5ROIHeads``: res5 shared by the box and the mask branch.

Per proposal: RoIAlign 14x14 on res4 (stride 16) -> res5 stage (1024 -> 2048 channels, stride 2: 7x7)
-> mean over the 7x7 -> ``box_predictor`` (class scores and class-specific box deltas). The mask branch
reuses the res5 output of the foreground proposals in training, and runs res5 again on the final boxes at
test time: ``mask_predictor`` = 2x2 stride-2 deconvolution (2048 -> 256) + ReLU + 1x1 conv to the
class logits, a 14x14 mask.

Parameter names: ``roi_heads.res5.{0,1,2}...`` (torchvision bottleneck names; detectron2
``roi_heads.res5.{i}...``), ``roi_heads.box_predictor.cls_score`` ``(K + 1, 2048)`` with background at
row 0 (detectron2: last), ``roi_heads.box_predictor.bbox_pred`` ``(4 (K + 1), 2048)`` with a background
block first (detectron2 ``(4 K, 2048)``, no background), ``roi_heads.mask_predictor.conv5_mask``
(detectron2 ``roi_heads.mask_head.deconv``) and ``roi_heads.mask_predictor.mask_fcn_logits``
``(K + 1, 256, 1, 1)``, background channel 0 (detectron2 ``roi_heads.mask_head.predictor`` ``(K, ...)``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_inference,
)

from .detection_nms import FirstKeptDetections
from .mask_loss import mask_rcnn_loss

__all__ = ["Res5RoIHeads"]


class Res5RoIHeads(FirstKeptDetections, RoIHeads):
    """RoI heads of a C4 Mask R-CNN.

    Args:
        pooler: a single-level :class:`~.pooler.RoIPooler` on feature ``"0"`` (res4), output 14.
        res5: the res5 stage, ``(R, 1024, 14, 14) -> (R, 2048, 7, 7)``.
        box_predictor: ``FastRCNNPredictor(2048, K + 1)``.
        mask_predictor: ``MaskRCNNPredictor(2048, 256, K + 1)``.
        inference_chunk: proposals per res5 pass at test time (bounds memory: 256 proposals hold
            ~200 MB of pooled res4 features).
        The other arguments are torchvision ``RoIHeads``' (sampling, box coder, inference thresholds).

    ``forward(features, proposals, image_shapes, targets=None)`` as torchvision's ``RoIHeads``: training
    returns losses ``loss_classifier``, ``loss_box_reg``, ``loss_mask``; eval returns per image
    ``boxes`` ``(N, 4)``, ``labels`` ``(N,)`` in 1..K, ``scores`` ``(N,)``, ``masks`` ``(N, 1, 14, 14)``
    probabilities of the predicted class.
    """

    def __init__(
        self,
        pooler: nn.Module,
        res5: nn.Module,
        box_predictor: nn.Module,
        mask_predictor: nn.Module,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        inference_chunk: int = 256,
    ) -> None:
        super().__init__(
            pooler,
            None,
            box_predictor,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            bbox_reg_weights,
            score_thresh,
            nms_thresh,
            detections_per_img,
        )
        self.res5 = res5
        self.mask_predictor = mask_predictor
        self.inference_chunk = int(inference_chunk)

    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    def _res5(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes) -> Tensor:
        """res5 features ``(R, 2048, 7, 7)`` of the boxes (chunked at test time)."""
        if self.training or sum(len(b) for b in boxes) <= self.inference_chunk:
            return self.res5(self.box_roi_pool(features, boxes, image_shapes))
        outs = []
        flat = [(i, b) for i, bb in enumerate(boxes) for b in bb.split(self.inference_chunk)]
        for i, chunk in flat:
            per_image = [chunk if j == i else chunk.new_zeros((0, 4)) for j in range(len(boxes))]
            outs.append(self.res5(self.box_roi_pool(features, per_image, image_shapes)))
        return torch.cat(outs)

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self._res5(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(box_features.mean(dim=(2, 3)))

        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            fg = [lab > 0 for lab in labels]
            mask_logits = self.mask_predictor(box_features[torch.cat(fg)])
            loss_mask = mask_rcnn_loss(
                mask_logits,
                [p[m] for p, m in zip(proposals, fg)],
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                [i[m] for i, m in zip(matched_idxs, fg)],
            )
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}
            return [], losses

        del box_features
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]
        if sum(len(b) for b in boxes):
            mask_logits = self.mask_predictor(self._res5(features, boxes, image_shapes))
            probs = maskrcnn_inference(mask_logits, labels)
        else:
            side = self.box_roi_pool.output_size[0]  # res5 halves it, the deconv doubles it back
            probs = [b.new_zeros((0, 1, side, side)) for b in boxes]
        for r, p in zip(result, probs):
            r["masks"] = p
        return result, {}
