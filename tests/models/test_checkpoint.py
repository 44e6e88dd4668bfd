"""The project's checkpoint: round trip, torchvision state dicts, safe loading, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from napari_sartorius.models import checkpoint as ckpt
from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.checkpoint import (
    CheckpointError,
    init_checkpoint,
    load_checkpoint,
    load_state,
    read_checkpoint,
    save_checkpoint,
)
from napari_sartorius.models.config import ModelConfig

SMALL = dict(
    min_size_test=96,
    max_size_test=160,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=60,
    detections_per_img=20,
    score_thresh_test=0.0,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small R-50-FPN model, its config and its checkpoint file."""
    torch.manual_seed(0)
    config = ModelConfig("mask_rcnn_R_50_FPN", provenance={"source": "test"}, **SMALL)
    model = build_model(config).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, config, extra={"epochs": 2, "loss": [1.5, 0.75]})
    return model, config, path


def _image():
    return torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(3)) * 255


def test_checkpoint_has_ordinary_permissions_and_no_temporary_left(saved):
    _, _, path = saved
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_round_trip_gives_identical_outputs(saved):
    model, config, path = saved
    loaded, config2 = load_checkpoint(path)
    assert config2 == config and not loaded.training
    x = _image()
    with torch.no_grad():
        a, b = model([x])[0], loaded([x])[0]
    assert len(a["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[key], b[key]), key
    state, config3, extra = read_checkpoint(path)
    assert config3 == config and extra == {"epochs": 2, "loss": [1.5, 0.75]}
    assert state.keys() == model.state_dict().keys()


def test_file_is_plain_data_and_written_atomically(saved, tmp_path):
    model, config, path = saved
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == ckpt.CHECKPOINT_FORMAT and json.loads(raw["config"])["arch"] == config.arch
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind
    target = tmp_path / "out.pt"
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(target, model, config, extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_keeps_the_old_file(saved, tmp_path, monkeypatch):
    model, config, path = saved
    target = tmp_path / "model.pt"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, model, config)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_loading_uses_weights_only(saved, monkeypatch):
    _, _, path = saved
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", spy)
    read_checkpoint(path)
    assert seen == [True]


_RAN = []


def _side_effect():
    _RAN.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load.*_side_effect"):
        load_checkpoint(path)
    assert _RAN == []


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a checkpoint: .*bad.pt is empty"),
        (b"hello world\n", "not a checkpoint: .*bad.pt is a text file starting 'hello world'"),
    ],
)
def test_corrupt_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_truncated_checkpoint(saved, tmp_path):
    _, _, path = saved
    cut = tmp_path / "cut.pt"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_checkpoint(cut)
    assert "cut.pt" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_foreign_files_get_a_clear_message(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": [1, 2, 3]}, other)
    with pytest.raises(CheckpointError, match="not a napari-sartorius checkpoint"):
        load_checkpoint(other)
    d2 = tmp_path / "model_final.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}}, d2)
    with pytest.raises(CheckpointError, match="import-detectron2"):
        load_checkpoint(d2)
    future = tmp_path / "future.pt"
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "format_version": 99}, future)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(future)


def test_wrong_architecture_and_class_count(saved):
    _, config, path = saved
    with pytest.raises(CheckpointError, match="holds a mask_rcnn_R_50_FPN model, not mask_rcnn_R_101_FPN"):
        load_checkpoint(path, arch="mask_rcnn_R_101_FPN")
    with pytest.raises(CheckpointError, match="3 classes.*2 were asked"):
        load_checkpoint(path, class_names=("a", "b"))
    _, renamed = load_checkpoint(path, class_names=("x", "y", "z"))
    assert renamed.class_names == ("x", "y", "z")


def test_load_state_strict_and_for_fine_tuning(saved):
    model, config, path = saved
    state, _, _ = read_checkpoint(path)
    five = build_model(config.replace(class_names=tuple("abcde")))
    with pytest.raises(CheckpointError, match="has 3 classes, the model 5"):
        load_state(five, state, source=path)
    report = load_state(five, state, strict=False)
    assert set(report.mismatched) == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
    }
    assert torch.equal(five.backbone.fpn.layer_blocks[0][0].weight, state["backbone.fpn.layer_blocks.0.0.weight"])
    partial = {k: v for k, v in state.items() if not k.startswith("rpn.")}
    with pytest.raises(CheckpointError, match="missing"):
        load_state(model, partial)


def test_plain_torchvision_state_dict_loads_and_matches_torchvision(tmp_path, same_detections):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=96, max_size=160, box_score_thresh=0.0
    ).eval()
    path = tmp_path / "torchvision.pth"
    torch.save(tv.state_dict(), path)  # BatchNorm2d counters included: they are ignored
    model, config = load_checkpoint(path)
    assert config.arch == "mask_rcnn_R_50_FPN" and config.class_names == ("shsy5y", "astro", "cort")
    assert config.input_format == "RGB" and config.pixel_std == pytest.approx((58.395, 57.12, 57.375))
    assert config.provenance["source"] == "torchvision state dict"

    # same settings as torchvision's own model: then the outputs agree
    config = config.replace(
        min_size_test=96, max_size_test=160, rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
        detections_per_img=100, score_thresh_test=0.0,
    )  # fmt: skip
    same = build_model(config)
    load_state(same, model.state_dict())
    same.eval()
    x = _image()
    with torch.no_grad():
        ref = tv([x / 255.0])[0]
        out = same([x])[0]
    assert len(ref["boxes"]) > 0 and abs(len(ref["boxes"]) - len(out["boxes"])) <= 2
    # random weights give near-tied scores: match the detections, never rely on their order
    pairs = same_detections(ref["boxes"], ref["scores"], out["boxes"], out["scores"], labels_a=ref["labels"],
                            labels_b=out["labels"], box_atol=0.05, score_atol=1e-4)
    assert len(pairs) >= len(ref["boxes"]) - 2

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": tv.state_dict()}, wrapped)
    with pytest.raises(CheckpointError, match="3 classes.*1 were asked"):
        load_checkpoint(wrapped, class_names=("cell",))


def test_torchvision_coco_class_names():
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    with torch.device("meta"):
        state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    config = ckpt.torchvision_config(state)
    assert config.num_classes == 90 and config.class_names[0] == "person"
    assert ckpt.torchvision_config(state, class_names=[f"c{i}" for i in range(90)]).class_names[-1] == "c89"


def test_init_checkpoint_random_and_imagenet(tmp_path):
    from torchvision.models import resnet50

    out = init_checkpoint("mask_rcnn_R_50_C4", tmp_path / "fresh.pt", class_names=("a", "b"))
    state, config, _ = read_checkpoint(out)
    assert config.arch == "mask_rcnn_R_50_C4" and config.class_names == ("a", "b")
    assert config.provenance["source"] == "init" and config.provenance["imagenet_weights"] is None
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3

    torch.manual_seed(1)
    weights = resnet50(weights=None).state_dict()
    torch.save(weights, tmp_path / "resnet50-imagenet.pth")
    out = init_checkpoint("mask_rcnn_R_50_FPN", tmp_path / "in.pt", imagenet_weights=tmp_path / "resnet50-imagenet.pth")
    state, config, _ = read_checkpoint(out)
    assert config.provenance["imagenet_weights"] == "resnet50-imagenet.pth"
    assert torch.equal(state["backbone.body.layer3.2.conv2.weight"], weights["layer3.2.conv2.weight"])
    with pytest.raises(ValueError, match="unknown architecture"):
        init_checkpoint("mask_rcnn_R_18_FPN", tmp_path / "x.pt")
    assert not os.path.exists(tmp_path / "x.pt")
