"""The one registry of model architectures (torch-free: listing them costs no import of torch).

Every place that names architectures looks them up here: :class:`~.config.ModelConfig` validation,
:func:`~.architectures.build_model`, the detectron2 config reader (:mod:`.d2_config`), the CLI
(``models``, ``init-model``, ``train --arch``) and the Fine-tune dock's architecture choice.

Each :class:`ArchInfo` states the builder (``"module:function"``, imported only when a model is built),
the body, the head family (C4, FPN or cascade), the normalisation of the body, a description and the
parameter count with the default three classes (stored as a number so that ``napari-sartorius models``
prints without building anything; ``tests/models/test_registry.py`` checks it against a model built on
the meta device).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

__all__ = ["ArchInfo", "REGISTRY", "ARCH_NAMES", "C4_ARCHS", "FPN_ARCHS", "check_arch", "arch_info", "arch_builder"]


@dataclass(frozen=True)
class ArchInfo:
    """One registered architecture.

    Attributes:
        name: the architecture name (detectron2 model-zoo style).
        body: the backbone body: ``"R_50"``, ``"R_101"``, ``"X_101_32x8d"``, ``"X_152_32x8d"``,
            ``"ResNeSt_50"``, ``"ResNeSt_101"`` or ``"ResNeSt_200"``.
        kind: ``"C4"`` (RPN and RoIAlign on res4, res5 as RoI head), ``"FPN"`` (Mask R-CNN with FPN) or
            ``"cascade"`` (3-stage Cascade Mask R-CNN with FPN: detectron2's, or for the ``mmdet_``
            names MMDetection's, :mod:`.mmdet_cascade`).
        builder: ``"module:function"`` inside ``napari_sartorius.models`` taking a ``ModelConfig``.
        description: one line for listings.
        parameters: number of parameters with three classes (FrozenBN / BN statistics excluded).
        body_norm: ``"FrozenBN"`` (ResNet/ResNeXt bodies) or ``"BN"`` (ResNeSt: BatchNorm, SyncBN under
            torchrun).
    """

    name: str
    body: str
    kind: str
    builder: str
    description: str
    parameters: int
    body_norm: str = "FrozenBN"

    @property
    def is_c4(self) -> bool:
        return self.kind == "C4"

    @property
    def is_cascade(self) -> bool:
        return self.kind == "cascade"

    @property
    def is_resnest(self) -> bool:
        return self.body.startswith("ResNeSt_")


_A = "napari_sartorius.models.architectures:"
_M = "napari_sartorius.models.mmdet_cascade:"

_ENTRIES = (
    ArchInfo("mask_rcnn_R_50_C4", "R_50", "C4", _A + "build_c4_model",
             "ResNet-50, RPN + RoIAlign on res4, res5 head", 35_160_661),
    ArchInfo("mask_rcnn_R_50_FPN", "R_50", "FPN", _A + "build_fpn_model", "ResNet-50 + FPN", 43_935_729),
    ArchInfo("mask_rcnn_R_101_C4", "R_101", "C4", _A + "build_c4_model",
             "ResNet-101, RPN + RoIAlign on res4, res5 head", 54_100_565),
    ArchInfo("mask_rcnn_R_101_FPN", "R_101", "FPN", _A + "build_fpn_model", "ResNet-101 + FPN", 62_875_633),
    ArchInfo("mask_rcnn_X_101_32x8d_FPN", "X_101_32x8d", "FPN", _A + "build_fpn_model",
             "ResNeXt-101 32x8d + FPN", 107_020_273),
    ArchInfo("cascade_mask_rcnn_X_152_32x8d_FPN", "X_152_32x8d", "cascade", _A + "build_cascade_model",
             "ResNeXt-152 32x8d + FPN, deformable res3-res5, 3-stage cascade, GroupNorm heads", 182_233_923),
    ArchInfo("cascade_mask_rcnn_ResNeSt_50_FPN", "ResNeSt_50", "cascade", _A + "build_cascade_model",
             "ResNeSt-50 + FPN, 3-stage cascade, BN heads (detectron2-ResNeSt COCO)", 77_645_173, "BN"),
    ArchInfo("cascade_mask_rcnn_ResNeSt_101_FPN", "ResNeSt_101", "cascade", _A + "build_cascade_model",
             "ResNeSt-101 + FPN, 3-stage cascade, BN heads (detectron2-ResNeSt COCO)", 98_436_693, "BN"),
    ArchInfo("cascade_mask_rcnn_ResNeSt_200_FPN", "ResNeSt_200", "cascade", _A + "build_cascade_model",
             "ResNeSt-200 + FPN, modulated deformable res3-res5, 3-stage cascade, BN heads, RPN on "
             "p2,p2,p3-p6 (LIVECell anchor-based)", 126_087_199, "BN"),
    # MMDetection's Cascade Mask R-CNN (a mask head per stage, stage logits averaged): imported models
    ArchInfo("mmdet_cascade_mask_rcnn_R_50_FPN", "R_50", "cascade", _M + "build_mmdet_cascade_model",
             "ResNet-50 + FPN, 3-stage cascade with a mask head per stage (MMDetection)", 76_978_685),
    ArchInfo("mmdet_cascade_mask_rcnn_R_101_FPN", "R_101", "cascade", _M + "build_mmdet_cascade_model",
             "ResNet-101 + FPN, 3-stage cascade with a mask head per stage (MMDetection)", 95_918_589),
    ArchInfo("mmdet_cascade_mask_rcnn_X_101_32x8d_FPN", "X_101_32x8d", "cascade", _M + "build_mmdet_cascade_model",
             "ResNeXt-101 32x8d + FPN, 3-stage cascade with a mask head per stage (MMDetection)", 140_063_229),
)  # fmt: skip

#: name -> :class:`ArchInfo`, in listing order.
REGISTRY: dict[str, ArchInfo] = {a.name: a for a in _ENTRIES}
ARCH_NAMES: tuple[str, ...] = tuple(REGISTRY)
C4_ARCHS: tuple[str, ...] = tuple(a.name for a in _ENTRIES if a.is_c4)
FPN_ARCHS: tuple[str, ...] = tuple(a.name for a in _ENTRIES if not a.is_c4)


def check_arch(arch: str) -> str:
    """Return ``arch`` if it is registered, else raise ValueError listing the architectures."""
    if arch not in REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCH_NAMES)}")
    return arch


def arch_info(arch: str) -> ArchInfo:
    """The :class:`ArchInfo` of ``arch`` (ValueError naming the choices if unknown)."""
    return REGISTRY[check_arch(arch)]


def arch_builder(arch: str) -> Callable:
    """The builder function of ``arch`` (imports torch and the model code)."""
    module, func = arch_info(arch).builder.split(":")
    return getattr(importlib.import_module(module), func)
