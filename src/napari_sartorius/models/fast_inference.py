"""Faster inference of a model an engine owns: FrozenBN folded into its convolutions, channels-last.

A ResNet body with frozen BatchNorm runs, after every convolution, an element-wise ``x * scale + shift``
over the whole feature map. At inference the pair is one convolution with weights ``W * scale`` and bias
``shift`` (detectron2 leaves them apart). :func:`fold_frozen_batchnorm_` folds them in place where the
data flow is known to be ``conv -> bn``: torchvision ``Bottleneck``/``BasicBlock`` (``conv<i>`` -> ``bn<i>``),
the stem (``conv1`` -> ``bn1``) and ``downsample`` = ``Sequential(Conv2d, FrozenBatchNorm2d)``. A
deformable ``conv2`` (not an ``nn.Conv2d``) keeps its BN. Channels-last convolution weights then make
the convolutions run in NHWC from the first one on (PyTorch follows a channels-last weight): oneDNN's
direct NHWC kernels on the CPU, without layout reorders; on a GPU the layout cuDNN's tensor-core
kernels read, which fp16 autocast uses (an NCHW network is transposed around them).

Both change only float rounding (features within ~1e-5 relative). They rewrite the module in place, so
the model's ``state_dict`` no longer has the checkpoint's layout: use them only on a model nothing else
trains or saves (:meth:`~.predictor.MaskRCNNEngine.from_checkpoint` engines).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["fold_frozen_batchnorm_", "prepare_for_inference_"]


def _folded(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        out.bias.copy_(shift if conv.bias is None else shift + conv.bias * scale)
    out.requires_grad_(False)
    return out


def _fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> int:
    conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
    if type(conv) is not nn.Conv2d or type(bn) is not FrozenBatchNorm2d:
        return 0
    setattr(parent, conv_name, _folded(conv, bn))
    setattr(parent, bn_name, nn.Identity())
    return 1


def fold_frozen_batchnorm_(model: nn.Module) -> int:
    """Fold every FrozenBN that directly follows its convolution into it, in place; returns how many."""
    n = 0
    for module in list(model.modules()):
        if isinstance(module, (Bottleneck, BasicBlock)):
            n += sum(_fold_pair(module, f"conv{i}", f"bn{i}") for i in (1, 2, 3))
        elif hasattr(module, "conv1") and hasattr(module, "bn1") and hasattr(module, "layer1"):  # the stem
            n += _fold_pair(module, "conv1", "bn1")
        if isinstance(module, (Bottleneck, BasicBlock)) and isinstance(module.downsample, nn.Sequential) \
                and len(module.downsample) == 2:
            n += _fold_pair(module.downsample, "0", "1")
    return n


def prepare_for_inference_(model: nn.Module) -> nn.Module:
    """:func:`fold_frozen_batchnorm_`, then channels-last convolution weights; returns ``model``."""
    fold_frozen_batchnorm_(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return model
