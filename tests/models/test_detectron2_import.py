"""detectron2 checkpoint import without detectron2.

A project model is exported to detectron2's naming and layout by an inverse mapping written here (from
detectron2's module names: ``backbone.bottom_up.res2.0.conv1.norm``, ``roi_heads.box_head.fc1``, class
scores with background last, class-specific boxes without a background block, ...), saved as a
detectron2 ``.pth`` / model-zoo ``.pkl``, imported, and the imported model must give exactly the
original outputs. Plus: the restricted unpickler, and clear errors for checkpoints that do not fit.
"""

from __future__ import annotations

import copy
import pickle
import re
import textwrap

import numpy as np
import pytest
import torch

from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.checkpoint import load_checkpoint, read_checkpoint
from napari_sartorius.models.d2_config import config_to_model_config, load_d2_config
from napari_sartorius.models.detectron2_import import (
    Detectron2ImportError,
    RestrictedUnpickler,
    convert_detectron2_state,
    d2_to_project_name,
    import_detectron2,
    load_detectron2_model,
    load_detectron2_state,
)

CLASSES = ("shsy5y", "astro", "cort")


# -- the inverse mapping (project -> detectron2), written from detectron2's module names ---------------
def _d2_block(rest: str) -> str:
    m = re.match(r"^(conv\d)\.(weight)$", rest) or re.match(r"^(conv2)\.offset\.(weight|bias)$", rest)
    if m and ".offset." in rest:
        return f"conv2_offset.{m.group(2)}"
    if m:
        return rest
    m = re.match(r"^bn(\d)\.(.+)$", rest)
    if m:
        return f"conv{m.group(1)}.norm.{m.group(2)}"
    m = re.match(r"^downsample\.0\.(.+)$", rest)
    if m:
        return f"shortcut.{m.group(1)}"
    m = re.match(r"^downsample\.1\.(.+)$", rest)
    if m:
        return f"shortcut.norm.{m.group(1)}"
    raise AssertionError(rest)


def project_to_d2(name: str, *, c4: bool, box_convs: int) -> str:
    body = "backbone." if c4 else "backbone.bottom_up."
    if name.startswith(("backbone.body.stem.", "backbone.body.res")):  # ResNeSt: detectron2's own names
        return body + name[len("backbone.body.") :]
    if name.startswith("backbone.body."):
        rest = name[len("backbone.body.") :]
        if rest.startswith("conv1."):
            return body + "stem.conv1.weight"
        if rest.startswith("bn1."):
            return body + "stem.conv1.norm." + rest[4:]
        m = re.match(r"^layer(\d)\.(\d+)\.(.+)$", rest)
        return f"{body}res{int(m.group(1)) + 1}.{m.group(2)}.{_d2_block(m.group(3))}"
    m = re.match(r"^roi_heads\.res5\.(\d+)\.(.+)$", name)
    if m:
        return f"roi_heads.res5.{m.group(1)}.{_d2_block(m.group(2))}"
    m = re.match(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(\d)\.(.+)$", name)
    if m:
        kind = "lateral" if m.group(1) == "inner" else "output"
        return f"backbone.fpn_{kind}{int(m.group(2)) + 2}." + ("" if m.group(3) == "0" else "norm.") + m.group(4)
    rpn = {"conv.0.0": "conv", "cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}
    m = re.match(r"^rpn\.head\.(conv\.0\.0|cls_logits|bbox_pred)\.(.+)$", name)
    if m:
        return f"proposal_generator.rpn_head.{rpn[m.group(1)]}.{m.group(2)}"
    m = re.match(r"^roi_heads\.box_head\.(?:(\d)\.)?fc([67])\.(.+)$", name)  # noqa: E501
    if m:
        return "roi_heads.box_head." + (f"{m.group(1)}." if m.group(1) else "") + f"fc{int(m.group(2)) - 5}.{m.group(3)}"
    m = re.match(r"^roi_heads\.box_head\.(?:(\d)\.)?(\d+)\.(?:(\d)\.)?(weight|bias|running_\w+|num_batches_tracked)$", name)
    if m:
        stage = f"{m.group(1)}." if m.group(1) else ""
        i = int(m.group(2))
        if i < box_convs:
            return f"roi_heads.box_head.{stage}conv{i + 1}." + ("" if m.group(3) == "0" else "norm.") + m.group(4)
        return f"roi_heads.box_head.{stage}fc{(i - box_convs - 1) // 2 + 1}.{m.group(4)}"
    if name.startswith("roi_heads.box_predictor."):
        return name
    m = re.match(r"^roi_heads\.mask_head\.(\d+)\.(\d)\.(.+)$", name)
    if m:
        return f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}." + ("" if m.group(2) == "0" else "norm.") + m.group(3)
    if name.startswith("roi_heads.mask_predictor.conv5_mask."):
        return "roi_heads.mask_head.deconv." + name.rsplit(".", 1)[1]
    if name.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return "roi_heads.mask_head.predictor." + name.rsplit(".", 1)[1]
    raise AssertionError(f"no detectron2 name for {name}")


def export_to_d2(model, config, *, agnostic_box: bool = False, agnostic_mask: bool = False) -> dict:
    """A detectron2-layout state dict of a project model: background last in cls_score, no background
    block in class-specific bbox_pred / mask predictor (or one shared block when class-agnostic)."""
    k = config.num_classes
    out = {}
    for name, value in model.state_dict().items():
        value = value.clone()
        d2_name = project_to_d2(name, c4=config.is_c4, box_convs=config.box_head_convs)
        if "box_predictor" in name and "cls_score" in name:
            value = torch.cat([value[1:], value[:1]])  # background row 0 -> last
        elif "box_predictor" in name and "bbox_pred" in name and value.shape[0] == 4 * (k + 1):
            value = value[4:8] if agnostic_box else value[4:]
        elif "mask_fcn_logits" in name:
            value = value[1:2] if agnostic_mask else value[1:]
        assert d2_name not in out
        out[d2_name] = value
    return out


# -- helpers -------------------------------------------------------------------------------------------
def _config_file(tmp_path, base: str, **extra) -> str:  # noqa: D401
    """A Kaggle-style config.yaml naming a model-zoo base that is not on disk."""
    text = textwrap.dedent(
        f"""
        _BASE_: "../{base}"
        MODEL:
          ROI_HEADS: {{NUM_CLASSES: 3, SCORE_THRESH_TEST: 0.05}}
          ANCHOR_GENERATOR: {{SIZES: {extra.get("sizes", "[[8], [16], [32], [64], [128]]")}, ASPECT_RATIOS: [[0.5, 1.0, 2.0]]}}
          RPN: {{PRE_NMS_TOPK_TEST: 300, POST_NMS_TOPK_TEST: {extra.get("post_nms", 100)}}}
          ROI_BOX_HEAD: {{CLS_AGNOSTIC_BBOX_REG: {extra.get("agnostic_box", False)}}}
          ROI_MASK_HEAD: {{CLS_AGNOSTIC_MASK: {extra.get("agnostic_mask", False)}}}
        INPUT: {{MIN_SIZE_TEST: 0}}
        TEST: {{DETECTIONS_PER_IMAGE: 50}}
        """
    )
    path = tmp_path / "output" / "config.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def _image(seed: int = 0, h: int = 64, w: int = 96) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 255, size=(3, h, w)).astype(np.float32)
    return torch.from_numpy(img)


def _outputs(model, image):
    with torch.no_grad():
        return model.eval()([image])[0]


def _assert_same(a: dict, b: dict) -> None:
    assert len(a["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[key], b[key]), key


def _random_model(cfg_path: str, seed: int):
    cfg = load_d2_config(cfg_path)
    config = config_to_model_config(cfg, CLASSES)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():  # non-trivial FrozenBN statistics, so a swapped mean/var would show
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model, config


# -- round trips ---------------------------------------------------------------------------------------
FPN_BASE = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"


@pytest.fixture(scope="module")
def fpn_model(tmp_path_factory):
    """One random R-50-FPN project model (and its config) shared by the FPN tests: building it is the
    slow part."""
    torch.set_num_threads(1)
    cfg_path = _config_file(tmp_path_factory.mktemp("fpn"), FPN_BASE)
    return _random_model(cfg_path, 0)


@pytest.mark.parametrize("kind", ["FPN", "C4"])
def test_pth_round_trip_gives_identical_outputs(tmp_path, kind, fpn_model):
    torch.set_num_threads(1)
    if kind == "FPN":
        cfg_path = _config_file(tmp_path, FPN_BASE)
        model, config = fpn_model
    else:  # several anchor sizes on one level; every proposal costs a res5 pass: few proposals
        cfg_path = _config_file(
            tmp_path, "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml", sizes="[[16, 32, 64]]", post_nms=25
        )
        model, config = _random_model(cfg_path, 0)
    weights = tmp_path / "output" / "model_final.pth"
    torch.save({"model": export_to_d2(model, config), "iteration": 1000, "optimizer": {}}, weights)

    imported, imported_config, report = load_detectron2_model(weights, cfg_path, CLASSES)
    assert imported_config == config.replace(provenance=imported_config.provenance)
    assert imported_config.input_format == "BGR" and imported_config.stride_in_1x1
    assert not report.warnings
    image = _image()
    _assert_same(_outputs(model, image), _outputs(imported, image))


@pytest.mark.slow
def test_cascade_x152_round_trip(tmp_path):
    torch.set_num_threads(1)
    cfg_path = _config_file(tmp_path, "Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml", agnostic_box=True)
    model, config = _random_model(cfg_path, 1)
    with torch.no_grad():  # non-zero offsets, so the deformable convs are exercised
        for name, p in model.named_parameters():
            if ".conv2.offset." in name:
                p.normal_(0, 1e-3)
    weights = tmp_path / "x152.pth"
    torch.save({"model": export_to_d2(model, config)}, weights)
    imported, _, _ = load_detectron2_model(weights, cfg_path, CLASSES)
    image = _image(1, 64, 96)
    _assert_same(_outputs(model, image), _outputs(imported, image))


def test_livecell_resnest_round_trip(tmp_path, monkeypatch):
    """LIVECell's anchor-based config (bundled; ResNeSt-200 cut to a few blocks): detectron2's names for
    the split-attention body, BatchNorm statistics in FPN and heads, the RPN on p2 twice."""
    from napari_sartorius.models import resnest

    monkeypatch.setitem(resnest.RESNEST_BLOCKS, 200, (1, 2, 1, 1))
    torch.set_num_threads(1)
    cfg_path = _config_file(tmp_path, "anchor_based/livecell_config.yaml", agnostic_box=True, post_nms=60,
                            sizes="[[4], [9], [17], [31], [64], [127]]")  # fmt: skip
    model, config = _random_model(cfg_path, 2)
    assert config.arch == "cascade_mask_rcnn_ResNeSt_200_FPN" and config.rpn_in_features[:2] == ("p2", "p2")
    with torch.no_grad():  # non-zero offsets and masks, so the modulated deformable convs are exercised
        for name, p in model.named_parameters():
            if ".conv2_offset." in name:
                p.normal_(0, 1e-3)
    d2_state = export_to_d2(model, config)
    assert "backbone.bottom_up.res3.0.conv2.fc1.weight" in d2_state
    assert "backbone.bottom_up.stem.conv1_2.norm.running_var" in d2_state
    assert "backbone.fpn_lateral3.norm.running_mean" in d2_state
    assert "roi_heads.box_head.1.conv4.norm.running_var" in d2_state
    assert "roi_heads.mask_head.mask_fcn8.norm.running_mean" in d2_state
    weights = tmp_path / "LIVECell_anchor_based_model.pth"
    torch.save({"model": d2_state, "iteration": 1}, weights)
    imported, imported_config, report = load_detectron2_model(weights, cfg_path, CLASSES)
    assert imported_config == config.replace(provenance=imported_config.provenance)
    assert not report.warnings
    assert not report.ignored  # BatchNorm step counters have their place too
    image = _image(2, 64, 96)
    _assert_same(_outputs(model, image), _outputs(imported, image))


def test_model_zoo_pkl_and_class_agnostic_heads(tmp_path, fpn_model):
    torch.set_num_threads(1)
    cfg_path = _config_file(tmp_path, FPN_BASE, agnostic_box=True, agnostic_mask=True)
    model, config = copy.deepcopy(fpn_model)
    with torch.no_grad():  # make the project model class-agnostic in fact: every class shares block 1
        bp = model.roi_heads.box_predictor.bbox_pred
        bp.weight.copy_(bp.weight[4:8].repeat(4, 1))
        bp.bias.copy_(bp.bias[4:8].repeat(4))
        mp = model.roi_heads.mask_predictor.mask_fcn_logits
        mp.weight.copy_(mp.weight[1:2].repeat(4, 1, 1, 1))
        mp.bias.copy_(mp.bias[1:2].repeat(4))
    d2_state = export_to_d2(model, config, agnostic_box=True, agnostic_mask=True)
    assert d2_state["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4
    weights = tmp_path / "model_final_abc123.pkl"
    with open(weights, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in d2_state.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    imported, _, _ = load_detectron2_model(weights, cfg_path, CLASSES)
    image = _image(2)
    _assert_same(_outputs(model, image), _outputs(imported, image))


def test_import_writes_a_project_checkpoint(tmp_path, fpn_model):
    torch.set_num_threads(1)
    cfg_path = _config_file(tmp_path, FPN_BASE)
    model, config = fpn_model
    weights = tmp_path / "model_final.pth"
    torch.save({"model": export_to_d2(model, config)}, weights)
    out = tmp_path / "ckpt" / "imported.pt"
    assert import_detectron2(weights, cfg_path, out, class_names=CLASSES) == out
    _, _, extra = read_checkpoint(out)
    assert extra["imported_from"]["tensors"] == len(model.state_dict())
    loaded, loaded_config = load_checkpoint(out)
    assert loaded_config.arch == "mask_rcnn_R_50_FPN"
    assert loaded_config.anchor_sizes == ((8.0,), (16.0,), (32.0,), (64.0,), (128.0,))
    assert (loaded_config.min_size_test, loaded_config.detections_per_img) == (0, 50)
    assert loaded_config.provenance["source"] == "detectron2"
    image = _image(3)
    _assert_same(_outputs(model, image), _outputs(loaded, image))


# -- names ---------------------------------------------------------------------------------------------
def test_name_mapping_examples():
    target = {"roi_heads.box_head.fc6.weight"}
    assert d2_to_project_name("backbone.bottom_up.stem.conv1.norm.running_var", target, c4=False) == (
        "backbone.body.bn1.running_var"
    )
    assert d2_to_project_name("backbone.bottom_up.res3.2.conv2.norm.weight", target, c4=False) == (
        "backbone.body.layer2.2.bn2.weight"
    )
    assert d2_to_project_name("backbone.bottom_up.res4.0.shortcut.norm.bias", target, c4=False) == (
        "backbone.body.layer3.0.downsample.1.bias"
    )
    assert d2_to_project_name("backbone.bottom_up.res5.1.conv2_offset.weight", target, c4=False) == (
        "backbone.body.layer4.1.conv2.offset.weight"
    )
    assert d2_to_project_name("backbone.fpn_lateral3.weight", target, c4=False) == "backbone.fpn.inner_blocks.1.0.weight"
    assert d2_to_project_name("backbone.fpn_output5.norm.bias", target, c4=False) == "backbone.fpn.layer_blocks.3.1.bias"
    assert d2_to_project_name("roi_heads.box_head.fc2.bias", target, c4=False) == "roi_heads.box_head.fc7.bias"
    assert d2_to_project_name("roi_heads.mask_head.mask_fcn3.norm.weight", target, c4=False) == (
        "roi_heads.mask_head.2.1.weight"
    )
    assert d2_to_project_name("backbone.res4.5.conv3.weight", set(), c4=True) == "backbone.body.layer3.5.conv3.weight"
    assert d2_to_project_name("roi_heads.res5.2.conv1.norm.bias", set(), c4=True) == "roi_heads.res5.2.bn1.bias"
    assert d2_to_project_name("backbone.res5.0.conv1.weight", set(), c4=True) is None
    conv_fc = {f"roi_heads.box_head.1.{i}.0.weight" for i in range(4)} | {"roi_heads.box_head.1.5.weight"}
    assert d2_to_project_name("roi_heads.box_head.1.conv4.norm.weight", conv_fc, c4=False) == (
        "roi_heads.box_head.1.3.1.weight"
    )
    assert d2_to_project_name("roi_heads.box_head.1.fc1.weight", conv_fc, c4=False) == "roi_heads.box_head.1.5.weight"
    assert d2_to_project_name("roi_heads.keypoint_head.conv_fcn1.weight", target, c4=False) is None


# -- errors ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fpn_target():
    cfg = load_d2_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] = 3
    config = config_to_model_config(cfg, CLASSES)
    with torch.device("meta"):
        model = build_model(config)
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    d2_state = {project_to_d2(k, c4=False, box_convs=0): v for k, v in state.items()}
    d2_state["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(12, 1024)
    d2_state["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(12)
    d2_state["roi_heads.mask_head.predictor.weight"] = torch.zeros(3, 256, 1, 1)
    d2_state["roi_heads.mask_head.predictor.bias"] = torch.zeros(3)
    return state, d2_state


def test_convert_is_complete_and_lists_ignored_buffers(fpn_target):
    target, d2_state = fpn_target
    d2_state = dict(d2_state)
    d2_state["pixel_mean"] = torch.zeros(3, 1, 1)
    d2_state["backbone.bottom_up.res2.0.conv1.norm.num_batches_tracked"] = torch.tensor(5)
    out, report = convert_detectron2_state(d2_state, target, c4=False, num_classes=3)
    assert set(out) == set(target)
    assert set(report.ignored) == {"pixel_mean", "backbone.bottom_up.res2.0.conv1.norm.num_batches_tracked"}


def test_unknown_tensor_is_an_error(fpn_target):
    target, d2_state = fpn_target
    extra = dict(d2_state, **{"roi_heads.keypoint_head.conv_fcn1.weight": torch.zeros(1)})
    with pytest.raises(Detectron2ImportError, match="keypoint_head"):
        convert_detectron2_state(extra, target, c4=False, num_classes=3)


def test_missing_tensor_is_an_error(fpn_target):
    target, d2_state = fpn_target
    fewer = {k: v for k, v in d2_state.items() if not k.startswith("roi_heads.mask_head.mask_fcn2.")}
    with pytest.raises(Detectron2ImportError, match=r"mask_head\.1\.0"):
        convert_detectron2_state(fewer, target, c4=False, num_classes=3)


def test_class_count_mismatch_is_an_error(fpn_target):
    target, d2_state = fpn_target
    with pytest.raises(Detectron2ImportError, match="class names"):
        convert_detectron2_state(d2_state, target, c4=False, num_classes=2)


def test_wrong_shape_is_an_error(fpn_target):
    target, d2_state = fpn_target
    bad = dict(d2_state, **{"backbone.fpn_lateral2.weight": torch.zeros(256, 512, 1, 1)})
    with pytest.raises(Detectron2ImportError, match="fpn_lateral2"):
        convert_detectron2_state(bad, target, c4=False, num_classes=3)


def test_missing_batchnorm_statistics_are_filled_with_a_warning(fpn_target):
    target, d2_state = fpn_target
    no_stats = {k: v for k, v in d2_state.items() if not k.endswith(("running_mean", "running_var"))}
    out, report = convert_detectron2_state(no_stats, target, c4=False, num_classes=3)
    assert torch.equal(out["backbone.body.bn1.running_var"], torch.ones(64))
    assert any("mean 0 / var 1" in w for w in report.warnings)


def test_c4_checkpoint_with_fpn_config_is_an_error(tmp_path, fpn_target):
    target, _ = fpn_target
    c4_like = {"backbone.res2.0.conv1.weight": torch.zeros(64, 64, 1, 1), "roi_heads.res5.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(Detectron2ImportError, match="no place"):
        convert_detectron2_state(c4_like, target, c4=False, num_classes=3)


# -- files -----------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pkl_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Evil(marker)}, "__author__": "x"}, f)
    with pytest.raises(Detectron2ImportError, match="refused.*system"):
        load_detectron2_state(path)
    assert not marker.exists()
    with open(path, "rb") as f, pytest.raises(pickle.UnpicklingError):
        RestrictedUnpickler(f).load()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pkl_numpy_arrays_load(tmp_path, protocol):
    path = tmp_path / "zoo.pkl"
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(2, np.float64)}
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=protocol)
    state = load_detectron2_state(path)
    assert torch.equal(state["a.weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert state["b.bias"].dtype == torch.float64


def test_caffe2_blobs_truncated_and_foreign_files(tmp_path):
    blobs = tmp_path / "R-50.pkl"
    with open(blobs, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.zeros(1)}}, f)
    with pytest.raises(Detectron2ImportError, match="Caffe2"):
        load_detectron2_state(blobs)
    good = tmp_path / "m.pth"
    torch.save({"model": {"x": torch.zeros(3)}}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(Detectron2ImportError, match="truncated"):
        load_detectron2_state(cut)
    other = tmp_path / "list.pth"
    torch.save([1, 2], other)
    with pytest.raises(Detectron2ImportError, match="not a detectron2 checkpoint"):
        load_detectron2_state(other)
    with pytest.raises(FileNotFoundError):
        load_detectron2_state(tmp_path / "nope.pth")


def test_pth_with_numpy_scalars_and_legacy_format(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"model": {"x": torch.ones(2)}, "iteration": np.int64(7)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_detectron2_state(path)["x"], torch.ones(2))
