"""Fine-tuning Mask R-CNN on annotated images (GUI-free): data, augmentation, the training loop,
K-fold cross-validation and multi-GPU launch through ``torchrun``.

The names below are imported lazily (on first use), so ``import napari_sartorius.training`` does not
load torch; the submodules do.

- :mod:`.data`: ``dataset_from_pairs``, ``dataset_from_annotations``, ``dataset_from_file``,
  ``concat_datasets``, ``TrainingDataset``.
- :mod:`.augment`: ``AugmentationSettings``, ``TrainTransform`` and the v2 transforms.
- :mod:`.settings` (no torch): ``TrainSettings``, ``AugmentationSettings``, ``TrainProgress``, ``TrainResult``,
  ``TrainingError``, ``lr_at``, ``multiscale_sizes`` (the dock's presets: ``_widgets/_finetune_presets``).
- :mod:`.model_surgery`: class-head adaptation, frozen stages, fresh-model calibration.
- :mod:`.checkpointing`: checkpoint paths, resumable state, provenance.
- :mod:`.trainer`: ``train`` (generator), ``run_training``, re-exporting the settings types,
  ``TrainResult``, ``TrainingError``, ``adapt_num_classes``, ``evaluate_model``.
- :mod:`.kfold`: ``stratified_kfold``, ``run_kfold``, ``KFoldResult``.
- :mod:`.distributed`: torchrun / DistributedDataParallel helpers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainingDataset": "data",
    "TrainSample": "data",
    "dataset_from_pairs": "data",
    "dataset_from_annotations": "data",
    "dataset_from_file": "data",
    "concat_datasets": "data",
    "AugmentationSettings": "settings",
    "TrainTransform": "augment",
    "TrainSettings": "settings",
    "TrainProgress": "settings",
    "TrainResult": "settings",
    "TrainingError": "settings",
    "lr_at": "settings",
    "multiscale_sizes": "settings",
    "train": "trainer",
    "run_training": "trainer",
    "adapt_num_classes": "trainer",
    "evaluate_model": "trainer",
    "best_path_for": "trainer",
    "stratified_kfold": "kfold",
    "run_kfold": "kfold",
    "KFoldResult": "kfold",
    "KFoldProgress": "kfold",
    "fold_path": "kfold",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
