"""ResNeXt-152 32x8d: the body of detectron2's ``cascade_mask_rcnn_X_152_32x8d_FPN`` (ImageNet-5k).

torchvision ships ResNeXt-50/101 but not 152. The network is torchvision's ``ResNet`` with bottleneck
blocks ``[3, 8, 36, 3]``, 32 groups of width 8 (res2 bottleneck width 256, as detectron2's
``NUM_GROUPS: 32, WIDTH_PER_GROUP: 8``), stride in the 3x3 conv (detectron2 ``STRIDE_IN_1X1: False``).
Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...).
"""

from __future__ import annotations

from typing import Any

from torchvision.models.resnet import Bottleneck, ResNet

__all__ = ["resnext152_32x8d", "RESNEXT152_LAYERS"]

RESNEXT152_LAYERS = (3, 8, 36, 3)


def resnext152_32x8d(**kwargs: Any) -> ResNet:
    """A randomly initialised ResNeXt-152 32x8d; ``kwargs`` go to ``torchvision.models.resnet.ResNet``
    (e.g. ``norm_layer``)."""
    return ResNet(Bottleneck, list(RESNEXT152_LAYERS), groups=32, width_per_group=8, **kwargs)
