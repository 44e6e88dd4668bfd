"""ResNeSt bodies (split attention) as in chongruo/detectron2-ResNeSt, the body of LIVECell's
anchor-based models.

The network reproduces ``detectron2/modeling/backbone/resnet.py`` and ``splat.py`` of that fork with
``RADIX: 2`` (which switches on the deep stem, avg-down and avd), ``STRIDE_IN_1X1: False``,
``BOTTLENECK_WIDTH: 64``, ``NUM_GROUPS: 1``:

* deep stem: three 3x3 convs (3 -> w, stride 2; w -> w; w -> 2 w; w = 32 for depth 50, 64 otherwise),
  each with norm and ReLU, then a 3x3 max-pool with stride 2: ``(B, 3, H, W) -> (B, 2w, H/4, W/4)``.
* bottleneck: 1x1 conv + norm + ReLU; split-attention 3x3 conv (radix 2: a grouped 3x3 conv to
  ``2 C`` channels + norm + ReLU, the two halves summed, global average pool, 1x1 conv ``fc1`` (with
  bias) + norm + ReLU, 1x1 ``fc2`` (with bias) to ``2 C``, a softmax over the radix, the halves
  weighted and summed; no ReLU after it); in the first block of a stage with stride 2 (avd) the 3x3
  conv keeps stride 1 and a 3x3 average pool (stride 2, padding 1, counting the padding) follows it;
  1x1 conv + norm; shortcut (where the width changes) average pool ``kernel = stride`` (ceil mode,
  padding not counted) then a 1x1 conv + norm; sum and ReLU.
* deformable stages (``deform_on_per_stage``): the split-attention conv is a (modulated) deformable
  conv whose offsets come from ``conv2_offset``, a 3x3 conv with bias and **``groups =
  deform_num_groups``** on the bottleneck input, stride 1 in avd blocks; its ``27 G`` (modulated) or
  ``18 G`` outputs are ``18 G`` offsets then ``9 G`` mask logits (sigmoid).
* blocks per stage: 50 ``[3, 4, 6, 3]``, 101 ``[3, 4, 23, 3]``, 200 ``[3, 24, 36, 3]``; widths
  256-2048 out, bottleneck 64-512.

Parameter names are detectron2's, under ``backbone.body.`` (detectron2 ``backbone.bottom_up.``):
``stem.conv1_{1,2,3}.weight`` / ``.norm.*``; ``res{2..5}.{i}.conv1.weight`` / ``.conv1.norm.*``,
``.conv2.conv.weight`` (the 3x3, ``(2 C, in / 2, 3, 3)``), ``.conv2.bn0.*``, ``.conv2.fc1.*``,
``.conv2.bn1.*``, ``.conv2.fc2.*``, ``.conv2_offset.*``, ``.conv3.weight`` / ``.conv3.norm.*``,
``.shortcut.weight`` / ``.shortcut.norm.*``. Normalisation is BatchNorm (eps 1e-5; detectron2's
SyncBN, converted to ``SyncBatchNorm`` under torchrun by ``training.distributed``); stages frozen by
``freeze_at`` use FrozenBatchNorm2d, as detectron2 does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["RESNEST_BLOCKS", "ResNeStBody", "SplitAttentionConv", "build_resnest_body", "freeze_resnest"]

RESNEST_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 200: (3, 24, 36, 3)}
_STEM_WIDTH = {50: 32, 101: 64, 200: 64}


def _c2_msra_fill(conv: nn.Module) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if getattr(conv, "bias", None) is not None:
        nn.init.zeros_(conv.bias)


class ConvNorm(nn.Conv2d):
    """detectron2's ``Conv2d`` with a ``norm`` submodule: ``norm(conv(x))`` (no activation)."""

    def __init__(self, *args, norm: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


class _DeformWeight(nn.Module):
    """The weight of a (modulated) deformable conv: ``forward(x, offset, mask)`` with
    ``torchvision.ops.deform_conv2d`` (groups and offset groups taken from the shapes)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        _c2_msra_fill(self)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
        return deform_conv2d(x, offset, self.weight, None, stride=self.stride, padding=1, mask=mask)


class SplitAttentionConv(nn.Module):
    """Split-attention 3x3 conv (detectron2-ResNeSt ``SplAtConv2d`` / ``SplAtConv2d_dcn``), cardinality 1.

    ``(B, C_in, H, W) -> (B, C, H / stride, W / stride)``; with ``deform_groups > 0`` the forward takes
    the offset conv's output ``(B, 27 G or 18 G, H', W')`` as a second argument.
    """

    def __init__(self, in_channels: int, channels: int, *, stride: int, radix: int, norm, deform_groups: int = 0,
                 modulated: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.radix = radix
        self.modulated = modulated
        self.deformable = deform_groups > 0
        inter = max(in_channels * radix // 4, 32)
        if self.deformable:
            self.conv = _DeformWeight(in_channels, channels * radix, stride=stride, groups=radix)
        else:
            self.conv = nn.Conv2d(in_channels, channels * radix, 3, stride, 1, groups=radix, bias=False)
        self.bn0 = norm(channels * radix)
        self.fc1 = nn.Conv2d(channels, inter, 1)
        self.bn1 = norm(inter)
        self.fc2 = nn.Conv2d(inter, channels * radix, 1)

    def forward(self, x: Tensor, offset: Tensor | None = None) -> Tensor:
        if self.deformable:
            mask = None
            if self.modulated:
                n = offset.shape[1] // 3 * 2
                offset, mask = offset[:, :n], offset[:, n:].sigmoid()
            x = self.conv(x, offset, mask)
        else:
            x = self.conv(x)
        x = F.relu(self.bn0(x))
        splits = torch.split(x, x.shape[1] // self.radix, dim=1)
        gap = self.fc1(F.adaptive_avg_pool2d(sum(splits), 1))
        gap = F.relu(self._bn1(gap))
        atten = self.fc2(gap)
        b = atten.shape[0]
        atten = F.softmax(atten.view(b, 1, self.radix, -1).transpose(1, 2), dim=1).reshape(b, -1, 1, 1)
        attens = torch.split(atten, x.shape[1] // self.radix, dim=1)
        return sum(a * s for a, s in zip(attens, splits)).contiguous()


    def _bn1(self, gap: Tensor) -> Tensor:
        """``bn1`` on the pooled ``(B, C, 1, 1)`` attention input. A training batch of one image has one
        value per channel, where BatchNorm cannot take batch statistics (detectron2-ResNeSt stops with
        an error there): such a batch is normalised with the running statistics instead."""
        bn = self.bn1
        if self.training and gap.shape[0] == 1 and isinstance(bn, nn.BatchNorm2d):
            return F.batch_norm(gap, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return bn(gap)


class ResNeStBlock(nn.Module):
    """Bottleneck with split attention, avd and avg-down (optionally deformable); see the module text."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck: int, *, stride: int, norm, radix: int = 2,
                 deform_groups: int = 0, modulated: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.avd = stride > 1
        if in_channels != out_channels:
            self.shortcut_avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            self.shortcut = ConvNorm(in_channels, out_channels, 1, bias=False, norm=norm(out_channels))
        else:
            self.shortcut_avgpool = self.shortcut = None
        self.conv1 = ConvNorm(in_channels, bottleneck, 1, bias=False, norm=norm(bottleneck))
        conv_stride = 1 if self.avd else stride
        if deform_groups:
            per_group = 27 if modulated else 18
            self.conv2_offset = nn.Conv2d(bottleneck, per_group * deform_groups, 3, conv_stride, 1, groups=deform_groups)
            nn.init.zeros_(self.conv2_offset.weight)
            nn.init.zeros_(self.conv2_offset.bias)
        else:
            self.conv2_offset = None
        self.conv2 = SplitAttentionConv(bottleneck, bottleneck, stride=conv_stride, radix=radix, norm=norm,
                                        deform_groups=deform_groups, modulated=modulated)  # fmt: skip
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if self.avd else None
        self.conv3 = ConvNorm(bottleneck, out_channels, 1, bias=False, norm=norm(out_channels))
        for conv in (self.conv1, self.conv3, self.shortcut):
            if conv is not None:
                _c2_msra_fill(conv)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        if self.conv2_offset is not None:
            out = self.conv2(out, self.conv2_offset(out))
        else:
            out = self.conv2(out)
        if self.avd_layer is not None:
            out = self.avd_layer(out)
        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(self.shortcut_avgpool(x))
        return F.relu(out + shortcut)


class DeepStem(nn.Module):
    """Three 3x3 conv + norm + ReLU, then max-pool: ``(B, 3, H, W) -> (B, 2 width, H / 4, W / 4)``."""

    def __init__(self, width: int, norm) -> None:
        super().__init__()
        self.conv1_1 = ConvNorm(3, width, 3, 2, 1, bias=False, norm=norm(width))
        self.conv1_2 = ConvNorm(width, width, 3, 1, 1, bias=False, norm=norm(width))
        self.conv1_3 = ConvNorm(width, 2 * width, 3, 1, 1, bias=False, norm=norm(2 * width))
        for conv in (self.conv1_1, self.conv1_2, self.conv1_3):
            _c2_msra_fill(conv)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1_1(x))
        x = F.relu(self.conv1_2(x))
        x = F.relu(self.conv1_3(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNeStBody(nn.Sequential):
    """``stem``, ``res2`` .. ``res5`` in order (an ``IntermediateLayerGetter`` picks the stage outputs:
    res2 ``(B, 256, H/4, W/4)`` .. res5 ``(B, 2048, H/32, W/32)``)."""


def build_resnest_body(depth: int, *, deform_on_per_stage=(False,) * 4, deform_modulated: bool = False,
                       deform_num_groups: int = 1, freeze_at: int = 0, radix: int = 2) -> ResNeStBody:  # fmt: skip
    """A randomly initialised ResNeSt-``depth`` body (BatchNorm; frozen parts FrozenBN)."""
    if depth not in RESNEST_BLOCKS:
        raise ValueError(f"ResNeSt depth {depth} is not built: use one of {', '.join(map(str, RESNEST_BLOCKS))}")
    norm = nn.BatchNorm2d
    stem_width = _STEM_WIDTH[depth]
    parts: OrderedDict[str, nn.Module] = OrderedDict(stem=DeepStem(stem_width, norm))
    in_ch, out_ch, bottleneck = 2 * stem_width, 256, 64
    for idx, n in enumerate(RESNEST_BLOCKS[depth]):
        deform = deform_num_groups if deform_on_per_stage[idx] else 0
        blocks = []
        for i in range(n):
            stride = 2 if (i == 0 and idx > 0) else 1
            blocks.append(ResNeStBlock(in_ch, out_ch, bottleneck, stride=stride, norm=norm, radix=radix,
                                       deform_groups=deform, modulated=deform_modulated))  # fmt: skip
            in_ch = out_ch
        parts[f"res{idx + 2}"] = nn.Sequential(*blocks)
        out_ch, bottleneck = out_ch * 2, bottleneck * 2
    body = ResNeStBody(parts)
    freeze_resnest(body, freeze_at)
    return body


def _to_frozen_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` by a FrozenBatchNorm2d with its statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = _to_frozen_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def freeze_resnest(body: ResNeStBody, freeze_at: int) -> None:
    """As detectron2: the stem (``freeze_at >= 1``) and res2..res``freeze_at`` get no gradient and
    FrozenBatchNorm2d."""
    names = ["stem", "res2", "res3", "res4", "res5"][: max(0, min(freeze_at, 5))]
    for name in names:
        part = getattr(body, name)
        for p in part.parameters():
            p.requires_grad_(False)
        _to_frozen_bn(part)
