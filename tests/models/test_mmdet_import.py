"""MMDetection checkpoints -> project checkpoints: loading, name mapping, each tensor conversion, refusals.

The checkpoints here are made without MMDetection: a project model's weights written back under
MMDetection's names and layout (:func:`to_mmdet`), with the config text in ``meta`` as MMDetection
stores it. Parity with MMDetection itself is in ``test_mmdet_parity.py``.
"""

from __future__ import annotations

import os
import re
import sys
import types

import numpy as np
import pytest
import torch

from napari_sartorius.models.anchors import cell_anchors
from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.checkpoint import read_checkpoint
from napari_sartorius.models.mmdet_config import load_mmdet_config, mmdet_to_model_config
from napari_sartorius.models.mmdet_import import (
    MMDetImportError,
    _anchor_permutation,
    convert_mmdet_state,
    import_mmdet,
    load_mmdet_checkpoint,
    load_mmdet_model,
    mmdet_to_project_name,
)
from napari_sartorius.models.model_files import looks_like_mmdet, resolve_model_file

CLASSES = ("shsy5y", "astro", "cort")


def _cfg(classes: int = 3) -> dict:
    cfg = load_mmdet_config("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py")
    cfg["model"]["roi_head"]["bbox_head"]["num_classes"] = classes
    cfg["model"]["roi_head"]["mask_head"]["num_classes"] = classes
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
    (r"^roi_heads\.box_head\.fc6\.(.+)$", r"roi_head.bbox_head.shared_fcs.0.\1"),
    (r"^roi_heads\.box_head\.fc7\.(.+)$", r"roi_head.bbox_head.shared_fcs.1.\1"),
    (r"^roi_heads\.box_predictor\.cls_score\.(.+)$", r"roi_head.bbox_head.fc_cls.\1"),
    (r"^roi_heads\.box_predictor\.bbox_pred\.(.+)$", r"roi_head.bbox_head.fc_reg.\1"),
    (r"^roi_heads\.mask_head\.(\d)\.0\.(.+)$", r"roi_head.mask_head.convs.\1.conv.\2"),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.(.+)$", r"roi_head.mask_head.upsample.\1"),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(.+)$", r"roi_head.mask_head.conv_logits.\1"),
]


def to_mmdet(state: dict) -> dict:
    """A project state dict under MMDetection's names and class layout (background last in the
    classifier, no background rows in the box regression and mask logits)."""
    out = {}
    for k, v in state.items():
        new = next(re.sub(p, r, k) for p, r in _INVERSE if re.match(p, k))
        if "fc_cls" in new:
            v = torch.cat([v[1:], v[:1]])
        elif "fc_reg" in new:
            v = v[4:]
        elif "conv_logits" in new:
            v = v[1:]
        out[new] = v.clone()
    out["backbone.bn1.num_batches_tracked"] = torch.tensor(7)
    return out


@pytest.fixture(scope="module")
def project_model():
    torch.manual_seed(0)
    config, _ = mmdet_to_model_config(_cfg(), CLASSES)
    model = build_model(config).eval()
    with torch.no_grad():  # distinct values everywhere, so a misplaced tensor shows
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.copy_(torch.randn_like(p) * 0.01)
        sd = model.state_dict()  # background rows are not MMDetection's: zero, as imports make them
        for name in ("bbox_pred.weight", "bbox_pred.bias"):
            sd[f"roi_heads.box_predictor.{name}"][:4] = 0
        for name in ("weight", "bias"):
            sd[f"roi_heads.mask_predictor.mask_fcn_logits.{name}"][0] = 0
    return model


def _save(path, state, meta=None, **extra):
    torch.save({"meta": meta or {}, "state_dict": state, **extra}, path)
    return path


def test_name_mapping():
    assert mmdet_to_project_name("backbone.layer3.5.conv2.weight") == "backbone.body.layer3.5.conv2.weight"
    assert mmdet_to_project_name("backbone.layer1.0.downsample.1.running_var") == "backbone.body.layer1.0.downsample.1.running_var"
    assert mmdet_to_project_name("neck.lateral_convs.2.conv.bias") == "backbone.fpn.inner_blocks.2.0.bias"
    assert mmdet_to_project_name("neck.fpn_convs.3.conv.weight") == "backbone.fpn.layer_blocks.3.0.weight"
    assert mmdet_to_project_name("rpn_head.rpn_reg.weight") == "rpn.head.bbox_pred.weight"
    assert mmdet_to_project_name("roi_head.bbox_head.shared_fcs.1.weight") == "roi_heads.box_head.fc7.weight"
    assert mmdet_to_project_name("roi_head.mask_head.convs.3.conv.weight") == "roi_heads.mask_head.3.0.weight"
    assert mmdet_to_project_name("roi_head.mask_head.upsample.bias") == "roi_heads.mask_predictor.conv5_mask.bias"
    assert mmdet_to_project_name("backbone.layer2.0.conv2.conv_offset.bias") == "backbone.body.layer2.0.conv2.offset.bias"
    assert mmdet_to_project_name("backbone.layer2.0.conv2.weight") == "backbone.body.layer2.0.conv2.weight"
    assert mmdet_to_project_name("roi_head.semantic_head.conv.weight") is None


def test_round_trip_3x_checkpoint_with_config_and_classes_in_meta(tmp_path, project_model):
    state = project_model.state_dict()
    meta = {"cfg": _text(_cfg()), "dataset_meta": {"classes": CLASSES, "palette": [(1, 2, 3)] * 3}}
    w = _save(tmp_path / "epoch_1.pth", to_mmdet(state), meta)
    model, config, report = load_mmdet_model(w)
    assert config.class_names == CLASSES and config.arch == "mask_rcnn_R_50_FPN"
    got = model.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    assert report.ignored == {"backbone.bn1.num_batches_tracked": "BatchNorm step counter (unused at inference)"}


def test_2x_meta_keys_and_module_prefix(tmp_path, project_model):
    state = {f"module.{k}": v for k, v in to_mmdet(project_model.state_dict()).items()}
    cfg = load_mmdet_config("mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py")
    cfg["model"]["roi_head"]["bbox_head"]["num_classes"] = cfg["model"]["roi_head"]["mask_head"]["num_classes"] = 3
    w = _save(tmp_path / "latest.pth", state, {"config": _text(cfg), "CLASSES": ["x", "y", "z"], "mmdet_version": "2.28.2"})
    _, config, _ = load_mmdet_model(w)
    assert config.class_names == ("x", "y", "z") and config.provenance["mmdet_version"] == "2.x"


def test_config_file_and_class_names_given_override_meta(tmp_path, project_model):
    w = _save(tmp_path / "m.pth", to_mmdet(project_model.state_dict()), {"cfg": "this is not python", "CLASSES": ["p", "q", "r"]})
    cfg_file = tmp_path / "my_config.py"
    cfg_file.write_text(_text(_cfg()))
    _, config, _ = load_mmdet_model(w, cfg_file, ("u", "v", "w"))
    assert config.class_names == ("u", "v", "w")


def test_classifier_moves_background_from_last_to_first():
    k, d = 3, 5
    fc_cls = torch.arange((k + 1) * d, dtype=torch.float32).view(k + 1, d)
    out = _convert_one("roi_head.bbox_head.fc_cls.weight", fc_cls, (k + 1, d), k)
    assert torch.equal(out[0], fc_cls[k]) and torch.equal(out[1:], fc_cls[:k])


def _convert_one(name, value, want_shape, k, **facts):
    base = dict(rpn_means=[0.0] * 4, rpn_stds=[1.0] * 4, bbox_means=[0.0] * 4, bbox_stds=[0.1, 0.1, 0.2, 0.2], scale_major=True, num_scales=1, num_ratios=3)
    base.update(facts)
    new = mmdet_to_project_name(name)
    out, report = convert_mmdet_state({name: value}, {new: torch.zeros(want_shape)}, base, num_classes=k)
    return out[new]


def test_box_regression_gets_a_zero_background_block_and_agnostic_is_repeated():
    k, d = 3, 4
    fc_reg = torch.randn(4 * k, d)
    out = _convert_one("roi_head.bbox_head.fc_reg.weight", fc_reg, (4 * (k + 1), d), k)
    assert torch.equal(out[:4], torch.zeros(4, d)) and torch.equal(out[4:], fc_reg)
    agnostic = torch.randn(4, d)
    out = _convert_one("roi_head.bbox_head.fc_reg.weight", agnostic, (4 * (k + 1), d), k)
    assert all(torch.equal(out[4 * c : 4 * c + 4], agnostic) for c in range(k + 1))


def test_mask_logits_get_a_zero_background_channel_and_agnostic_is_repeated():
    k = 3
    logits = torch.randn(k, 256, 1, 1)
    out = _convert_one("roi_head.mask_head.conv_logits.weight", logits, (k + 1, 256, 1, 1), k)
    assert torch.equal(out[0], torch.zeros(256, 1, 1)) and torch.equal(out[1:], logits)
    one = torch.randn(1, 256, 1, 1)
    out = _convert_one("roi_head.mask_head.conv_logits.weight", one, (k + 1, 256, 1, 1), k)
    assert all(torch.equal(out[c], one[0]) for c in range(k + 1))


def test_wrong_class_count_says_so():
    with pytest.raises(MMDetImportError, match="expected 4 .* for 3 class"):
        _convert_one("roi_head.bbox_head.fc_cls.weight", torch.randn(6, 2), (4, 2), 3)


def _decode_mm(deltas, means, stds):
    return deltas * torch.tensor(stds) + torch.tensor(means)


def test_rpn_stds_and_means_are_folded_into_rpn_reg():
    a, c = 3, 8
    means, stds = [0.1, -0.2, 0.05, 0.3], [0.5, 0.5, 2.0, 2.0]
    w, b = torch.randn(4 * a, c, 1, 1), torch.randn(4 * a)
    x = torch.randn(c)
    mm = _decode_mm((w[:, :, 0, 0] @ x + b).view(a, 4), means, stds)
    w2 = _convert_one("rpn_head.rpn_reg.weight", w, w.shape, 3, rpn_means=means, rpn_stds=stds)
    b2 = _convert_one("rpn_head.rpn_reg.bias", b, b.shape, 3, rpn_means=means, rpn_stds=stds)
    ours = (w2[:, :, 0, 0] @ x + b2).view(a, 4)  # the project decodes RPN deltas with unit weights
    assert torch.allclose(ours, mm, atol=1e-5)


def test_box_means_are_folded_into_fc_reg_bias():
    k, d = 2, 6
    means, stds = [0.01, 0.02, -0.03, 0.04], [0.1, 0.1, 0.2, 0.2]
    w, b, x = torch.randn(4 * k, d), torch.randn(4 * k), torch.randn(d)
    mm = _decode_mm((w @ x + b).view(k, 4), means, stds)
    w2 = _convert_one("roi_head.bbox_head.fc_reg.weight", w, (4 * (k + 1), d), k, bbox_means=means, bbox_stds=stds)
    b2 = _convert_one("roi_head.bbox_head.fc_reg.bias", b, (4 * (k + 1),), k, bbox_means=means, bbox_stds=stds)
    ours = (w2 @ x + b2).view(k + 1, 4)[1:] / torch.tensor([1 / s for s in stds])  # bbox_reg_weights = 1 / std
    assert torch.allclose(ours, mm, atol=1e-5)


def _mm_base_anchors(base_size: float, scales, ratios) -> torch.Tensor:
    """MMDetection's AnchorGenerator.gen_single_level_base_anchors (scale_major=True, center 0)."""
    ratios, scales = torch.tensor(ratios), torch.tensor(scales, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (base_size * w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (base_size * h_ratios[:, None] * scales[None, :]).view(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def test_anchor_order_permutation_matches_mmdetection_scale_major_anchors():
    scales, ratios = [2.0, 4.0, 8.0], [0.5, 1.0, 2.0, 3.0]
    mm = _mm_base_anchors(4.0, scales, ratios)
    ours = cell_anchors([4.0 * s for s in scales], ratios)
    perm = _anchor_permutation(len(scales), len(ratios))
    assert torch.allclose(ours, mm[perm], atol=1e-4)
    # and the RPN channels move with them
    cls = torch.arange(12.0).view(12, 1, 1, 1)
    out = _convert_one("rpn_head.rpn_cls.weight", cls, cls.shape, 3, num_scales=3, num_ratios=4)
    assert torch.equal(out.flatten(), cls.flatten()[perm])
    reg = torch.arange(48.0)
    out = _convert_one("rpn_head.rpn_reg.bias", reg, reg.shape, 3, num_scales=3, num_ratios=4)
    assert torch.equal(out.view(12, 4), reg.view(12, 4)[perm])


def test_extra_missing_and_misshapen_tensors_are_listed(tmp_path, project_model):
    state = to_mmdet(project_model.state_dict())
    meta = {"cfg": _text(_cfg()), "dataset_meta": {"classes": CLASSES}}
    extra = dict(state, **{"roi_head.semantic_head.conv.weight": torch.zeros(1)})
    with pytest.raises(MMDetImportError, match="semantic_head"):
        load_mmdet_model(_save(tmp_path / "a.pth", extra, meta))
    missing = {k: v for k, v in state.items() if not k.startswith("neck.fpn_convs.2")}
    with pytest.raises(MMDetImportError, match="layer_blocks.2"):
        load_mmdet_model(_save(tmp_path / "b.pth", missing, meta))
    bad = dict(state, **{"neck.lateral_convs.0.conv.weight": torch.zeros(256, 128, 1, 1)})
    with pytest.raises(MMDetImportError, match="wrong shape"):
        load_mmdet_model(_save(tmp_path / "c.pth", bad, meta))
    with pytest.raises(ValueError, match="pass 3 names"):
        load_mmdet_model(_save(tmp_path / "d.pth", state, meta), class_names=("one", "two"))


def test_no_config_in_meta_asks_for_one(tmp_path, project_model):
    w = _save(tmp_path / "m.pth", to_mmdet(project_model.state_dict()), {"CLASSES": list(CLASSES)})
    with pytest.raises(MMDetImportError, match="--config"):
        load_mmdet_model(w)


def test_a_whole_pickled_model_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), path)
    with pytest.raises(MMDetImportError, match=r"whole pickled model \(torch\.nn\.modules"):
        load_mmdet_checkpoint(path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_in_the_file_is_never_run(tmp_path):
    marker = str(tmp_path / "was_run")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "meta": {"x": _Evil(marker)}}, path)
    with pytest.raises(MMDetImportError, match="refused to unpickle"):
        load_mmdet_checkpoint(path)
    assert not os.path.exists(marker)


def test_mmengine_log_buffers_are_read_as_inert_data(tmp_path, monkeypatch):
    # mmengine pickles HistoryBuffer objects (numpy arrays, bound statistics methods) in message_hub
    mod = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.arange(3.0)
            self.fn = self.mean

        def mean(self):
            return float(self._log_history.mean())

    HistoryBuffer.__module__ = mod.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    path = tmp_path / "epoch_3.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {"epoch": 3}, "message_hub": {"log_scalars": {"loss": HistoryBuffer()}}}, path)
    monkeypatch.delitem(sys.modules, mod.__name__)
    state, meta = load_mmdet_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(2)) and meta == {"epoch": 3}


def test_import_writes_a_project_checkpoint(tmp_path, project_model):
    meta = {"cfg": _text(_cfg()), "dataset_meta": {"classes": CLASSES}}
    w = _save(tmp_path / "epoch_12.pth", to_mmdet(project_model.state_dict()), meta)
    out = import_mmdet(w, tmp_path / "imported.pt")
    state, config, extra = read_checkpoint(out)
    assert config.class_names == CLASSES and extra["imported_from"]["mmdet_config"] == "checkpoint meta"
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"], project_model.state_dict()["roi_heads.box_predictor.cls_score.weight"])


def test_resolve_model_file_imports_once_into_the_cache(tmp_path, project_model):
    meta = {"cfg": _text(_cfg()), "dataset_meta": {"classes": CLASSES}}
    w = _save(tmp_path / "epoch_12.pth", to_mmdet(project_model.state_dict()), meta)
    assert looks_like_mmdet(w)
    cache = tmp_path / "cache"
    first = resolve_model_file(w, cache_dir=cache)
    assert first.parent == cache and first.name.startswith("mmdet-epoch_12-")
    stamp = first.stat().st_mtime_ns
    assert resolve_model_file(w, cache_dir=cache) == first and first.stat().st_mtime_ns == stamp
    assert resolve_model_file(first, cache_dir=cache) == first  # a project checkpoint passes through
    assert not looks_like_mmdet(first)


def test_resolve_model_file_without_config_says_what_to_do(tmp_path, project_model):
    w = _save(tmp_path / "bare.pth", to_mmdet(project_model.state_dict()))
    with pytest.raises(MMDetImportError, match="--config"):
        resolve_model_file(w, cache_dir=tmp_path / "cache")


def test_cli_import_mmdet(tmp_path, project_model, capsys):
    from napari_sartorius.cli import main

    w = _save(tmp_path / "m.pth", to_mmdet(project_model.state_dict()), {})
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(_text(_cfg()))
    out = tmp_path / "out.pt"
    assert main(["import-mmdet", str(w), "--config", str(cfg_file), "--out", str(out), "--classes", "a,b,c"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert read_checkpoint(out)[1].class_names == ("a", "b", "c")
    assert main(["import-mmdet", str(w), "--out", str(tmp_path / "x.pt")]) != 0
    assert "--config" in capsys.readouterr().err


def test_the_project_loader_points_mmdetection_files_to_the_import(tmp_path, project_model):
    from napari_sartorius.models.checkpoint import CheckpointError

    w = _save(tmp_path / "epoch_1.pth", to_mmdet(project_model.state_dict()), {"epoch": 1})
    with pytest.raises(CheckpointError, match="import-mmdet"):
        read_checkpoint(w)
