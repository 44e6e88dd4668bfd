"""Fine-tuning Mask R-CNN on annotated images (GUI-free): data, augmentation, the training loop,
K-fold cross-validation and multi-GPU launch through ``torchrun``."""
