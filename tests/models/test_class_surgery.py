"""A one-class (LIVECell "cell") model fine-tuned into several classes starts each from the cell class."""

from __future__ import annotations

import math

import pytest
import torch

from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.class_surgery import class_layers, inherit_single_class
from napari_sartorius.models.config import ModelConfig

NEW = ("shsy5y", "astro", "cort")


def _small(arch="mask_rcnn_R_50_FPN", classes=("cell",)) -> ModelConfig:
    return ModelConfig(
        arch, class_names=classes, min_size_train=(96,), max_size_train=160, min_size_test=96, max_size_test=160,
        roi_batch_size_per_image=16, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_head_dim=64, freeze_at=5, detections_per_img=20,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_class():
    torch.manual_seed(0)
    cfg = _small()
    model = build_model(cfg).eval()
    with torch.no_grad():  # a distinct, non-zero cell row, as a trained model has
        for _, mod, _ in class_layers(model):
            mod.weight.normal_(0, 0.05)
            mod.bias.normal_(0, 0.5)
    return model, cfg


def test_every_new_class_starts_from_the_cell_class(one_class):
    import copy

    model, cfg = copy.deepcopy(one_class)
    old = {name: (mod.weight.detach().clone(), mod.bias.detach().clone()) for name, mod, _ in class_layers(model)}
    model2, cfg2, msg = inherit_single_class(model, cfg, NEW)
    assert cfg2.class_names == NEW and model2.config.class_names == NEW
    assert "start from its cell class" in msg
    box = model2.roi_heads.box_predictor
    w_cls, b_cls = old["roi_heads.box_predictor.cls_score"]
    assert box.cls_score.weight.shape[0] == 4
    assert torch.equal(box.cls_score.weight[0], w_cls[0]) and torch.equal(box.cls_score.bias[0], b_cls[0])
    for k in range(1, 4):
        assert torch.equal(box.cls_score.weight[k], w_cls[1])
        assert box.cls_score.bias[k].item() == pytest.approx(b_cls[1].item() - math.log(3), abs=1e-6)
    w_box, b_box = old["roi_heads.box_predictor.bbox_pred"]
    assert box.bbox_pred.weight.shape[0] == 16
    assert torch.equal(box.bbox_pred.weight[:4], w_box[:4])
    for k in range(1, 4):
        assert torch.equal(box.bbox_pred.weight[4 * k : 4 * k + 4], w_box[4:8])
        assert torch.equal(box.bbox_pred.bias[4 * k : 4 * k + 4], b_box[4:8])
    mask = model2.roi_heads.mask_predictor.mask_fcn_logits
    w_mask, b_mask = old["roi_heads.mask_predictor.mask_fcn_logits"]
    assert mask.weight.shape[0] == 4
    for k in range(1, 4):
        assert torch.equal(mask.weight[k], w_mask[1]) and torch.equal(mask.bias[k], b_mask[1])


def test_foreground_probability_is_unchanged(one_class):
    import copy

    model, cfg = copy.deepcopy(one_class)
    feats = torch.randn(50, model.roi_heads.box_predictor.cls_score.in_features)
    with torch.no_grad():
        before = torch.softmax(model.roi_heads.box_predictor.cls_score(feats), dim=1)
        inherit_single_class(model, cfg, NEW)
        after = torch.softmax(model.roi_heads.box_predictor.cls_score(feats), dim=1)
    torch.testing.assert_close(after[:, 0], before[:, 0], atol=1e-6, rtol=1e-5)
    for k in range(1, 4):
        torch.testing.assert_close(after[:, k], before[:, 1] / 3, atol=1e-6, rtol=1e-5)


def test_only_one_class_models_are_changed(one_class):
    model, cfg = one_class
    assert inherit_single_class(model, cfg, ("cell",)) is None
    three = _small(classes=NEW)
    with torch.device("meta"):
        m3 = build_model(three)
    assert inherit_single_class(m3, three, ("a", "b")) is None


@pytest.mark.parametrize("arch", ["cascade_mask_rcnn_X_152_32x8d_FPN", "cascade_mask_rcnn_ResNeSt_200_FPN"])
def test_cascade_stages_expand_and_class_agnostic_boxes_stay(arch):
    cfg = ModelConfig(arch, class_names=("cell",))
    with torch.device("meta"):  # shapes only
        model = build_model(cfg)
        _, cfg2, _ = inherit_single_class(model, cfg, NEW)
    for name, mod, kind in class_layers(model):
        want = {"cls": 4, "box": 4, "mask": 4}[kind]
        assert mod.weight.shape[0] == want, name
    assert sum(kind == "cls" for _, _, kind in class_layers(model)) == 3
    assert cfg2.class_names == NEW


def test_training_a_one_class_checkpoint_on_three_classes_uses_it(tmp_path, one_class):
    from napari_sartorius.models.checkpoint import save_checkpoint
    from napari_sartorius.synthetic import make_dataset
    from napari_sartorius.training.augment import AugmentationSettings
    from napari_sartorius.training.data import dataset_from_annotations
    from napari_sartorius.training.trainer import TrainSettings, run_training, train

    torch.set_num_threads(1)
    model, cfg = one_class
    save_checkpoint(tmp_path / "livecell.pt", model, cfg)
    images, aset = make_dataset(1, styles=("shsy5y",), shape=(96, 128), seed=0)
    data = dataset_from_annotations(aset, images)
    assert len(data.class_names) == 3
    settings = TrainSettings(iters=1, batch_size=1, lr=1e-4, device="cpu", out=str(tmp_path / "out.pt"),
                             augment=AugmentationSettings.none())
    result = run_training(train(str(tmp_path / "livecell.pt"), data, settings))
    assert result.config.class_names == data.class_names
    assert any("start from its cell class" in m for m in result.messages)
    from napari_sartorius.models.checkpoint import read_checkpoint

    cls = read_checkpoint(tmp_path / "out.pt")[0]["roi_heads.box_predictor.cls_score.weight"]
    # one step at lr 1e-4 moves the rows only slightly away from the cell row they started from
    cell = model.roi_heads.box_predictor.cls_score.weight.detach()[1]
    for k in range(1, 4):
        assert torch.allclose(cls[k], cell, atol=1e-2)
