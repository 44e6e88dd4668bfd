"""Deformable 3x3 convolution (DCN v1, or v2 with ``modulated=True``) on ``torchvision.ops.deform_conv2d``.

Used in the bottlenecks of detectron2's ``DEFORM_ON_PER_STAGE`` stages (the X-152 cascade config puts it
in res3-res5). Parameter names: ``<block>.conv2.weight`` (out, in / groups, 3, 3), the same name and
shape as the plain conv it replaces (so ImageNet weights load), and ``<block>.conv2.offset.weight`` /
``.bias``: the 3x3 conv predicting the offsets (detectron2's ``<block>.conv2_offset``), initialised to
zero so that a fresh layer starts as a plain convolution. Offset channels follow detectron2 and
torchvision alike: per deformable group, ``(dy, dx)`` pairs for the 9 kernel taps in row-major order;
modulated: ``18 * G`` offsets then ``9 * G`` mask logits (sigmoid).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

__all__ = ["DeformConv3x3"]


class DeformConv3x3(nn.Module):
    """A bias-free deformable 3x3 convolution: ``(B, in, H, W) -> (B, out, H / stride, W / stride)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        deform_groups: int = 1,
        modulated: bool = False,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        self.stride = (int(stride), int(stride))
        self.dilation = (int(dilation), int(dilation))
        self.groups = int(groups)
        self.deform_groups = int(deform_groups)
        self.modulated = bool(modulated)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        per_group = 27 if modulated else 18
        self.offset = nn.Conv2d(
            in_channels, per_group * deform_groups, 3, stride=stride, padding=dilation, dilation=dilation
        )
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.offset(x)
        mask = None
        if self.modulated:
            n = 18 * self.deform_groups
            out, mask = out[:, :n], out[:, n:].sigmoid()
        return deform_conv2d(
            x, out, self.weight, None, stride=self.stride, padding=self.dilation, dilation=self.dilation, mask=mask
        )

    def extra_repr(self) -> str:
        o, i = self.weight.shape[:2]
        return (
            f"{i * self.groups}, {o}, stride={self.stride}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, modulated={self.modulated}"
        )
