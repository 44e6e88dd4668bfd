"""Mask R-CNN models on torchvision's detection stack.

- :mod:`.config`: :class:`~.config.ModelConfig` (architecture, classes, input normalisation, anchors).
- :mod:`.architectures`: ``ARCHITECTURES``, ``build_model(config)``, ``parameter_count(arch)``.
- :mod:`.checkpoint`: the project's checkpoint format (``save_checkpoint``, ``load_checkpoint``).
- :mod:`.predictor`: ``MaskRCNNEngine``, the engine that runs a model on images.
- :mod:`.detectron2_import`, :mod:`.d2_config`: detectron2 checkpoints without detectron2.

Submodules import torch; this package file does not, so ``import napari_sartorius.models`` is cheap.
"""
