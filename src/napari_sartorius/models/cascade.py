"""Cascade R-CNN box head (three stages, IoU 0.5 / 0.6 / 0.7) with a Mask R-CNN mask branch.

As detectron2's ``CascadeROIHeads``: stage 0 pools the RPN proposals (training: plus the ground truth,
subsampled as usual), each later stage pools the boxes the previous stage regressed (detached, clipped
to the image; training: empty boxes dropped, relabelled at the stage's IoU threshold without
subsampling). Every stage has its own box head and predictor with **class-agnostic** box deltas and its
own box-coder weights ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)); the gradient into each
stage's head is scaled by 1 / number of stages. At test time the class probabilities of the stages are
averaged (all evaluated on their own stage's boxes, which correspond one to one), the final boxes are
the last stage's regression, then per-class NMS and top-k as usual, and the mask head runs on the final
boxes. The mask loss uses the stage-0 foreground proposals.

Parameter names: ``roi_heads.box_head.{stage}.*`` (a ``TwoMLPHead``: ``fc6``/``fc7``, or a
``FastRCNNConvFCHead``: ``{i}.0`` convs, ``{i}.1`` GroupNorm, then the linear layer after the flatten;
detectron2 ``roi_heads.box_head.{stage}.conv{i}``/``.fc{i}``), ``roi_heads.box_predictor.{stage}.cls_score``
``(K + 1, D)``, background row 0 (detectron2: last), ``roi_heads.box_predictor.{stage}.bbox_pred``
``(4, D)``; mask branch as the FPN models (``roi_heads.mask_head``, ``roi_heads.mask_predictor``).
Training losses: ``loss_classifier_stage{k}``, ``loss_box_reg_stage{k}``, ``loss_mask``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from .detection_nms import select_detections
from .mask_branch import DEFAULT_CHUNK, chunked_mask_probabilities
from .mask_loss import mask_rcnn_loss
from .pooler import pooling_features

__all__ = ["CascadeRoIHeads", "CascadeBoxPredictor"]


class CascadeBoxPredictor(nn.Module):
    """Class scores ``(R, K + 1)`` (background first) and class-agnostic box deltas ``(R, 4)``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        # float32 under fp16 autocast: boxes are decoded from these deltas
        return self.cls_score(x).float(), self.bbox_pred(x).float()


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class CascadeRoIHeads(RoIHeads):
    """RoI heads of a Cascade Mask R-CNN (FPN).

    Args:
        box_roi_pool: the box :class:`~.pooler.RoIPooler` (7x7), shared by the stages.
        box_heads, box_predictors: one per stage (:class:`CascadeBoxPredictor`).
        mask_roi_pool, mask_head, mask_predictor: the mask branch (14x14 pooling, 28x28 masks).
        stage_iou_thresholds: foreground IoU of each stage's training targets.
        stage_bbox_reg_weights: box-coder weights of each stage.
        The rest as torchvision ``RoIHeads`` (stage-0 sampling and inference thresholds).

    Eval output per image: ``boxes`` ``(N, 4)``, ``labels`` ``(N,)`` 1..K, ``scores`` ``(N,)``,
    ``masks`` ``(N, 1, 28, 28)`` probabilities of the predicted class.
    """

    mask_chunk: int = DEFAULT_CHUNK  # detections per test-time mask-branch pass (see .mask_branch)

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        mask_roi_pool: nn.Module,
        mask_head: nn.Module,
        mask_predictor: nn.Module,
        *,
        stage_iou_thresholds: Sequence[float],
        stage_bbox_reg_weights: Sequence[Sequence[float]],
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
    ) -> None:
        n = len(stage_iou_thresholds)
        if not (len(box_heads) == len(box_predictors) == len(stage_bbox_reg_weights) == n):
            raise ValueError("a cascade needs one box head, predictor, IoU and weight set per stage")
        super().__init__(
            box_roi_pool,
            nn.ModuleList(box_heads),
            nn.ModuleList(box_predictors),
            stage_iou_thresholds[0],
            stage_iou_thresholds[0],
            batch_size_per_image,
            positive_fraction,
            tuple(stage_bbox_reg_weights[0]),
            score_thresh,
            nms_thresh,
            detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        self.num_stages = n
        self.stage_iou_thresholds = tuple(float(t) for t in stage_iou_thresholds)
        self.stage_matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in self.stage_iou_thresholds]
        self.stage_box_coders = [det_utils.BoxCoder(tuple(float(v) for v in w)) for w in stage_bbox_reg_weights]

    # -- pieces ---------------------------------------------------------------------------------
    def _run_stage(self, k: int, features, boxes: list[Tensor], image_shapes) -> tuple[Tensor, Tensor]:
        x = self.box_roi_pool(features, boxes, image_shapes)
        if self.training:
            x = _ScaleGradient.apply(x, 1.0 / self.num_stages)
        return self.box_predictor[k](self.box_head[k](x))

    def _regress(self, k: int, deltas: Tensor, boxes: list[Tensor], image_shapes) -> list[Tensor]:
        """Stage ``k``'s class-agnostic regression of ``boxes``, clipped, as a list per image."""
        pred = self.stage_box_coders[k].decode(deltas, boxes).reshape(-1, 4)
        out = []
        for b, shape in zip(pred.split([len(b) for b in boxes]), image_shapes):
            out.append(box_ops.clip_boxes_to_image(b, shape))
        return out

    def _label(self, k: int, boxes: list[Tensor], targets: list[dict[str, Tensor]]):
        """Stage ``k`` targets of ``boxes``: labels (0 = background), matched gt index, box deltas."""
        labels, matched, matched_boxes = [], [], []
        for b, t in zip(boxes, targets):
            gt_boxes, gt_labels = t["boxes"].to(b.dtype), t["labels"]
            if gt_boxes.numel() == 0:
                idx = torch.zeros(len(b), dtype=torch.int64, device=b.device)
                labels.append(torch.zeros_like(idx))
                matched.append(idx)
                matched_boxes.append(torch.zeros_like(b))
                continue
            m = self.stage_matchers[k](box_ops.box_iou(gt_boxes, b))
            idx = m.clamp(min=0)
            lab = gt_labels[idx].to(torch.int64)
            lab[m < 0] = 0
            labels.append(lab)
            matched.append(idx)
            matched_boxes.append(gt_boxes[idx])
        return labels, matched, self.stage_box_coders[k].encode(matched_boxes, boxes)

    @staticmethod
    def _loss(class_logits: Tensor, deltas: Tensor, labels: list[Tensor], targets) -> tuple[Tensor, Tensor]:
        labels_t = torch.cat(labels)
        targets_t = torch.cat(targets)
        loss_cls = F.cross_entropy(class_logits, labels_t)
        pos = labels_t > 0
        loss_box = F.smooth_l1_loss(deltas[pos], targets_t[pos], beta=1 / 9, reduction="sum") / max(1, labels_t.numel())
        return loss_cls, loss_box

    def _detections(self, final: list[Tensor], probs: Tensor) -> list[dict[str, Tensor]]:
        """Per image: class-agnostic ``final`` boxes (N_i, 4) scored by ``probs`` (sum N_i, classes + 1,
        background first), thresholded, NMS'ed per class and capped: ``{"boxes", "labels", "scores"}``."""
        result = []
        for b, p in zip(final, probs.split([len(b) for b in final])):
            num_fg = p.shape[1] - 1
            bx, sc, lab = select_detections(
                b[:, None, :].expand(-1, num_fg, 4),
                p[:, 1:],
                score_thresh=self.score_thresh,
                nms_thresh=self.nms_thresh,
                detections_per_img=self.detections_per_img,
            )
            result.append({"boxes": bx, "labels": lab, "scores": sc})
        return result

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ):
        losses: dict[str, Tensor] = {}
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
            stage0 = (proposals, matched_idxs, labels)
        else:
            features = pooling_features(features)  # converted once for the stages' and chunks' pooling
        boxes = proposals
        probs: list[Tensor] = []
        deltas = None
        for k in range(self.num_stages):
            if k > 0:
                boxes = self._regress(k - 1, deltas.detach(), boxes, image_shapes)
                if self.training:
                    boxes = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in boxes]
                    labels, _, regression_targets = self._label(k, boxes, targets)
            class_logits, deltas = self._run_stage(k, features, boxes, image_shapes)
            if self.training:
                lc, lb = self._loss(class_logits, deltas, labels, regression_targets)
                losses[f"loss_classifier_stage{k}"] = lc
                losses[f"loss_box_reg_stage{k}"] = lb
            else:
                probs.append(F.softmax(class_logits, dim=-1))

        if self.training:
            proposals, matched_idxs, labels = stage0
            fg = [lab > 0 for lab in labels]
            fg_boxes = [p[m] for p, m in zip(proposals, fg)]
            x = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, fg_boxes, image_shapes)))
            losses["loss_mask"] = mask_rcnn_loss(
                x,
                fg_boxes,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                [i[m] for i, m in zip(matched_idxs, fg)],
            )
            return [], losses

        final = self._regress(self.num_stages - 1, deltas, boxes, image_shapes)
        result = self._detections(final, sum(probs) / len(probs))
        probs = chunked_mask_probabilities(
            self.mask_roi_pool, self.mask_head, self.mask_predictor, features,
            [r["boxes"] for r in result], [r["labels"] for r in result], image_shapes, chunk=self.mask_chunk,
        )
        for r, m in zip(result, probs):
            r["masks"] = m
        return result, losses
