"""MMDetection's Cascade Mask R-CNN (``CascadeRCNN`` + ``CascadeRoIHead``) on the project's model.

The architectures ``mmdet_cascade_mask_rcnn_{R_50,R_101,X_101_32x8d}_FPN`` (:mod:`.registry`): the FPN
body, RPN and poolers of the FPN models, then a cascade of stages (three in every MMDetection config),
each with its own 2-fc box head (``fc6``/``fc7``), predictor (class scores ``(K + 1, D)``, background
row 0, and **class-agnostic** box deltas ``(4, D)``, decoded with the stage's box-coder weights
``1 / target_stds``: (10, 10, 5, 5), (20, 20, 10, 10), (30.3, 30.3, 14.9, 14.9)) **and its own mask
head** (4 convs, 2x2 deconvolution, class logits), as MMDetection 2.x and 3.x build it.

At test time, as MMDetection's ``CascadeRoIHead`` (2.x ``simple_test``, 3.x ``predict``):

* stage 0 pools the RPN proposals, stage k > 0 the boxes stage k - 1 regressed (clipped to the image);
* class scores: the **logits** of all stages (each on its own stage's boxes, which correspond one to
  one) are averaged, then a softmax (detectron2's cascade, :mod:`.cascade`, averages probabilities);
* the final boxes are the last stage's regression; then per-class score threshold, NMS and top-k;
* masks: **every stage's mask head** runs on the final detections and the sigmoid probabilities of the
  predicted class are averaged over the stages (``merge_aug_masks``; detectron2: one mask head).

Training (fine-tuning an imported model): the stages are labelled as detectron2's cascade does (stage 0
on the sampled proposals, stage k on the regressed boxes at the stage's IoU), every stage has a box and
a mask loss (on its own foreground boxes), weighted by MMDetection's ``stage_loss_weights``
(1, 0.5, 0.25; ``0.5 ** k`` for stage k); ``loss_mask`` is the weighted sum of the stages' mask losses.

Parameter names: ``roi_heads.box_head.{s}.fc6/fc7``, ``roi_heads.box_predictor.{s}.cls_score/bbox_pred``,
``roi_heads.mask_head.{s}.{i}.0`` (conv i), ``roi_heads.mask_predictor.{s}.conv5_mask`` /
``.mask_fcn_logits`` ``(K + 1, 256, 1, 1)``, background channel 0 (MMDetection
``roi_head.bbox_head.{s}.*`` / ``roi_head.mask_head.{s}.*``; mapping in :mod:`.mmdet_import`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cascade import CascadeBoxPredictor, CascadeRoIHeads
from .mask_branch import DEFAULT_CHUNK, probabilities_in_chunks
from .mask_loss import mask_rcnn_loss
from .mmdet_cascade_config import stage_loss_weights
from .pooler import pooling_features

__all__ = ["MMDetCascadeRoIHeads", "build_mmdet_cascade_model", "stage_loss_weights"]


class MMDetCascadeRoIHeads(CascadeRoIHeads):
    """RoI heads of MMDetection's Cascade Mask R-CNN (FPN): a box head, predictor and mask head per stage.

    Args:
        box_roi_pool: the box :class:`~.pooler.RoIPooler` (7x7), shared by the stages (MMDetection's
            per-stage extractors have no weights).
        box_heads, box_predictors: one per stage (:class:`~.cascade.CascadeBoxPredictor`).
        mask_roi_pool: the mask pooler (14x14), shared by the stages.
        mask_heads, mask_predictors: one per stage (``MaskRCNNHeads``, ``MaskRCNNPredictor``).
        stage_iou_thresholds, stage_bbox_reg_weights: per stage (training IoU, box-coder weights).
        The rest as :class:`~.cascade.CascadeRoIHeads`.

    Eval output per image: ``boxes`` ``(N, 4)`` xyxy in the resized input's pixels, ``labels`` ``(N,)``
    1..K, ``scores`` ``(N,)``, ``masks`` ``(N, 1, 28, 28)``: the stages' mask probabilities of the
    predicted class, averaged.
    """

    mask_chunk: int = DEFAULT_CHUNK  # detections per test-time mask-branch pass (see .mask_branch)

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        mask_roi_pool: nn.Module,
        mask_heads: Sequence[nn.Module],
        mask_predictors: Sequence[nn.Module],
        **kwargs,
    ) -> None:
        if not (len(mask_heads) == len(mask_predictors) == len(box_heads)):
            raise ValueError("an MMDetection cascade needs one mask head and mask predictor per stage")
        super().__init__(
            box_roi_pool, box_heads, box_predictors, mask_roi_pool,
            nn.ModuleList(mask_heads), nn.ModuleList(mask_predictors), **kwargs,
        )  # fmt: skip
        self.stage_loss_weights = stage_loss_weights(self.num_stages)

    def _run_stage(self, k: int, features, boxes: list[Tensor], image_shapes) -> tuple[Tensor, Tensor]:
        # MMDetection weights the stages' losses (stage_loss_weights), it does not scale gradients
        return self.box_predictor[k](self.box_head[k](self.box_roi_pool(features, boxes, image_shapes)))

    def mask_probabilities(self, features, boxes: Sequence[Tensor], labels: Sequence[Tensor], image_shapes) -> list[Tensor]:
        """The stages' sigmoid mask probabilities of each detection's class, averaged.

        Args:
            boxes: per image, float ``(N_i, 4)`` detections in the resized input's coordinates.
            labels: per image, int64 ``(N_i,)`` classes 1..K.

        Returns:
            Per image, float ``(N_i, 1, 28, 28)``, computed ``mask_chunk`` boxes at a time (pooled once
            per chunk for all stages).
        """

        def probabilities(per_image: list[Tensor], cls: Tensor) -> Tensor:
            pooled = self.mask_roi_pool(features, per_image, image_shapes)
            rows = torch.arange(len(cls), device=cls.device)
            prob = None
            for head, predictor in zip(self.mask_head, self.mask_predictor):
                p = predictor(head(pooled))[rows, cls].float().sigmoid()
                prob = p if prob is None else prob + p
            return (prob / self.num_stages)[:, None]

        return probabilities_in_chunks(boxes, labels, self.mask_chunk, probabilities)

    def _training_forward(self, features, proposals, image_shapes, targets):
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        losses: dict[str, Tensor] = {}
        loss_mask: Optional[Tensor] = None
        boxes, deltas = proposals, None
        for k in range(self.num_stages):
            w = self.stage_loss_weights[k]
            if k > 0:
                boxes = self._regress(k - 1, deltas.detach(), boxes, image_shapes)
                boxes = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in boxes]
                labels, matched, regression_targets = self._label(k, boxes, targets)
            class_logits, deltas = self._run_stage(k, features, boxes, image_shapes)
            lc, lb = self._loss(class_logits, deltas, labels, regression_targets)
            losses[f"loss_classifier_stage{k}"] = w * lc
            losses[f"loss_box_reg_stage{k}"] = w * lb
            fg = [lab > 0 for lab in labels]
            fg_boxes = [b[m] for b, m in zip(boxes, fg)]
            logits = self.mask_predictor[k](self.mask_head[k](self.mask_roi_pool(features, fg_boxes, image_shapes)))
            lm = w * mask_rcnn_loss(
                logits,
                fg_boxes,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                [i[m] for i, m in zip(matched, fg)],
            )
            loss_mask = lm if loss_mask is None else loss_mask + lm
        losses["loss_mask"] = loss_mask
        return [], losses

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ):
        if self.training:
            return self._training_forward(features, proposals, image_shapes, targets)
        features = pooling_features(features)  # converted once for the stages' and chunks' pooling
        boxes, deltas, logit_sum = proposals, None, None
        for k in range(self.num_stages):
            if k > 0:
                boxes = self._regress(k - 1, deltas, boxes, image_shapes)
            class_logits, deltas = self._run_stage(k, features, boxes, image_shapes)
            logit_sum = class_logits if logit_sum is None else logit_sum + class_logits
        final = self._regress(self.num_stages - 1, deltas, boxes, image_shapes)
        result = self._detections(final, F.softmax(logit_sum / self.num_stages, dim=-1))
        masks = self.mask_probabilities(features, [r["boxes"] for r in result], [r["labels"] for r in result], image_shapes)
        for r, m in zip(result, masks):
            r["masks"] = m
        return result, {}


def build_mmdet_cascade_model(config):
    """MMDetection-style Cascade Mask R-CNN with FPN (R-50, R-101, X-101 32x8d) of a ``ModelConfig``:
    ``len(config.cascade_iou_thresholds)`` stages with ``config.cascade_bbox_reg_weights``."""
    from .architectures import (CellMaskRCNN, _fpn_box_head, _fpn_mask_branch, _pooler, _rpn, _transform,
                                cascade_settings)
    from .backbones import build_fpn_backbone

    backbone = build_fpn_backbone(config)
    box_heads, box_predictors, mask_heads, mask_predictors = [], [], [], []
    mask_pool = None
    for _ in config.cascade_iou_thresholds:
        head, dim = _fpn_box_head(config)
        box_heads.append(head)
        box_predictors.append(CascadeBoxPredictor(dim, config.num_classes + 1))
        mask_pool, mask_head, mask_predictor = _fpn_mask_branch(config)
        mask_heads.append(mask_head)
        mask_predictors.append(mask_predictor)
    roi_heads = MMDetCascadeRoIHeads(
        _pooler(config, 7),
        box_heads,
        box_predictors,
        mask_pool,
        mask_heads,
        mask_predictors,
        **cascade_settings(config),
    )
    return CellMaskRCNN(backbone, _rpn(config, 256), roi_heads, _transform(config), config)
