"""ResNet / ResNeXt bodies with FrozenBatchNorm, and their FPN (P2-P6) and C4 (res4) assemblies
(ResNeSt bodies: :mod:`.resnest`, assembled with the same FPN).

Parameter names (stable; the detectron2 importer maps onto them):

* body (both kinds): ``backbone.body.conv1``, ``backbone.body.bn1`` (stem, detectron2 ``stem.conv1`` and
  its norm), ``backbone.body.layer{1..4}.{i}.conv{1,2,3}`` / ``.bn{1,2,3}`` / ``.downsample.{0,1}``
  (detectron2 ``res{2..5}.{i}.conv{1,2,3}`` with ``.norm``, ``.shortcut`` with ``.norm``). Deformable
  blocks: see :mod:`.deform_conv`. In C4 models ``layer4`` is not in the backbone but is the RoI head:
  ``roi_heads.res5.{i}...`` (detectron2 ``roi_heads.res5.{i}...``).
* FPN: ``backbone.fpn.inner_blocks.{0..3}.0`` (1x1 lateral convs on res2..res5, detectron2
  ``fpn_lateral{2..5}``), ``backbone.fpn.layer_blocks.{0..3}.0`` (3x3 output convs, detectron2
  ``fpn_output{2..5}``); with ``fpn_norm="GN"`` the convs lose their bias and ``.1`` is the GroupNorm.
  Feature maps are named ``"0".."3"`` (P2-P5, strides 4-32) and ``"pool"`` (P6, stride 64, max-pool of
  P5 with kernel 1 stride 2, as detectron2's ``LastLevelMaxPool``).

BatchNorm is always ``FrozenBatchNorm2d`` (eps 1e-5), as detectron2's ``FrozenBN``: Mask R-CNN trains
with a few images per batch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import ModelConfig
from .deform_conv import DeformConv3x3
from .resnext import resnext152_32x8d

__all__ = [
    "FPN_STRIDES",
    "C4_STRIDE",
    "build_resnet_body",
    "build_fpn_backbone",
    "build_c4_backbone",
    "group_norm",
    "freeze_body",
]

FPN_STRIDES = (4, 8, 16, 32, 64)
C4_STRIDE = 16

_BODIES = {
    "R_50": lambda **kw: tv_resnet.resnet50(weights=None, **kw),
    "R_101": lambda **kw: tv_resnet.resnet101(weights=None, **kw),
    "X_101_32x8d": lambda **kw: tv_resnet.resnext101_32x8d(weights=None, **kw),
    "X_152_32x8d": resnext152_32x8d,
}


def body_name(arch: str) -> str:
    """The body of an architecture (``"R_50"``, ``"X_152_32x8d"``, ``"ResNeSt_200"``, ...; :mod:`.registry`)."""
    from .registry import arch_info

    return arch_info(arch).body


def group_norm(channels: int) -> nn.GroupNorm:
    """detectron2's ``"GN"`` norm: 32 groups."""
    return nn.GroupNorm(32, channels)


def norm_layer(name: str):
    """The layer factory of a config norm name: ``""`` -> None, ``"GN"`` -> :func:`group_norm`, ``"BN"`` ->
    ``nn.BatchNorm2d`` (detectron2's BN/SyncBN; ``training.distributed`` makes it SyncBatchNorm)."""
    return {"": None, "GN": group_norm, "BN": nn.BatchNorm2d}[name]


def build_resnet_body(config: ModelConfig) -> tv_resnet.ResNet:
    """The torchvision ResNet/ResNeXt of ``config.arch`` with FrozenBN, the stride placement and the
    deformable stages of ``config``, frozen up to ``config.freeze_at`` (its ``fc`` is unused)."""
    body = _BODIES[body_name(config.arch)](norm_layer=FrozenBatchNorm2d)
    stages = [body.layer1, body.layer2, body.layer3, body.layer4]
    for stage, deform in zip(stages, config.deform_on_per_stage):
        for block in stage:
            stride = block.conv2.stride[0]
            if config.stride_in_1x1 and stride != 1:
                block.conv1.stride, block.conv2.stride = (stride, stride), (1, 1)
                stride = 1
            if deform:
                c2 = block.conv2
                block.conv2 = DeformConv3x3(
                    c2.in_channels,
                    c2.out_channels,
                    stride=stride,
                    dilation=c2.dilation[0],
                    groups=c2.groups,
                    deform_groups=config.deform_num_groups,
                    modulated=config.deform_modulated,
                )
    _fixup_residuals(body)
    freeze_body(body, config.freeze_at)
    return body


def _fixup_residuals(body: tv_resnet.ResNet) -> None:
    """Start every residual branch at zero (Fixup, Zhang et al. 2019: last conv zero, the others scaled
    by ``L ** -0.25`` for L blocks). FrozenBN does not normalise, so with plain He init the activations
    of a random ResNet-101 reach ~1e4 and the RPN yields no valid box. Pretrained weights, when loaded,
    replace all of this."""
    blocks = [b for stage in (body.layer1, body.layer2, body.layer3, body.layer4) for b in stage]
    scale = len(blocks) ** -0.25
    with torch.no_grad():
        for block in blocks:
            block.conv1.weight.mul_(scale)
            block.conv2.weight.mul_(scale)
            block.conv3.weight.zero_()


def freeze_body(body: tv_resnet.ResNet, freeze_at: int) -> None:
    """Stop gradients to the stem (``freeze_at >= 1``) and to res2..res``freeze_at``."""
    frozen = []
    if freeze_at >= 1:
        frozen += [body.conv1, body.bn1]
    frozen += [body.layer1, body.layer2, body.layer3, body.layer4][: max(0, freeze_at - 1)]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def build_fpn_backbone(config: ModelConfig) -> BackboneWithFPN:
    """ResNet/ResNeXt/ResNeSt body + FPN with 256 channels: ``(B, 3, H, W)`` with H, W multiples of 32
    -> ``{"0": (B, 256, H/4, W/4), "1": H/8, "2": H/16, "3": H/32, "pool": H/64}``."""
    if body_name(config.arch).startswith("ResNeSt_"):
        from .resnest import build_resnest_body

        body = build_resnest_body(
            int(body_name(config.arch).split("_")[1]),
            deform_on_per_stage=config.deform_on_per_stage,
            deform_modulated=config.deform_modulated,
            deform_num_groups=config.deform_num_groups,
            freeze_at=config.freeze_at,
        )
        return_layers = {"res2": "0", "res3": "1", "res4": "2", "res5": "3"}
    else:
        body = build_resnet_body(config)
        return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    return BackboneWithFPN(
        body,
        return_layers=return_layers,
        in_channels_list=[256, 512, 1024, 2048],
        out_channels=256,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm_layer(config.fpn_norm),
    )


class C4Backbone(nn.Module):
    """Stem + res2..res4: ``(B, 3, H, W) -> {"0": (B, 1024, H/16, W/16)}``; ``out_channels = 1024``."""

    def __init__(self, body: tv_resnet.ResNet) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(body, return_layers={"layer3": "0"})
        self.out_channels = 1024

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return OrderedDict(self.body(x))


def build_c4_backbone(config: ModelConfig) -> tuple[C4Backbone, nn.Sequential]:
    """The C4 trunk and the res5 stage (``layer4``, 1024 -> 2048 channels, stride 2) for the RoI head."""
    body = build_resnet_body(config)
    res5 = body.layer4
    return C4Backbone(body), res5
