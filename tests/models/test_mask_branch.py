import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from napari_sartorius.models.architectures import ChunkedMaskRoIHeads, build_model
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.models.predictor import image_to_tensor
from napari_sartorius.synthetic import make_sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig("mask_rcnn_R_50_FPN", min_size_test=128, max_size_test=256, detections_per_img=60)
    return build_model(config).eval()


def _run(model):
    image = image_to_tensor(make_sample("cort", seed=3, shape=(96, 128)).image)
    with torch.inference_mode():
        return model([image, image.flip(-1)])


def test_chunked_masks_equal_torchvisions_single_pass(model, monkeypatch):
    model.roi_heads.mask_chunk = 7  # 60 detections per image -> 9 passes each
    chunked = _run(model)
    monkeypatch.setattr(ChunkedMaskRoIHeads, "forward", RoIHeads.forward)
    reference = _run(model)
    for a, b in zip(chunked, reference):
        assert len(a["boxes"]) > 7
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["masks"], b["masks"], rtol=1e-5, atol=1e-6)
        assert a["masks"].shape[1:] == (1, 28, 28)
