"""The registered architectures: build, a training step, eval output; components against torchvision."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.resnet import Bottleneck, ResNet

from napari_sartorius.models import backbones
from napari_sartorius.models.anchors import cell_anchors
from napari_sartorius.models.architectures import (
    ARCHITECTURES,
    build_model,
    load_backbone_weights,
    parameter_count,
)
from napari_sartorius.models.config import ARCH_NAMES, ModelConfig
from napari_sartorius.models.deform_conv import DeformConv3x3
from napari_sartorius.models.pooler import RoIPooler
from napari_sartorius.models.transform import CellTransform, resized_shape

SIZE = 128


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_resnext(monkeypatch):
    """X-101 / X-152 bodies with one block per stage (same widths, groups, deformable stages), so that
    their heads (cascade, GroupNorm, deformable convs) are exercised in seconds."""
    def tiny(**kw):
        return ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=8, **kw)

    monkeypatch.setitem(backbones._BODIES, "X_101_32x8d", tiny)
    monkeypatch.setitem(backbones._BODIES, "X_152_32x8d", tiny)
    # ResNeSt bodies with one block per stage (two in res3: a stride-2 avd block and a plain one)
    from napari_sartorius.models import resnest

    for depth in resnest.RESNEST_BLOCKS:
        monkeypatch.setitem(resnest.RESNEST_BLOCKS, depth, (1, 2, 1, 1))


def small_config(arch: str, **changes) -> ModelConfig:
    kw = dict(
        min_size_test=SIZE,
        max_size_test=2 * SIZE,
        min_size_train=(SIZE,),
        max_size_train=2 * SIZE,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=150,
        rpn_pre_nms_top_n_test=300,
        # C4 runs res5 per RoI and the X-152 mask head has 8 GN convs: keep RoI counts small
        rpn_post_nms_top_n_test=30 if "C4" in arch else 60,
        roi_batch_size_per_image=16 if "C4" in arch else 32,
        detections_per_img=10,
        score_thresh_test=0.0,
    )
    kw.update(changes)
    return ModelConfig(arch, **kw)


def synthetic_sample(size: int = SIZE):
    """A bright-blob image (float RGB 0..255) and 3 box/mask targets."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g) * 40 + 60
    boxes = torch.tensor([[10.0, 12.0, 40.0, 50.0], [60.0, 58.0, 101.0, 90.0], [20.0, 80.0, 45.0, 120.0]])
    masks = torch.zeros(3, size, size, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
        inside = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1
        masks[i][inside] = 1
        image[:, inside] += 80
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "masks": masks}
    return image, target


def test_registry_is_the_named_architectures():
    assert tuple(ARCHITECTURES) == ARCH_NAMES
    assert "cascade_mask_rcnn_ResNeSt_200_FPN" in ARCH_NAMES
    assert {s.kind for s in ARCHITECTURES.values()} == {"FPN", "C4", "cascade"}
    with pytest.raises(ValueError, match="mask_rcnn_R_50_C4"):
        parameter_count("resnet")


def test_parameter_counts_on_meta_device():
    counts = {a: parameter_count(a) for a in ARCH_NAMES}
    # detectron2's R-50-FPN Mask R-CNN has ~44 M parameters
    assert 42e6 < counts["mask_rcnn_R_50_FPN"] < 46e6
    assert counts["mask_rcnn_R_50_C4"] < counts["mask_rcnn_R_50_FPN"] < counts["mask_rcnn_R_101_FPN"]
    assert counts["mask_rcnn_R_101_FPN"] < counts["mask_rcnn_X_101_32x8d_FPN"]
    assert counts["mask_rcnn_X_101_32x8d_FPN"] < counts["cascade_mask_rcnn_X_152_32x8d_FPN"]
    assert counts["cascade_mask_rcnn_ResNeSt_50_FPN"] < counts["cascade_mask_rcnn_ResNeSt_101_FPN"]
    assert counts["cascade_mask_rcnn_ResNeSt_101_FPN"] < counts["cascade_mask_rcnn_ResNeSt_200_FPN"]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_train_step_and_eval(arch, tiny_resnext):
    torch.manual_seed(0)
    cfg = small_config(arch)
    model = build_model(cfg)
    image, target = synthetic_sample()

    background = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 96, SIZE, dtype=torch.uint8),
    }
    model.train()
    losses = model([image, image[:, :96]], [target, background])  # an image without cells is fine
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_mask"}
    if cfg.is_cascade:
        expected |= {f"loss_{n}_stage{k}" for n in ("classifier", "box_reg") for k in range(3)}
    else:
        expected |= {"loss_classifier", "loss_box_reg"}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in trainable.items() if p.grad is not None}
    assert all(torch.isfinite(trainable[n].grad).all() for n in with_grad)
    # every head gets gradients; the frozen stem gets none
    for part in ("rpn.head.", "roi_heads.box_predictor.", "roi_heads.mask_predictor."):
        assert any(n.startswith(part) for n in with_grad), part
    body = model.backbone.body
    stem = body.conv1 if hasattr(body, "conv1") else body.stem.conv1_1
    assert not stem.weight.requires_grad

    model.eval()
    with torch.no_grad():
        (out,) = model([image[:, :100, :]])  # a non-square input: boxes map back to it
    m = cfg.mask_size
    n = len(out["boxes"])
    assert 0 < n <= min(cfg.detections_per_img, 3 * cfg.rpn_post_nms_top_n_test)
    assert out["masks"].shape == (n, 1, m, m)  # raw mask probabilities, never pasted
    assert 0 <= out["masks"].min() and out["masks"].max() <= 1
    assert out["labels"].min() >= 1 and out["labels"].max() <= 3
    assert out["boxes"][:, [0, 2]].max() <= SIZE and out["boxes"][:, [1, 3]].max() <= 100


@pytest.mark.parametrize("arch", ["mask_rcnn_R_50_FPN", "mask_rcnn_R_50_C4", "cascade_mask_rcnn_X_152_32x8d_FPN"])
def test_fresh_output_layers_start_as_detectron2(arch, tiny_resnext):
    from napari_sartorius.training.trainer import prepare_fresh_model

    torch.manual_seed(0)
    model = build_model(small_config(arch))
    heads = model.roi_heads
    pred = heads.mask_predictor
    assert abs(pred.mask_fcn_logits.weight.std().item() - 0.001) < 2e-4
    deconv = pred.conv5_mask.weight  # (in, out, 2, 2): fan_out = in * 4
    assert abs(deconv.std().item() - math.sqrt(2 / (deconv.shape[0] * 4))) < 0.1 * math.sqrt(2 / (deconv.shape[0] * 4))
    assert not pred.mask_fcn_logits.bias.any() and not pred.conv5_mask.bias.any()
    for box_pred in heads.box_predictor if isinstance(heads.box_predictor, torch.nn.ModuleList) else [heads.box_predictor]:
        assert abs(box_pred.cls_score.weight.std().item() - 0.01) < 2e-3
        assert abs(box_pred.bbox_pred.weight.std().item() - 0.001) < 3e-4
        assert not box_pred.cls_score.bias.any() and not box_pred.bbox_pred.bias.any()
    # the training start of a fresh model (FrozenBN statistics from the data): mask logits ~0, so the
    # mask loss is ln 2 (torchvision's Kaiming-drawn logits gave 3-10)
    image, target = synthetic_sample()
    prepare_fresh_model(model, [image])
    model.train()
    with torch.no_grad():
        losses = model([image], [target])
    assert abs(losses["loss_mask"].item() - math.log(2)) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mask_rcnn_X_101_32x8d_FPN", "cascade_mask_rcnn_X_152_32x8d_FPN"])
def test_full_resnext_builds_and_runs(arch):
    torch.manual_seed(0)
    model = build_model(small_config(arch, min_size_test=64, max_size_test=64)).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 64) * 255])
    assert out["masks"].shape[1:] == (1, 28, 28)
    blocks = [len(getattr(model.backbone.body, f"layer{i}")) for i in range(1, 5)]
    assert blocks == ([3, 8, 36, 3] if "152" in arch else [3, 4, 23, 3])


def test_x152_structure_follows_the_detectron2_config(tiny_resnext):
    model = build_model(ModelConfig("cascade_mask_rcnn_X_152_32x8d_FPN"))
    body = model.backbone.body
    assert not isinstance(body.layer1[0].conv2, DeformConv3x3)
    assert all(isinstance(getattr(body, f"layer{i}")[0].conv2, DeformConv3x3) for i in (2, 3, 4))
    assert body.layer2[0].conv2.groups == 32 and body.layer1[0].conv2.out_channels == 256
    heads = model.roi_heads
    assert len(heads.box_head) == 3 and heads.stage_iou_thresholds == (0.5, 0.6, 0.7)
    assert [c.weights for c in heads.stage_box_coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert heads.box_predictor[0].bbox_pred.out_features == 4  # class-agnostic
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in heads.box_head[0].modules()) == 4
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in heads.mask_head.modules()) == 8
    names = dict(model.named_parameters())
    assert "backbone.body.layer2.0.conv2.offset.weight" in names
    assert "roi_heads.box_predictor.2.cls_score.weight" in names


def test_c4_test_time_chunks_give_the_same_result(same_detections):
    torch.manual_seed(0)
    model = build_model(small_config("mask_rcnn_R_50_C4")).eval()
    image, _ = synthetic_sample()
    with torch.no_grad():
        whole = model([image])[0]
        model.roi_heads.inference_chunk = 7
        chunked = model([image])[0]
    assert len(whole["boxes"]) > 0
    # chunked box-head passes differ by float noise: match detections, never rely on the order of ties
    pairs = same_detections(whole["boxes"], whole["scores"], chunked["boxes"], chunked["scores"],
                            labels_a=whole["labels"], labels_b=chunked["labels"], box_atol=1e-4, score_atol=1e-5)
    assert len(pairs) >= len(whole["boxes"]) - 2
    for i, j in pairs:
        assert torch.allclose(whole["masks"][i], chunked["masks"][j], atol=1e-5)


def test_c4_layout():
    model = build_model(ModelConfig("mask_rcnn_R_50_C4"))
    names = set(model.state_dict())
    assert "roi_heads.res5.0.conv1.weight" in names and "roi_heads.res5.2.conv3.weight" in names
    assert not any(n.startswith("backbone.body.layer4") for n in names)
    assert model.rpn.head.cls_logits.out_channels == 25  # 5 sizes x 5 ratios on res4
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 2048


def test_stride_in_1x1_moves_the_stride():
    body = backbones.build_resnet_body(ModelConfig("mask_rcnn_R_50_FPN", stride_in_1x1=True))
    assert body.layer2[0].conv1.stride == (2, 2) and body.layer2[0].conv2.stride == (1, 1)
    body = backbones.build_resnet_body(ModelConfig("mask_rcnn_R_50_FPN"))
    assert body.layer2[0].conv1.stride == (1, 1) and body.layer2[0].conv2.stride == (2, 2)


def test_anchors_follow_detectron2():
    a = cell_anchors((8.0, 16.0), (0.5, 1.0))
    # size-major: (size 8, ratio .5), (8, 1), (16, .5), (16, 1)
    w = math.sqrt(64 / 0.5)
    assert torch.allclose(a[0], torch.tensor([-w / 2, -0.5 * w / 2, w / 2, 0.5 * w / 2]))
    assert torch.allclose(a[3], torch.tensor([-8.0, -8.0, 8.0, 8.0]))
    assert torch.equal(cell_anchors((8.0,), (0.5,), round_anchors=True), a[:1].round())


def test_pooler_matches_torchvision_when_not_aligned():
    from torchvision.ops import MultiScaleRoIAlign

    g = torch.Generator().manual_seed(1)
    feats = {str(i): torch.rand(1, 4, 64 // 2**i, 64 // 2**i, generator=g) for i in range(4)}
    xy = torch.rand(40, 2, generator=g) * 200
    wh = torch.rand(40, 2, generator=g) * 250 + 2
    boxes = [torch.cat([xy, xy + wh], dim=1)]
    ours = RoIPooler(list(feats), 7, (4, 8, 16, 32), sampling_ratio=2, aligned=False)(feats, boxes)
    ref = MultiScaleRoIAlign(list(feats), 7, 2)(feats, boxes, [(256, 256)])
    assert torch.allclose(ours, ref, atol=1e-6)
    aligned = RoIPooler(list(feats), 7, (4, 8, 16, 32), sampling_ratio=2, aligned=True)(feats, boxes)
    assert not torch.allclose(aligned, ref)


def test_transform_resizes_like_detectron2_and_normalises_in_config_order():
    assert resized_shape(520, 704, 1024, 2000) == (1024, 1386)
    assert resized_shape(520, 704, 1024, 1333) == (985, 1333)
    assert resized_shape(520, 704, 0, 1333) == (520, 704)
    t = CellTransform(
        min_size_train=(64,), max_size_train=100, min_size_test=0, max_size_test=100,
        pixel_mean=(10.0, 20.0, 30.0), pixel_std=(1.0, 2.0, 4.0), input_format="BGR",
    ).eval()  # fmt: skip
    rgb = torch.stack([torch.full((5, 6), 100.0), torch.full((5, 6), 50.0), torch.full((5, 6), 200.0)])
    batch, _ = t([rgb])
    assert batch.image_sizes == [(5, 6)] and batch.tensors.shape[-2:] == (32, 32)
    assert torch.allclose(batch.tensors[0, :, 0, 0], torch.tensor([(200 - 10) / 1, (50 - 20) / 2, (100 - 30) / 4]))
    # shrinking is antialiased (PIL-like): one-pixel stripes average out instead of aliasing
    t.min_size_test = 32
    stripes = torch.zeros(3, 64, 64)
    stripes[:, ::2] = 255.0
    batch, _ = t([stripes])
    assert batch.tensors.shape[-2:] == (32, 32)
    assert torch.allclose(batch.tensors[0, 2, 1:-1], torch.full((30, 32), (127.5 - 30) / 4), atol=1)


def test_deformable_conv_with_zero_offsets_is_a_plain_conv():
    conv = DeformConv3x3(64, 64, stride=2, groups=32)
    x = torch.rand(1, 64, 9, 9)
    ref = torch.nn.functional.conv2d(x, conv.weight, stride=2, padding=1, groups=32)
    assert torch.allclose(conv(x), ref, atol=1e-5)


def test_imagenet_weights_load_into_body_and_res5(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    weights = resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(weights, path)
    c4 = build_model(ModelConfig("mask_rcnn_R_50_C4"))
    assert load_backbone_weights(c4, path) == []
    assert torch.equal(c4.roi_heads.res5[1].conv2.weight, weights["layer4.1.conv2.weight"])
    assert torch.equal(c4.backbone.body.bn1.running_var, weights["bn1.running_var"])
    fpn = build_model(ModelConfig("mask_rcnn_R_50_FPN"), weights_backbone=weights)
    assert torch.equal(fpn.backbone.body.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"])
    shallower = {k: v for k, v in weights.items() if not k.startswith("layer3.5.")}
    with pytest.raises(ValueError, match="does not fit the mask_rcnn_R_50_FPN backbone"):
        load_backbone_weights(fpn, shallower)
    wider = dict(weights, **{"layer1.0.conv2.weight": torch.zeros(256, 8, 3, 3)})
    with pytest.raises(ValueError, match="mis-shaped"):
        load_backbone_weights(fpn, wider)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read ImageNet weights"):
        load_backbone_weights(fpn, tmp_path / "junk.pth")
