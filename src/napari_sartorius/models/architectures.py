"""The registered Mask R-CNN architectures (:mod:`.registry`) on torchvision's detection stack.

``build_model(config)`` returns a :class:`CellMaskRCNN` (a torchvision ``GeneralizedRCNN``):

* train mode: ``model(images, targets) -> dict of scalar losses``. ``images``: list of float tensors
  ``(3, H, W)``, RGB, 0..255 units. ``targets``: per image ``boxes`` float ``(N, 4)`` xyxy pixels,
  ``labels`` int64 ``(N,)`` in 1..K (0 is background), ``masks`` uint8 ``(N, H, W)``.
* eval mode: ``model(images) -> list of dicts`` with ``boxes`` float ``(N, 4)`` xyxy in the input
  image's pixels, ``labels`` int64 ``(N,)`` in 1..K, ``scores`` ``(N,)``, and ``masks`` float
  ``(N, 1, M, M)``: the mask head's probabilities for the predicted class over each box (M = 28 FPN,
  14 C4), **not pasted into the image** (:mod:`.predictor` pastes them into crops).

Parameter names (``model.state_dict()`` keys; stable, the detectron2 importer maps onto them):

* backbone: see :mod:`.backbones` (``backbone.body.*``, ``backbone.fpn.*``), :mod:`.deform_conv` and,
  for the ResNeSt bodies (detectron2's own names under ``backbone.body.``), :mod:`.resnest`.
* RPN: ``rpn.head.conv.0.0`` (3x3 conv, C -> C; detectron2 ``proposal_generator.rpn_head.conv``),
  ``rpn.head.cls_logits`` (A outputs; ``...rpn_head.objectness_logits``), ``rpn.head.bbox_pred``
  (4 A outputs, anchor-major; ``...rpn_head.anchor_deltas``). Anchor order: :mod:`.anchors`. Training
  targets are matched over chunks of anchors (:mod:`.anchor_matching`, same result, bounded memory).
* FPN box head: ``roi_heads.box_head.fc6``/``fc7`` (2-fc head, detectron2 ``roi_heads.box_head.fc1``/
  ``fc2``) or, with convs/norm, a torchvision ``FastRCNNConvFCHead``: ``roi_heads.box_head.{i}.0``
  (conv i, ``box_head.conv{i+1}``), ``.{i}.1`` (its GroupNorm, ``conv{i+1}.norm``), then after the
  ``Flatten`` at index ``n_conv`` the linear layers at ``n_conv + 1 + 2 j`` (``box_head.fc{j+1}``).
* box predictor: ``roi_heads.box_predictor.cls_score`` ``(K + 1, D)``, **background row 0**
  (detectron2: last row), ``roi_heads.box_predictor.bbox_pred`` ``(4 (K + 1), D)`` with a background
  block first (detectron2: ``(4 K, D)``). Cascade: :mod:`.cascade`. C4: :mod:`.c4`.
* FPN mask head: ``roi_heads.mask_head.{i}.0`` (3x3 conv i, detectron2 ``roi_heads.mask_head.mask_fcn{i+1}``;
  ``.{i}.1`` its GroupNorm), ``roi_heads.mask_predictor.conv5_mask`` (2x2 deconv, ``mask_head.deconv``),
  ``roi_heads.mask_predictor.mask_fcn_logits`` ``(K + 1, 256, 1, 1)``, background channel 0
  (``mask_head.predictor``, ``(K, ...)``).

``mask_rcnn_R_50_FPN`` with ``round_anchors=True, pooler_aligned=False, pooler_sampling_ratio=2`` and
torchvision's anchors has exactly the state-dict keys and behaviour of torchvision's
``maskrcnn_resnet50_fpn``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from .anchors import CellAnchorGenerator
from .backbones import FPN_STRIDES, build_c4_backbone, build_fpn_backbone, norm_layer
from .c4 import Res5RoIHeads
from .cascade import CascadeBoxPredictor, CascadeRoIHeads
from .config import ModelConfig
from .detection_nms import FirstKeptDetections
from .registry import REGISTRY, arch_builder, check_arch
from .mask_branch import DEFAULT_CHUNK, chunked_mask_probabilities
from .mask_loss import mask_rcnn_loss
from .pooler import RoIPooler, pooling_features
from .rpn import LogitRankedRPN
from .transform import CellTransform

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "CellMaskRCNN",
    "build_model",
    "parameter_count",
    "count_parameters",
    "load_backbone_weights",
]


class Float32RPNHead(RPNHead):
    """torchvision's ``RPNHead`` whose outputs are float32 under fp16 autocast: proposals are decoded
    from them, and fp16 coordinates step by 1 px above 1024 px (detectron2 decodes in fp32 too)."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32BoxPredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` (``cls_score``, ``bbox_pred``) with float32 outputs, initialised
    as detectron2's ``FastRCNNOutputLayers``: normal weights, std 0.01 (scores) and 0.001 (deltas), zero
    bias (torchvision keeps PyTorch's default uniform init)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


#: backbone output name of each RPN feature name (:attr:`ModelConfig.rpn_in_features`).
FEATURE_KEYS = {"res4": "0", "p2": "0", "p3": "1", "p4": "2", "p5": "3", "p6": "pool"}


class SelectedFeaturesRPN(LogitRankedRPN):
    """The logit-ranked RPN (:class:`.rpn.LogitRankedRPN`) on the feature maps named by ``in_features``,
    in that order, one anchor level each; a map may be listed twice (LIVECell's ``p2, p2, p3, p4, p5,
    p6``): it then counts as two levels with their own anchors, top-k and NMS groups, and the shared
    head gives both the same logits, exactly as detectron2 does with a repeated ``RPN.IN_FEATURES``
    entry."""

    def __init__(self, *args, in_features, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_features = tuple(in_features)

    def forward(self, images, features, targets=None):
        picked = {str(i): features[FEATURE_KEYS[name]] for i, name in enumerate(self.in_features)}
        return super().forward(images, picked, targets)


class CellMaskRCNN(GeneralizedRCNN):
    """A Mask R-CNN built from a :class:`ModelConfig`; ``self.config`` is that config."""

    def __init__(self, backbone, rpn, roi_heads, transform, config: ModelConfig) -> None:
        super().__init__(backbone, rpn, roi_heads, transform)
        self.config = config

    def eager_outputs(self, losses, detections):
        return losses if self.training else detections


class ChunkedMaskRoIHeads(FirstKeptDetections, RoIHeads):
    """torchvision's RoIHeads whose test-time mask branch runs in chunks of detections
    (:mod:`.mask_branch`): same outputs, memory bounded for 1000 detections x a TTA batch; and whose
    mask loss crops each positive RoI's uint8 ground truth (:mod:`.mask_loss`) instead of converting
    every full-image mask to float: same losses; and whose detections come from NMS on a prefix of the
    candidates when that suffices (:class:`~.detection_nms.FirstKeptDetections`): the same detections."""

    mask_chunk: int = DEFAULT_CHUNK

    def _training_forward(self, features, proposals, image_shapes, targets):
        self.check_targets(targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        fg = [lab > 0 for lab in labels]
        fg_boxes = [p[m] for p, m in zip(proposals, fg)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, fg_boxes, image_shapes)))
        loss_mask = mask_rcnn_loss(
            mask_logits,
            fg_boxes,
            [t["masks"] for t in targets],
            [t["labels"] for t in targets],
            [i[m] for i, m in zip(matched_idxs, fg)],
        )
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training and self.has_mask() and not self.has_keypoint():
            return self._training_forward(features, proposals, image_shapes, targets)
        if self.training or not self.has_mask():
            return super().forward(features, proposals, image_shapes, targets)
        features = pooling_features(features)  # converted once for the box head's and chunks' pooling
        pool, self.mask_roi_pool = self.mask_roi_pool, None  # boxes only from the parent
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            self.mask_roi_pool = pool
        probs = chunked_mask_probabilities(
            pool, self.mask_head, self.mask_predictor, features,
            [r["boxes"] for r in result], [r["labels"] for r in result], image_shapes, chunk=self.mask_chunk,
        )
        for r, m in zip(result, probs):
            r["masks"] = m
        return result, losses


# -- components -------------------------------------------------------------------------------------
def _transform(config: ModelConfig) -> CellTransform:
    return CellTransform(
        min_size_train=config.min_size_train,
        max_size_train=config.max_size_train,
        min_size_test=config.min_size_test,
        max_size_test=config.max_size_test,
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
        input_format=config.input_format,
        size_divisible=1 if config.is_c4 else 32,  # detectron2 pads only FPN inputs (to the top stride)
    )


def _rpn(config: ModelConfig, in_channels: int) -> RegionProposalNetwork:
    strides = config.rpn_strides
    anchors = CellAnchorGenerator(config.anchor_sizes, config.aspect_ratios, strides, round_anchors=config.round_anchors)
    head = Float32RPNHead(in_channels, anchors.num_anchors_per_location()[0])
    return SelectedFeaturesRPN(
        anchors,
        head,
        fg_iou_thresh=config.rpn_fg_iou_thresh,
        bg_iou_thresh=config.rpn_bg_iou_thresh,
        batch_size_per_image=config.rpn_batch_size_per_image,
        positive_fraction=config.rpn_positive_fraction,
        pre_nms_top_n=dict(training=config.rpn_pre_nms_top_n_train, testing=config.rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=config.rpn_post_nms_top_n_train, testing=config.rpn_post_nms_top_n_test),
        nms_thresh=config.rpn_nms_thresh,
        in_features=config.rpn_in_features,
    )


def _pooler(config: ModelConfig, size: int) -> RoIPooler:
    return RoIPooler(
        ["0", "1", "2", "3"],
        size,
        FPN_STRIDES[:4],
        sampling_ratio=config.pooler_sampling_ratio,
        aligned=config.pooler_aligned,
    )


def _fpn_box_head(config: ModelConfig) -> tuple[nn.Module, int]:
    """A box head on pooled ``(R, 256, 7, 7)`` and its output width."""
    convs, fcs, dim = config.box_head_convs, config.box_head_fcs, config.box_head_dim
    if convs == 0 and fcs == 2 and not config.box_head_norm:
        return TwoMLPHead(256 * 7 * 7, dim), dim
    norm = norm_layer(config.box_head_norm)
    head = FastRCNNConvFCHead((256, 7, 7), [256] * convs, [dim] * fcs, norm_layer=norm)
    return head, (dim if fcs else 256 * 7 * 7)


def c2_msra_fill(module: nn.Module) -> None:
    """detectron2's (Caffe2's) "MSRAFill": Kaiming normal weights (fan_out, ReLU gain), zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _mask_predictor(in_channels: int, num_classes: int) -> MaskRCNNPredictor:
    """2x2 deconvolution to 256 channels + ReLU + 1x1 class logits, initialised as detectron2's
    ``MaskRCNNConvUpsampleHead``: deconvolution ``c2_msra_fill``, logits normal std 0.001 and zero bias.
    (torchvision draws the logits with Kaiming fan_out over K + 1 outputs, std ~0.7, and keeps default
    biases: a fresh model's mask loss starts at 3-10 instead of ln 2 = 0.69.)"""
    predictor = MaskRCNNPredictor(in_channels, 256, num_classes)
    c2_msra_fill(predictor.conv5_mask)
    nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(predictor.mask_fcn_logits.bias)
    return predictor


def _fpn_mask_branch(config: ModelConfig) -> tuple[RoIPooler, nn.Module, nn.Module]:
    norm = norm_layer(config.mask_head_norm)
    head = MaskRCNNHeads(256, [256] * config.mask_head_convs, 1, norm_layer=norm)
    for conv in head.modules():  # torchvision already draws these so; stated here as detectron2 does
        if isinstance(conv, nn.Conv2d):
            c2_msra_fill(conv)
    return _pooler(config, 14), head, _mask_predictor(256, config.num_classes + 1)


def cascade_settings(config: ModelConfig) -> dict:
    """The keyword arguments of a cascade's RoI heads that come straight from ``config`` (stages,
    sampling, test thresholds): the same for detectron2's and MMDetection's cascade."""
    return dict(
        stage_iou_thresholds=config.cascade_iou_thresholds,
        stage_bbox_reg_weights=config.cascade_bbox_reg_weights,
        batch_size_per_image=config.roi_batch_size_per_image,
        positive_fraction=config.roi_positive_fraction,
        score_thresh=config.score_thresh_test,
        nms_thresh=config.nms_thresh_test,
        detections_per_img=config.detections_per_img,
    )


# -- builders ---------------------------------------------------------------------------------------
def build_fpn_model(config: ModelConfig) -> CellMaskRCNN:
    """Mask R-CNN with FPN (R-50, R-101, X-101 32x8d)."""
    backbone = build_fpn_backbone(config)
    box_head, dim = _fpn_box_head(config)
    mask_pool, mask_head, mask_predictor = _fpn_mask_branch(config)
    roi_heads = ChunkedMaskRoIHeads(
        _pooler(config, 7),
        box_head,
        Float32BoxPredictor(dim, config.num_classes + 1),
        config.roi_iou_thresh,
        config.roi_iou_thresh,
        config.roi_batch_size_per_image,
        config.roi_positive_fraction,
        config.bbox_reg_weights,
        config.score_thresh_test,
        config.nms_thresh_test,
        config.detections_per_img,
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=mask_predictor,
    )
    return CellMaskRCNN(backbone, _rpn(config, 256), roi_heads, _transform(config), config)


def build_c4_model(config: ModelConfig) -> CellMaskRCNN:
    """Mask R-CNN C4 (R-50, R-101): RPN and RoIAlign on res4, res5 as the RoI head (:mod:`.c4`)."""
    backbone, res5 = build_c4_backbone(config)
    pooler = RoIPooler(["0"], 14, config.rpn_strides, sampling_ratio=config.pooler_sampling_ratio, aligned=config.pooler_aligned)
    roi_heads = Res5RoIHeads(
        pooler,
        res5,
        Float32BoxPredictor(2048, config.num_classes + 1),
        _mask_predictor(2048, config.num_classes + 1),
        fg_iou_thresh=config.roi_iou_thresh,
        bg_iou_thresh=config.roi_iou_thresh,
        batch_size_per_image=config.roi_batch_size_per_image,
        positive_fraction=config.roi_positive_fraction,
        bbox_reg_weights=config.bbox_reg_weights,
        score_thresh=config.score_thresh_test,
        nms_thresh=config.nms_thresh_test,
        detections_per_img=config.detections_per_img,
    )
    return CellMaskRCNN(backbone, _rpn(config, 1024), roi_heads, _transform(config), config)


def build_cascade_model(config: ModelConfig) -> CellMaskRCNN:
    """Cascade Mask R-CNN with FPN (X-152 32x8d; :mod:`.cascade`)."""
    backbone = build_fpn_backbone(config)
    heads, predictors = [], []
    for _ in config.cascade_iou_thresholds:
        head, dim = _fpn_box_head(config)
        heads.append(head)
        predictors.append(CascadeBoxPredictor(dim, config.num_classes + 1))
    mask_pool, mask_head, mask_predictor = _fpn_mask_branch(config)
    roi_heads = CascadeRoIHeads(
        _pooler(config, 7),
        heads,
        predictors,
        mask_pool,
        mask_head,
        mask_predictor,
        **cascade_settings(config),
    )
    return CellMaskRCNN(backbone, _rpn(config, 256), roi_heads, _transform(config), config)


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture: its name, backbone body, head kind and builder."""

    name: str
    body: str
    kind: str  # "FPN", "C4" or "cascade"
    builder: Callable[[ModelConfig], CellMaskRCNN]
    description: str


#: Every registered architecture (:mod:`.registry`) with its builder.
ARCHITECTURES: dict[str, ArchSpec] = {
    name: ArchSpec(name, info.body, info.kind, arch_builder(name), info.description) for name, info in REGISTRY.items()
}


def build_model(config: ModelConfig, *, weights_backbone=None) -> CellMaskRCNN:
    """A randomly initialised model of ``config`` (``config.arch`` picks the builder).

    Output layers start as detectron2's: class scores normal std 0.01, box deltas and mask logits std
    0.001, zero biases, mask convolutions ``c2_msra_fill``; a fresh model's losses start near
    ln(K + 1) (classes) and ln 2 (masks).

    Args:
        config: the model's settings.
        weights_backbone: optional ImageNet weights of the body: a torchvision ResNet/ResNeXt state dict
            or the path of a file holding one (``torch.save``'d; loaded with ``weights_only=True``).
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model needs a ModelConfig, got {type(config).__name__}")
    model = arch_builder(check_arch(config.arch))(config)
    if weights_backbone is not None:
        load_backbone_weights(model, weights_backbone)
    return model


def parameter_count(arch: str) -> int:
    """Number of parameters (trainable or frozen; BN statistics excluded) of ``arch`` with the default
    three classes, as recorded in :mod:`.registry` (no model is built)."""
    return REGISTRY[check_arch(arch)].parameters


@functools.lru_cache(maxsize=None)
def count_parameters(arch: str) -> int:
    """:func:`parameter_count` measured: the model is built on the meta device (no memory, no
    initialisation cost)."""
    check_arch(arch)
    with torch.device("meta"):
        model = build_model(ModelConfig(arch))
    return int(sum(p.numel() for p in model.parameters()))


def load_backbone_weights(model: CellMaskRCNN, weights) -> list[str]:
    """Copy ImageNet weights of a torchvision ResNet/ResNeXt into the model's body (and C4's res5).

    Args:
        weights: a state dict (``conv1.weight``, ``layer1.0.conv1.weight``, ..., ``fc.*`` ignored) or the
            path of a file holding one.

    Returns:
        the model keys left at their initial values inside the body (deformable-offset convs).

    Raises:
        ValueError: the file is not such a state dict, or it belongs to another depth/width (the
            message names the first keys that do not fit).
    """
    source = "ImageNet weights"
    info = REGISTRY[model.config.arch]
    if info.is_resnest:
        raise ValueError(
            f"ImageNet weights are not read for the {info.body} body of {model.config.arch}: start from "
            "a detectron2-ResNeSt or LIVECell checkpoint (import-detectron2) or from random weights"
        )
    if not isinstance(weights, Mapping):
        source = str(weights)
        try:
            weights = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to read is the same message for the user
            raise ValueError(f"{source}: cannot read ImageNet weights ({exc})") from exc
        if isinstance(weights, Mapping) and isinstance(weights.get("state_dict"), Mapping):
            weights = weights["state_dict"]
        if not isinstance(weights, Mapping):
            raise ValueError(f"{source} holds a {type(weights).__name__}, not a ResNet state dict")
    is_c4 = model.config.is_c4
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor) or key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if is_c4 and key.startswith("layer4."):
            name = "roi_heads.res5." + key[len("layer4.") :]
        else:
            name = "backbone.body." + key
        mapped[name] = value
    body_keys = [k for k in target if k.startswith("backbone.body.") or k.startswith("roi_heads.res5.")]
    wrong = [k for k, v in mapped.items() if k not in target or target[k].shape != v.shape]
    missing = [k for k in body_keys if k not in mapped and ".conv2.offset." not in k]
    if not mapped or wrong or missing:
        detail = (wrong or missing)[:3]
        raise ValueError(
            f"{source} does not fit the {model.config.arch} backbone "
            f"({len(wrong)} unexpected or mis-shaped, {len(missing)} missing; e.g. {', '.join(detail)}): "
            "give the torchvision ImageNet weights of the same ResNet/ResNeXt depth"
        )
    with torch.no_grad():
        for k, v in mapped.items():
            target[k].copy_(v.to(target[k].dtype))
    return [k for k in body_keys if k not in mapped]
