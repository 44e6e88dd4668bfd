"""Model surgery before training: freeze levels (FPN included), the run's RoI/proposal counts, and the
cheap FrozenBN calibration pass of a fresh model."""

import pytest
import torch

from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.training.model_surgery import _set_sampling, prepare_fresh_model, set_freeze_at
from napari_sartorius.training.settings import TrainingError, TrainSettings
from napari_sartorius.training.trainer import run_training, train

from conftest import NO_AUG, tiny_config, tiny_dataset


def _trainable(module):
    return {p.requires_grad for p in module.parameters()}


def test_freeze_level_6_freezes_the_fpn_as_well_as_the_body():
    model = build_model(tiny_config(freeze_at=0))
    set_freeze_at(model, 6)
    assert _trainable(model.backbone.body) == {False} and _trainable(model.backbone.fpn) == {False}
    assert _trainable(model.rpn) == {True} and _trainable(model.roi_heads) == {True}
    set_freeze_at(model, 5)  # back: the FPN trains again, the body stays frozen
    assert _trainable(model.backbone.body) == {False} and _trainable(model.backbone.fpn) == {True}
    set_freeze_at(model, 2)
    assert _trainable(model.backbone.body.layer3) == {True} and _trainable(model.backbone.body.layer1) == {False}


def test_freeze_level_6_is_refused_where_there_is_no_fpn_and_out_of_range():
    c4 = build_model(ModelConfig("mask_rcnn_R_50_C4", min_size_test=64, max_size_test=64))
    with pytest.raises(TrainingError, match="has none: use 5"):
        set_freeze_at(c4, 6)
    assert TrainSettings(freeze_at=6).freeze_at == 6
    with pytest.raises(ValueError, match="0..6"):
        TrainSettings(freeze_at=7)


def test_sampling_counts_change_training_only():
    cfg = tiny_config()
    model = build_model(cfg)
    _set_sampling(model, TrainSettings(roi_batch_size_per_image=8, rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=30))
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 8
    assert model.rpn._pre_nms_top_n == {"training": 50, "testing": cfg.rpn_pre_nms_top_n_test}
    assert model.rpn._post_nms_top_n == {"training": 30, "testing": cfg.rpn_post_nms_top_n_test}
    _set_sampling(model, TrainSettings())  # None keeps what the model has
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 8 and model.rpn._post_nms_top_n["training"] == 30
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="roi_batch_size_per_image must be a positive whole number"):
            TrainSettings(roi_batch_size_per_image=bad)


def test_a_run_with_a_frozen_fpn_and_few_rois_trains_only_the_rpn_and_heads(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg)
    fpn0 = {k: v.clone() for k, v in model.backbone.fpn.state_dict().items()}
    rpn0 = model.rpn.head.conv[0][0].weight.clone()
    s = TrainSettings(iters=2, lr=0.01, batch_size=1, warmup_iters=0, augment=NO_AUG, checkpoint_period=0,
                      freeze_at=6, roi_batch_size_per_image=8, rpn_post_nms_top_n_train=40, out=str(tmp_path / "m.pt"))
    res = run_training(train((model, cfg), tiny_dataset(1), s))
    assert all(torch.equal(v, fpn0[k]) for k, v in res.model.backbone.fpn.state_dict().items())
    assert not torch.equal(res.model.rpn.head.conv[0][0].weight, rpn0)
    assert res.model.roi_heads.fg_bg_sampler.batch_size_per_image == 8
    # the checkpoint records a loadable config: freeze level 5, the model's own RoI and proposal counts
    assert res.config.freeze_at == 5 and res.config.roi_batch_size_per_image == cfg.roi_batch_size_per_image
    assert res.config.rpn_post_nms_top_n_train == cfg.rpn_post_nms_top_n_train


def test_fresh_calibration_runs_only_the_backbone_at_the_training_size():
    torch.manual_seed(0)
    model = build_model(tiny_config(min_size_train=(64,), max_size_train=200, min_size_test=160, max_size_test=400))
    seen, rpn_calls = [], []
    model.backbone.body.register_forward_pre_hook(lambda m, i: seen.append(tuple(i[0].shape)))
    model.rpn.register_forward_pre_hook(lambda m, i: rpn_calls.append(1))
    model.train()
    prepare_fresh_model(model, [torch.rand(3, 96, 128) * 255])
    assert seen == [(1, 3, 64, 96)]  # short edge 64 (85 px wide, padded to 96), not the 160-px test size
    assert rpn_calls == [] and model.training and model.transform.training
    bn = model.backbone.body.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # calibrated
