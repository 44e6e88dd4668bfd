"""MMDetection Cascade Mask R-CNN checkpoints -> ``mmdet_cascade_mask_rcnn_*`` project models, without
MMDetection: stage-wise name mapping and conversions, config rules, refusals, and the cascade head's
test-time rules (stage logits averaged, per-stage mask probabilities averaged) against a reference
written from MMDetection's ``CascadeRoIHead``. Parity with MMDetection itself:
``test_mmdet_cascade_parity.py``.

The checkpoints are made from a project model written back under MMDetection's names and layout
(:func:`to_mmdet_cascade`), with the config text in ``meta`` as MMDetection 3.x / 2.x stores it.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.resnet import Bottleneck, ResNet

from napari_sartorius.models import backbones
from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.checkpoint import read_checkpoint
from napari_sartorius.models.mmdet_cascade import MMDetCascadeRoIHeads
from napari_sartorius.models.mmdet_config import UnsupportedMMDetConfigError, load_mmdet_config, mmdet_to_model_config
from napari_sartorius.models.mmdet_import import MMDetImportError, import_mmdet, load_mmdet_model, mmdet_to_project_name
from napari_sartorius.models.model_files import looks_like_mmdet, resolve_model_file

CLASSES = ("shsy5y", "astro", "cort")
MEANS = [[0.01, -0.02, 0.03, 0.0], [0.0, 0.01, -0.01, 0.02], [0.02, 0.0, 0.0, -0.03]]
FC = 128
STDS = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]


@pytest.fixture(autouse=True)
def tiny_bodies(monkeypatch):
    """ResNet-50 / ResNeXt-101 bodies with one block per stage (same widths and names): the heads are
    what is tested here, in seconds."""
    monkeypatch.setitem(backbones._BODIES, "R_50", lambda **kw: ResNet(Bottleneck, [1, 1, 1, 1], **kw))
    monkeypatch.setitem(
        backbones._BODIES, "X_101_32x8d", lambda **kw: ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=8, **kw)
    )
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(version: str = "3.x", classes: int = 3, means=MEANS) -> dict:
    name = "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py" if version == "3.x" else "cascade_rcnn/cascade_mask_rcnn_r50_fpn_1x_coco.py"
    cfg = load_mmdet_config(name)
    roi = cfg["model"]["roi_head"]
    for s, head in enumerate(roi["bbox_head"]):
        head["num_classes"] = classes
        head["fc_out_channels"] = FC  # small fc layers: fast to build, same code paths
        head["bbox_coder"]["target_means"] = list(means[s])
    roi["mask_head"]["num_classes"] = classes
    return cfg


def _text(cfg: dict) -> str:
    return "\n".join(f"{k} = {v!r}" for k, v in cfg.items())


_INVERSE = [
    (r"^backbone\.body\.(.+)$", r"backbone.\1"),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.(.+)$", r"neck.lateral_convs.\1.conv.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.(.+)$", r"neck.fpn_convs.\1.conv.\2"),
    (r"^rpn\.head\.conv\.0\.0\.(.+)$", r"rpn_head.rpn_conv.\1"),
    (r"^rpn\.head\.cls_logits\.(.+)$", r"rpn_head.rpn_cls.\1"),
    (r"^rpn\.head\.bbox_pred\.(.+)$", r"rpn_head.rpn_reg.\1"),
    (r"^roi_heads\.box_head\.(\d)\.fc6\.(.+)$", r"roi_head.bbox_head.\1.shared_fcs.0.\2"),
    (r"^roi_heads\.box_head\.(\d)\.fc7\.(.+)$", r"roi_head.bbox_head.\1.shared_fcs.1.\2"),
    (r"^roi_heads\.box_predictor\.(\d)\.cls_score\.(.+)$", r"roi_head.bbox_head.\1.fc_cls.\2"),
    (r"^roi_heads\.box_predictor\.(\d)\.bbox_pred\.(.+)$", r"roi_head.bbox_head.\1.fc_reg.\2"),
    (r"^roi_heads\.mask_head\.(\d)\.(\d)\.0\.(.+)$", r"roi_head.mask_head.\1.convs.\2.conv.\3"),
    (r"^roi_heads\.mask_predictor\.(\d)\.conv5_mask\.(.+)$", r"roi_head.mask_head.\1.upsample.\2"),
    (r"^roi_heads\.mask_predictor\.(\d)\.mask_fcn_logits\.(.+)$", r"roi_head.mask_head.\1.conv_logits.\2"),
]


def to_mmdet_cascade(state: dict, means=MEANS, agnostic_masks: bool = False) -> dict:
    """A project cascade state dict under MMDetection's names and layout: background last in each
    stage's classifier, each stage's ``fc_reg`` bias without its folded ``target_means / target_stds``,
    mask logits without the background channel (one channel when class-agnostic)."""
    out = {}
    for k, v in state.items():
        new = next(re.sub(p, r, k) for p, r in _INVERSE if re.match(p, k))
        if ".fc_cls." in new:
            v = torch.cat([v[1:], v[:1]])
        elif ".fc_reg.bias" in new:
            s = int(new.split(".")[2])
            v = v - torch.tensor([m / d for m, d in zip(means[s], STDS[s])])
        elif ".conv_logits." in new:
            v = v[1:2] if agnostic_masks else v[1:]
        out[new] = v.clone()
    out["backbone.bn1.num_batches_tracked"] = torch.tensor(3)
    return out


def _model(cfg: dict, seed: int = 0, agnostic_masks: bool = False):
    torch.manual_seed(seed)
    config, _ = mmdet_to_model_config(cfg, CLASSES)
    model = build_model(config).eval()
    with torch.no_grad():  # distinct values everywhere, so a misplaced tensor shows
        for name, p in model.state_dict().items():
            if p.is_floating_point():
                p.copy_(torch.randn_like(p) * 0.01)
            if name.endswith("mask_fcn_logits.weight") or name.endswith("mask_fcn_logits.bias"):
                p[0] = 0  # no background channel in MMDetection: imports make it zero
                if agnostic_masks:
                    p[1:] = p[1:2].clone()
    return model


def _save(path, state, meta):
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


def test_stage_names_map_onto_the_stage_modules():
    assert mmdet_to_project_name("roi_head.bbox_head.2.shared_fcs.1.weight") == "roi_heads.box_head.2.fc7.weight"
    assert mmdet_to_project_name("roi_head.bbox_head.0.fc_cls.bias") == "roi_heads.box_predictor.0.cls_score.bias"
    assert mmdet_to_project_name("roi_head.bbox_head.1.fc_reg.weight") == "roi_heads.box_predictor.1.bbox_pred.weight"
    assert mmdet_to_project_name("roi_head.mask_head.1.convs.3.conv.weight") == "roi_heads.mask_head.1.3.0.weight"
    assert mmdet_to_project_name("roi_head.mask_head.2.upsample.bias") == "roi_heads.mask_predictor.2.conv5_mask.bias"
    assert mmdet_to_project_name("roi_head.mask_head.0.conv_logits.weight") == "roi_heads.mask_predictor.0.mask_fcn_logits.weight"
    # Mask R-CNN names keep their mapping
    assert mmdet_to_project_name("roi_head.mask_head.convs.3.conv.weight") == "roi_heads.mask_head.3.0.weight"


@pytest.mark.parametrize("version, meta_key", [("3.x", "cfg"), ("2.x", "config")])
def test_synthetic_cascade_checkpoint_round_trips(tmp_path, version, meta_key):
    cfg = _cfg(version)
    model = _model(cfg)
    state = model.state_dict()
    classes = {"dataset_meta": {"classes": CLASSES}} if version == "3.x" else {"CLASSES": list(CLASSES)}
    w = _save(tmp_path / "epoch_12.pth", to_mmdet_cascade(state), {meta_key: _text(cfg), **classes})
    got, config, report = load_mmdet_model(w)
    assert config.arch == "mmdet_cascade_mask_rcnn_R_50_FPN" and config.provenance["mmdet_version"] == version
    assert config.class_names == CLASSES and not report.warnings
    assert [tuple(round(v, 3) for v in w) for w in config.cascade_bbox_reg_weights] == [(10, 10, 5, 5), (20, 20, 10, 10), (30.303, 30.303, 14.925, 14.925)]
    got_state = got.state_dict()
    assert set(got_state) == set(state)
    for k, v in state.items():  # stage means are folded back: float round-off only in those biases
        assert torch.allclose(got_state[k], v, atol=1e-6, rtol=0), k
    assert len(report.mapped) == len(state)


def test_each_stage_folds_its_own_means_and_keeps_four_agnostic_rows(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    mm = to_mmdet_cascade(model.state_dict())
    w = _save(tmp_path / "e.pth", mm, {"cfg": _text(cfg), "dataset_meta": {"classes": CLASSES}})
    got = load_mmdet_model(w)[0].state_dict()
    x = torch.randn(FC)
    for s in range(3):
        assert got[f"roi_heads.box_predictor.{s}.bbox_pred.weight"].shape == (4, FC)
        raw = mm[f"roi_head.bbox_head.{s}.fc_reg.weight"] @ x + mm[f"roi_head.bbox_head.{s}.fc_reg.bias"]
        mm_delta = raw * torch.tensor(STDS[s]) + torch.tensor(MEANS[s])  # MMDetection's denormalised delta
        ours = got[f"roi_heads.box_predictor.{s}.bbox_pred.weight"] @ x + got[f"roi_heads.box_predictor.{s}.bbox_pred.bias"]
        assert torch.allclose(ours * torch.tensor(STDS[s]), mm_delta, atol=1e-6)  # decoded with weights 1 / std


def test_class_agnostic_stage_masks_are_repeated_per_class(tmp_path):
    cfg = _cfg()
    cfg["model"]["roi_head"]["mask_head"]["class_agnostic"] = True
    model = _model(cfg, agnostic_masks=True)
    w = _save(tmp_path / "a.pth", to_mmdet_cascade(model.state_dict(), agnostic_masks=True), {"cfg": _text(cfg), "dataset_meta": {"classes": CLASSES}})
    got, config, _ = load_mmdet_model(w)
    assert config.provenance["mmdet_mask_class_agnostic"] == [True, True, True]
    for s in range(3):
        logits = got.state_dict()[f"roi_heads.mask_predictor.{s}.mask_fcn_logits.weight"]
        assert all(torch.equal(logits[c], logits[1]) for c in range(4))


def test_a_stage_missing_or_extra_is_listed(tmp_path):
    cfg = _cfg()
    mm = to_mmdet_cascade(_model(cfg).state_dict())
    meta = {"cfg": _text(cfg), "dataset_meta": {"classes": CLASSES}}
    missing = {k: v for k, v in mm.items() if not k.startswith("roi_head.mask_head.2.")}
    with pytest.raises(MMDetImportError, match=r"roi_heads\.mask_(head|predictor)\.2\."):
        load_mmdet_model(_save(tmp_path / "m.pth", missing, meta))
    extra = dict(mm, **{"roi_head.bbox_head.3.fc_cls.weight": torch.zeros(4, FC)})
    with pytest.raises(MMDetImportError, match=r"roi_head\.bbox_head\.3\.fc_cls"):
        load_mmdet_model(_save(tmp_path / "x.pth", extra, meta))


def test_stage_iou_thresholds_and_loss_weights_come_from_the_config():
    cfg = _cfg()
    cfg["model"]["train_cfg"] = {"rcnn": [{"assigner": {"pos_iou_thr": t}, "sampler": {"num": 256}} for t in (0.4, 0.55, 0.65)]}
    cfg["model"]["roi_head"]["stage_loss_weights"] = [1, 1, 1]
    config, facts = mmdet_to_model_config(cfg, CLASSES)
    assert config.cascade_iou_thresholds == (0.4, 0.55, 0.65) and config.roi_batch_size_per_image == 256
    assert any("stage_loss_weights" in w for w in facts["warnings"])


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda roi: roi["bbox_head"][1].update(reg_class_agnostic=False), "bbox_head[1].reg_class_agnostic"),
        (lambda roi: roi["bbox_head"].pop(), "one entry per stage (3, num_stages)"),
        (lambda roi: roi["bbox_head"][2].update(fc_out_channels=512), "fc_out_channels"),
        (lambda roi: roi["bbox_head"][0].update(type="Shared4Conv1FCBBoxHead"), "bbox_head[0].type"),
        (lambda roi: roi.update(mask_head=None), "mask_head"),
        (lambda roi: roi["mask_head"].update(num_convs=2) or roi.update(mask_head=[roi["mask_head"], dict(roi["mask_head"], num_convs=4), roi["mask_head"]]), "num_convs"),
        (lambda roi: roi["mask_roi_extractor"]["roi_layer"].update(sampling_ratio=2), "the same aligned / sampling_ratio"),
        (lambda roi: roi.update(num_stages=0), "num_stages"),
    ],
)
def test_cascade_options_the_project_cannot_rebuild_are_named(change, named):
    cfg = _cfg()
    change(cfg["model"]["roi_head"])
    with pytest.raises(UnsupportedMMDetConfigError) as info:
        mmdet_to_model_config(cfg, CLASSES)
    assert named in str(info.value)


def _mmdet_reference(heads: MMDetCascadeRoIHeads, features, proposals, image_shape):
    """MMDetection's ``CascadeRoIHead`` test path (3.x ``_refine_roi`` / ``predict_mask``), written from
    its code on the project's modules: stage k's raw class logits on stage k's boxes, refined boxes
    from stage k's class-agnostic deltas (clipped to the image), the **logits** averaged over stages
    then softmax; each stage's mask head on the final boxes, **sigmoids** averaged."""
    rois = proposals
    logits = []
    for k in range(heads.num_stages):
        x = heads.box_roi_pool(features, [rois], [image_shape])
        cls, deltas = heads.box_predictor[k](heads.box_head[k](x))
        logits.append(cls)
        rois = BoxCoder(heads.stage_box_coders[k].weights).decode(deltas, [rois]).reshape(-1, 4)
        rois = torch.stack([rois[:, 0].clamp(0, image_shape[1]), rois[:, 1].clamp(0, image_shape[0]),
                            rois[:, 2].clamp(0, image_shape[1]), rois[:, 3].clamp(0, image_shape[0])], 1)  # fmt: skip
    scores = F.softmax(sum(logits) / len(logits), dim=-1)
    return rois, scores


def test_test_time_rules_follow_mmdetection():
    model = _model(_cfg(), seed=3)
    heads = model.roi_heads
    heads.score_thresh, heads.detections_per_img = 0.0, 24
    with torch.no_grad():
        for s in range(3):  # spread, stage-specific class logits: averaging logits != averaging probabilities
            heads.box_predictor[s].cls_score.weight.normal_(0, 0.3)
            heads.box_predictor[s].bbox_pred.weight.normal_(0, 0.02)
            heads.mask_predictor[s].mask_fcn_logits.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    features = {k: torch.randn(1, 256, 64 // 2**i, 64 // 2**i, generator=g) for i, k in enumerate(["0", "1", "2", "3", "pool"])}
    xy = torch.rand(16, 2, generator=g) * 180
    proposals = torch.cat([xy, xy + 8 + torch.rand(16, 2, generator=g) * 60], 1).clamp(max=255)
    shape = (256, 256)
    with torch.no_grad():
        ref_boxes, ref_scores = _mmdet_reference(heads, features, proposals, shape)
        (out,), _ = heads(features, [proposals], [shape])
        # every output is a (box, class) candidate of the reference with its averaged-logit score
        for box, label, score in zip(out["boxes"], out["labels"], out["scores"]):
            i = int((ref_boxes - box).abs().sum(1).argmin())
            assert torch.allclose(ref_boxes[i], box, atol=1e-4)
            assert abs(float(ref_scores[i, label]) - float(score)) < 1e-5
        # averaging the probabilities instead (detectron2's rule) gives other scores
        probs = sum(F.softmax(heads.box_predictor[k](heads.box_head[k](heads.box_roi_pool(features, [proposals], [shape])))[0], -1) for k in range(3)) / 3
        assert not torch.allclose(probs, ref_scores, atol=1e-3)
        # masks: the mean of every stage's sigmoid for the detected class
        pooled = heads.mask_roi_pool(features, [out["boxes"]], [shape])
        rows = torch.arange(len(out["boxes"]))
        stages = [heads.mask_predictor[k](heads.mask_head[k](pooled))[rows, out["labels"]].sigmoid() for k in range(3)]
        assert torch.allclose(out["masks"][:, 0], sum(stages) / 3, atol=1e-6)
        assert not torch.allclose(out["masks"][:, 0], stages[2], atol=1e-3)
    assert len(out["boxes"]) == 24


def test_training_step_trains_every_stage_mask_head():
    cfg = _cfg()
    config, _ = mmdet_to_model_config(cfg, CLASSES)
    config = config.replace(min_size_train=(128,), max_size_train=256, rpn_post_nms_top_n_train=100, roi_batch_size_per_image=32)
    torch.manual_seed(0)
    model = build_model(config).train()
    image = torch.rand(3, 128, 128) * 100 + 50
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    masks[1, 60:100, 70:110] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0], [70.0, 60.0, 110.0, 100.0]]), "labels": torch.tensor([1, 3]), "masks": masks}
    losses = model([image], [target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_mask"} | {f"loss_{n}_stage{k}" for n in ("classifier", "box_reg") for k in range(3)}
    sum(losses.values()).backward()
    for s in range(3):
        assert model.roi_heads.mask_predictor[s].mask_fcn_logits.weight.grad.abs().sum() > 0, s
        assert model.roi_heads.box_predictor[s].cls_score.weight.grad.abs().sum() > 0, s


def test_import_writes_a_cascade_checkpoint_and_the_model_option_takes_the_file(tmp_path):
    cfg = _cfg(means=[[0.0] * 4] * 3)
    model = _model(cfg)
    meta = {"cfg": _text(cfg), "dataset_meta": {"classes": CLASSES}}
    w = _save(tmp_path / "epoch_12.pth", to_mmdet_cascade(model.state_dict(), means=[[0.0] * 4] * 3), meta)
    out = import_mmdet(w, tmp_path / "cascade.pt")
    state, config, extra = read_checkpoint(out)
    assert config.arch == "mmdet_cascade_mask_rcnn_R_50_FPN" and extra["imported_from"]["tensors"] == len(state)
    rebuilt = build_model(config)
    rebuilt.load_state_dict(state)
    assert isinstance(rebuilt.roi_heads, MMDetCascadeRoIHeads)
    assert looks_like_mmdet(w) and resolve_model_file(w, cache_dir=tmp_path / "cache").parent == tmp_path / "cache"


def test_resnext_cascade_config_becomes_the_x101_cascade():
    cfg = _cfg()
    cfg["model"]["backbone"] = dict(copy.deepcopy(cfg["model"]["backbone"]), type="ResNeXt", depth=101, groups=32, base_width=8)
    config, _ = mmdet_to_model_config(cfg, CLASSES)
    assert config.arch == "mmdet_cascade_mask_rcnn_X_101_32x8d_FPN"
    cfg["model"]["backbone"].update(depth=152, type="ResNet")
    with pytest.raises(UnsupportedMMDetConfigError, match="model.backbone.depth"):
        mmdet_to_model_config(cfg, CLASSES)
