"""Small models and data that keep training tests to a few seconds on a CPU."""

import pytest
import torch

from napari_sartorius.models.config import ModelConfig
from napari_sartorius.synthetic import make_dataset
from napari_sartorius.training.augment import AugmentationSettings
from napari_sartorius.training.data import dataset_from_annotations


def tiny_config(**changes) -> ModelConfig:
    """R50-FPN with tiny inputs, few proposals and RoIs, a narrow box head, a frozen body."""
    base = dict(
        min_size_train=(96,), max_size_train=160, min_size_test=96, max_size_test=160,
        roi_batch_size_per_image=16, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_head_dim=64, freeze_at=5,
        detections_per_img=20,
    )
    base.update(changes)
    return ModelConfig("mask_rcnn_R_50_FPN", **base)


def tiny_dataset(n=2, styles=("shsy5y",), seed=0):
    images, aset = make_dataset(n, styles=styles, shape=(96, 128), seed=seed)
    return dataset_from_annotations(aset, images)


NO_AUG = AugmentationSettings.none()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
