"""FrozenBN folded into the convolutions and channels-last weights: same features, no BN left where folded."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.checkpoint import save_checkpoint
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.models.fast_inference import fold_frozen_batchnorm_, prepare_for_inference_
from napari_sartorius.models.predictor import MaskRCNNEngine


def randomised_bn(model):
    """FrozenBN statistics away from the identity, as in trained weights."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("arch", ["mask_rcnn_R_50_FPN", "mask_rcnn_R_50_C4"])
def test_folded_channels_last_model_gives_the_same_features(arch):
    torch.manual_seed(0)
    model = randomised_bn(build_model(ModelConfig(arch))).eval()
    fast = copy.deepcopy(model)
    n = fold_frozen_batchnorm_(fast)
    bns = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert n == bns == 53  # every FrozenBN of ResNet-50 (the C4 head's res5 included) follows its convolution
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    prepare_for_inference_(fast)
    x = torch.rand(1, 3, 96, 128) * 2 - 1
    with torch.inference_mode():
        ref, got = model.backbone(x), fast.backbone(x)
    ref = ref if isinstance(ref, dict) else {"0": ref}
    got = got if isinstance(got, dict) else {"0": got}
    for k in ref:
        scale = float(ref[k].abs().max())
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5 * scale)


def test_engines_from_checkpoints_run_folded_on_the_cpu(tmp_path):
    config = ModelConfig("mask_rcnn_R_50_FPN", min_size_test=96, max_size_test=160, detections_per_img=10)
    path = save_checkpoint(tmp_path / "m.pt", build_model(config), config)
    fast = MaskRCNNEngine.from_checkpoint(path)
    plain = MaskRCNNEngine.from_checkpoint(path, fast=False)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.model.backbone.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in plain.model.backbone.body.modules())
