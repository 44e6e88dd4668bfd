"""The ResNeSt bodies and LIVECell's anchor-based architecture (cascade_mask_rcnn_ResNeSt_200_FPN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from napari_sartorius.models import resnest
from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.config import ModelConfig

ARCH = "cascade_mask_rcnn_ResNeSt_200_FPN"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setitem(resnest.RESNEST_BLOCKS, 200, (1, 2, 1, 1))


def test_livecell_architecture_follows_the_anchor_based_config():
    with torch.device("meta"):
        model = build_model(ModelConfig(ARCH, class_names=("cell",), freeze_at=0))  # LIVECell's FREEZE_AT
    cfg = model.config
    assert cfg.rpn_in_features == ("p2", "p2", "p3", "p4", "p5", "p6")
    assert cfg.anchor_sizes == ((4,), (9,), (17,), (31,), (64,), (127,))
    assert cfg.aspect_ratios == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert cfg.pixel_mean == (128.0,) * 3 and cfg.pixel_std == (11.578,) * 3
    assert cfg.detections_per_img == 3000 and cfg.rpn_post_nms_top_n_test == 3000
    body = model.backbone.body
    assert [len(getattr(body, f"res{i}")) for i in range(2, 6)] == [3, 24, 36, 3]
    stem = body.stem
    assert [stem.conv1_1.out_channels, stem.conv1_2.out_channels, stem.conv1_3.out_channels] == [64, 64, 128]
    assert isinstance(stem.conv1_1.norm, torch.nn.BatchNorm2d)  # freeze_at 2 makes it FrozenBN
    # res2: no deformable conv, no avd (stride 1); res3-res5: modulated deformable, 2 groups, avd first
    assert body.res2[0].conv2_offset is None and body.res2[0].avd_layer is None
    assert body.res2[0].conv1.in_channels == 128 and body.res2[0].shortcut is not None
    for i, width in zip((3, 4, 5), (128, 256, 512)):
        first = getattr(body, f"res{i}")[0]
        assert first.conv2_offset.out_channels == 54 and first.conv2_offset.groups == 2
        assert first.conv2_offset.stride == (1, 1)  # avd: the 3x3 keeps stride 1 ...
        assert first.avd_layer.stride == 2 and first.avd_layer.kernel_size == 3  # ... an avg pool strides
        assert first.shortcut_avgpool.kernel_size == 2 and first.shortcut.stride == (1, 1)
        assert first.conv2.conv.weight.shape == (2 * width, width // 2, 3, 3)  # radix 2 = 2 groups
        assert first.conv2.fc1.out_channels == max(width * 2 // 4, 32) and first.conv2.fc1.bias is not None
        assert getattr(body, f"res{i}")[1].avd_layer is None
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.fpn.modules()) == 8
    heads = model.roi_heads
    assert len(heads.box_head) == 3
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in heads.box_head[0].modules()) == 4
    assert sum(isinstance(m, torch.nn.Linear) for m in heads.box_head[0].modules()) == 1
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in heads.mask_head.modules()) == 8
    assert heads.box_predictor[0].bbox_pred.out_features == 4  # class-agnostic
    assert heads.box_predictor[0].cls_score.out_features == 2  # one class + background
    assert model.rpn.anchor_generator.strides == (4, 4, 8, 16, 32, 64)
    assert model.rpn.head.cls_logits.out_channels == 5


def _reference_split_attention(sa: resnest.SplitAttentionConv, x: torch.Tensor) -> torch.Tensor:
    """detectron2-ResNeSt's SplAtConv2d.forward written out (cardinality 1, radix 2, eval BN)."""
    def bn(m, t):
        return (t - m.running_mean[None, :, None, None]) / torch.sqrt(m.running_var[None, :, None, None] + m.eps) * m.weight[
            None, :, None, None
        ] + m.bias[None, :, None, None]

    y = F.relu(bn(sa.bn0, F.conv2d(x, sa.conv.weight, None, sa.conv.stride, 1, 1, 2)))
    a, b = y.chunk(2, dim=1)
    gap = (a + b).mean(dim=(2, 3), keepdim=True)
    gap = F.relu(bn(sa.bn1, F.conv2d(gap, sa.fc1.weight, sa.fc1.bias)))
    att = F.conv2d(gap, sa.fc2.weight, sa.fc2.bias).view(x.shape[0], 2, -1)  # (B, radix, C)
    att = att.softmax(dim=1)
    return att[:, 0, :, None, None] * a + att[:, 1, :, None, None] * b


def test_split_attention_matches_the_formula():
    torch.manual_seed(0)
    sa = resnest.SplitAttentionConv(16, 16, stride=1, radix=2, norm=torch.nn.BatchNorm2d).eval()
    with torch.no_grad():
        for bn in (sa.bn0, sa.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        x = torch.randn(2, 16, 9, 11)
        assert torch.allclose(sa(x), _reference_split_attention(sa, x), atol=1e-5)


def test_modulated_deformable_split_attention_with_zero_offsets():
    """Zero offsets and zero mask logits: every tap sampled in place with weight sigmoid(0) = 0.5."""
    torch.manual_seed(0)
    plain = resnest.SplitAttentionConv(16, 16, stride=1, radix=2, norm=torch.nn.BatchNorm2d).eval()
    deform = resnest.SplitAttentionConv(16, 16, stride=1, radix=2, norm=torch.nn.BatchNorm2d, deform_groups=2,
                                        modulated=True).eval()  # fmt: skip
    deform.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.conv.weight.mul_(0.5)
        x = torch.randn(1, 16, 8, 8)
        out = deform(x, torch.zeros(1, 54, 8, 8))
        assert torch.allclose(out, plain(x), atol=1e-5)


def test_rpn_sees_p2_twice_with_the_same_logits(tiny_blocks):
    torch.manual_seed(0)
    cfg = ModelConfig(ARCH, class_names=("cell",), min_size_test=64, max_size_test=64, rpn_pre_nms_top_n_test=50,
                      rpn_post_nms_top_n_test=20, detections_per_img=5)  # fmt: skip
    model = build_model(cfg).eval()
    seen = {}
    model.rpn.head.register_forward_hook(lambda m, args, out: seen.update(inputs=args[0], logits=out[0]))
    with torch.no_grad():
        model([torch.rand(3, 64, 64) * 255])
    shapes = [tuple(f.shape[-2:]) for f in seen["inputs"]]
    assert shapes == [(16, 16), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert seen["inputs"][0] is seen["inputs"][1]
    assert torch.equal(seen["logits"][0], seen["logits"][1])
    # two anchor levels on p2: sizes 4 and 9 at the same centres
    anchors = model.rpn.anchor_generator.cell_anchors
    assert torch.allclose((anchors[0][2, 2:] - anchors[0][2, :2]), torch.tensor([4.0, 4.0]))
    assert torch.allclose((anchors[1][2, 2:] - anchors[1][2, :2]), torch.tensor([9.0, 9.0]))


def test_freeze_at_freezes_with_frozen_batchnorm(tiny_blocks):
    body = resnest.build_resnest_body(200, freeze_at=2)
    assert isinstance(body.stem.conv1_1.norm, FrozenBatchNorm2d) and isinstance(body.res2[0].conv2.bn0, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in body.res2.parameters())
    assert isinstance(body.res3[0].conv1.norm, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in body.res3.parameters())


def test_a_single_image_trains(tiny_blocks):
    """One image per batch: the attention BN falls back to running statistics instead of failing."""
    torch.manual_seed(0)
    cfg = ModelConfig(ARCH, class_names=("cell",), min_size_train=(64,), max_size_train=64, rpn_pre_nms_top_n_train=100,
                      rpn_post_nms_top_n_train=50, roi_batch_size_per_image=16)  # fmt: skip
    model = build_model(cfg).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model([torch.rand(3, 64, 64) * 255], [target])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.res3[0].conv2.fc1.weight.grad is not None


def test_fresh_model_takes_batchnorm_statistics_from_data(tiny_blocks):
    from napari_sartorius.training.trainer import prepare_fresh_model

    torch.manual_seed(0)
    cfg = ModelConfig(ARCH, class_names=("cell",), min_size_test=64, max_size_test=64, freeze_at=0)
    model = build_model(cfg)
    image = torch.rand(3, 64, 64) * 50 + 100
    prepare_fresh_model(model, [image])
    stem_bn = model.backbone.body.stem.conv1_1.norm
    assert stem_bn.running_mean.abs().max() > 0 and not torch.allclose(stem_bn.running_var, torch.ones(64))
    assert not model.roi_heads.mask_head[0][1].running_var.eq(1).all()


def test_imagenet_weights_are_refused_for_resnest_with_the_way_out(tiny_blocks):
    from napari_sartorius.models.architectures import load_backbone_weights

    model = build_model(ModelConfig(ARCH))
    with pytest.raises(ValueError, match="import-detectron2"):
        load_backbone_weights(model, {"conv1.weight": torch.zeros(1)})


def test_checkpoint_round_trip(tmp_path, tiny_blocks):
    from napari_sartorius.models.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(ARCH, class_names=("cell",), min_size_test=64, max_size_test=64, rpn_post_nms_top_n_test=30,
                      detections_per_img=5, score_thresh_test=0.0)  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    path = save_checkpoint(tmp_path / "livecell.pt", model, cfg)
    loaded, loaded_cfg = load_checkpoint(path)
    assert loaded_cfg.rpn_in_features == cfg.rpn_in_features and loaded_cfg.arch == ARCH
    image = torch.rand(3, 64, 64) * 255
    with torch.no_grad():
        a, b = model([image])[0], loaded.eval()([image])[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
