"""Mask R-CNN models on torchvision's detection stack.

- :mod:`.registry`: the one list of architectures (torch-free).
- :mod:`.config`: :class:`~.config.ModelConfig` (architecture, classes, input normalisation, anchors).
- :mod:`.architectures`: ``ARCHITECTURES``, ``build_model(config)``, ``parameter_count(arch)``.
- :mod:`.checkpoint`: the project's checkpoint format (``save_checkpoint``, ``load_checkpoint``).
- :mod:`.predictor`: ``MaskRCNNEngine``, the engine that runs a model on images.
- :mod:`.detectron2_import`, :mod:`.d2_config`: detectron2 checkpoints without detectron2.

What the architectures support of detectron2's options (for the importer and the README):
``RESNETS.DEPTH`` 50/101/152 with ``NUM_GROUPS``/``WIDTH_PER_GROUP`` 1x64 (R) or 32x8 (X), ResNeSt
(``RADIX`` 2, depth 50/101/200, cascade heads: detectron2-ResNeSt and LIVECell's anchor-based models),
``RPN.IN_FEATURES`` any FPN levels (repeats allowed),
``STRIDE_IN_1X1``, ``FREEZE_AT``, ``DEFORM_ON_PER_STAGE`` (not in a C4 res5 head), ``DEFORM_MODULATED``,
``DEFORM_NUM_GROUPS``, ``FPN.NORM`` "", "GN" or BN/SyncBN, ``ROI_BOX_HEAD`` ``NUM_CONV``/``NUM_FC``/``FC_DIM``/``NORM``
("", "GN" or BN/SyncBN; conv dim 256), ``ROI_MASK_HEAD`` ``NUM_CONV``/``NORM`` (conv dim 256), ``ROIAlignV2`` or
``ROIAlign`` with any sampling ratio, any anchor sizes/ratios (one ratio set for all levels), cascade IoUs
and box weights. Not supported: a GroupNorm body (``RESNETS.NORM`` "GN"; BN/SyncBN bodies of ResNet/ResNeXt run frozen),
``RES5_DILATION`` 2 (DC5), class-agnostic box regression outside the cascade, ``ROI_MASK_HEAD``
``CLS_AGNOSTIC_MASK``, ``FPN.FUSE_TYPE`` "avg", head conv dims other than 256, per-level aspect ratios.

Submodules import torch; this package file does not, so ``import napari_sartorius.models`` is cheap.
"""
