"""Parity with detectron2-ResNeSt's own modelling code for LIVECell's anchor-based architecture.

Runs only where chongruo/detectron2-ResNeSt (the fork LIVECell trained with) is importable as
``detectron2`` (with fvcore and yacs); skips everywhere else. It is never a dependency: see README
("LIVECell anchor-based architecture") for the environment the figures were measured in.

The fork's C++/CUDA ops cannot be built against current torch (and its deformable convolution has no
CPU kernel at all), so this harness supplies its three ops from torchvision, outside the package:
``ModulatedDeformConv.forward`` -> ``torchvision.ops.deform_conv2d`` (offsets and mask as the fork splits
them), ``ROIAlign.forward`` -> ``torchvision.ops.roi_align``; NMS is torchvision's in the fork already.
Everything else (ResNeSt body, split attention, avd / avg-down, the grouped offset convs, FPN with
SyncBN, the RPN on p2 twice, anchors, cascade heads with BN, mask head, postprocessing) is the fork's
Python code.

The model is built from the bundled LIVECell config (``anchor_based/livecell_config.yaml``, which is
the file itself) at full depth (ResNeSt-200), on a small image with a few test overrides: no resize
(``MIN_SIZE_TEST: 0``), every anchor to NMS, a post-NMS cut and a score threshold placed in clear
gaps of the fork's own scores. Seeded random weights are conditioned (BatchNorm statistics from the
test image, head weights scaled to give spread, decisive scores), saved as the fork saves them,
imported with :func:`load_detectron2_model` (no fork code involved) and both run on the same image:
same instances, boxes within 0.05 px, mask IoU >= 0.98.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

CLASSES = ("cell",)
H, W = 96, 128


def _fork_available() -> bool:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "modeling" / "backbone" / "splat.py").is_file()


if not _fork_available():
    pytest.skip("detectron2-ResNeSt (chongruo/detectron2-ResNeSt) is not importable", allow_module_level=True)


def _install_torchvision_ops() -> None:
    """Give the fork its compiled ops from torchvision (before any fork module is imported)."""
    try:
        import detectron2._C  # noqa: F401  (a real build: its CPU ops still lack deformable convs)
    except ImportError:
        sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")
    from PIL import Image  # the fork's transforms name Pillow constants removed in Pillow 10

    for old, new in (("LINEAR", "BILINEAR"), ("CUBIC", "BICUBIC"), ("ANTIALIAS", "LANCZOS")):
        if not hasattr(Image, old):
            setattr(Image, old, getattr(Image, new))
    from torchvision.ops import deform_conv2d, roi_align

    from detectron2.layers import ROIAlign, ModulatedDeformConv

    def modulated_forward(self, x, offset, mask):
        out = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                            dilation=self.dilation, mask=mask)  # fmt: skip
        if self.norm is not None:
            out = self.norm(out)
        return self.activation(out) if self.activation is not None else out

    def roi_align_forward(self, input, rois):
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    ModulatedDeformConv.forward = modulated_forward
    ROIAlign.forward = roi_align_forward


_install_torchvision_ops()

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model as d2_build_model  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402

from napari_sartorius.models.d2_config import BUNDLED_CONFIGS  # noqa: E402
from napari_sartorius.models.detectron2_import import load_detectron2_model  # noqa: E402
from napari_sartorius.models.predictor import MaskRCNNEngine  # noqa: E402

pytestmark = pytest.mark.slow  # two ResNeSt-200 cascades: about a minute of CPU


def _image(seed: int) -> np.ndarray:
    """A uint8 (H, W, 3) RGB image of blurred blobs whose channels differ (checks the BGR handling)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.float32)
    for c in range(3):
        noise = ndimage.gaussian_filter(rng.normal(size=(H, W)), 4 + 2 * c)
        img[..., c] = noise / (np.abs(noise).max() + 1e-6)
    yy, xx = np.mgrid[:H, :W]
    for _ in range(15):
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(4, 15)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-1, 1, size=3)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def _smooth_(mod: torch.nn.Module, g: torch.Generator) -> None:
    """Spatially smooth mask-head weights (real mask heads predict smooth shapes; random 3x3 kernels
    make the 28 x 28 logits pixel noise whose binarisation is a coin toss)."""
    w = mod.weight
    if isinstance(mod, torch.nn.ConvTranspose2d):
        mix = torch.randn(w.shape[:2], generator=g) / math.sqrt(w.shape[0])
        w.copy_(mix[:, :, None, None].expand_as(w))
    else:
        blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        w.copy_(torch.randn(w.shape[:2], generator=g)[:, :, None, None] * 1.5 / math.sqrt(w.shape[1]) * blur)
    if mod.bias is not None:
        mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)


def _condition(model: torch.nn.Module, inputs, seed: int) -> None:
    """Spread, decisive outputs from random weights: heads redrawn with variance ~1 / fan_in, every
    BatchNorm's statistics taken from its input on the test image (random affine), the deformable
    offsets small but non-zero, then the class / objectness / mask logits scaled to the spreads of
    trained models."""
    g = torch.Generator().manual_seed(seed)
    heads = ("proposal_generator", "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head")
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("conv2_offset"):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.02)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
                continue
            if not name.startswith(heads) or not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                continue
            if ".mask_head." in f".{name}." and name.rsplit(".", 1)[-1] != "predictor":
                _smooth_(mod, g)
                continue
            w = mod.weight
            fan_in = w.shape[1] * math.prod(w.shape[2:])
            gain = {"anchor_deltas": 0.05, "bbox_pred": 0.05}.get(name.rsplit(".", 1)[-1], 1.5)
            w.copy_(torch.randn(w.shape, generator=g) * gain / math.sqrt(fan_in))
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        done: set[int] = set()

        def calibrate(mod, args):
            if id(mod) in done:
                return
            done.add(id(mod))
            x = args[0]
            mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            mod.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False) + 1e-3 if x[:, 0].numel() > 1 else torch.ones_like(mod.running_var))
            mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)

        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        hooks = [m.register_forward_pre_hook(calibrate) for m in bns]
        try:
            model(inputs)
        finally:
            for h in hooks:
                h.remove()
        targets = {"cls_score": 1.5, "objectness_logits": 3.0, "predictor": 6.0}

        def rescale(mod, args, out):
            if id(mod) in done:
                return
            done.add(id(mod))
            shape = (1, -1) + (1,) * (out.dim() - 2)
            pure = out - mod.bias.view(shape)
            k = mod.target_std / pure.std().clamp(min=1e-6)
            mod.weight.mul_(k)
            dims = [d for d in range(out.dim()) if d != 1]
            mod.bias.copy_(-pure.mean(dim=dims) * k if mod.center else torch.zeros_like(mod.bias))

        done.clear()
        hooks = []
        for n, m in model.named_modules():
            leaf = n.rsplit(".", 1)[-1]
            if leaf in targets and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.target_std, m.center = targets[leaf], leaf == "predictor"
                hooks.append(m.register_forward_hook(rescale))
        try:
            model(inputs)
        finally:
            for h in hooks:
                h.remove()


def _gap_cut(values: np.ndarray, target: int, lo: int, min_gap: float) -> int:
    """An index k near ``target`` (>= ``lo``) with ``values[k - 1] - values[k] >= min_gap`` (sorted
    descending): cutting there keeps no near-tie on either side."""
    for k in sorted(range(lo, len(values)), key=lambda i: abs(i - target)):
        if values[k - 1] - values[k] >= min_gap:
            return k
    raise AssertionError(f"no clear gap among {len(values)} scores")


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def _write_config(tmp_path, overrides: dict) -> str:
    (tmp_path / "anchor_based").mkdir(exist_ok=True)
    base = tmp_path / "anchor_based" / "livecell_config.yaml"
    base.write_text(yaml.safe_dump(BUNDLED_CONFIGS["anchor_based/livecell_config.yaml"]))
    leaf = tmp_path / "anchor_based" / "test.yaml"
    leaf.write_text(yaml.safe_dump(dict(overrides, _BASE_="livecell_config.yaml")))
    return str(leaf)


def run_pair(tmp_path, seed: int) -> dict:
    torch.manual_seed(seed)
    overrides = {
        "MODEL": {
            "DEVICE": "cpu",
            "ROI_HEADS": {"SCORE_THRESH_TEST": 0.05},
            "RPN": {"PRE_NMS_TOPK_TEST": 100000, "POST_NMS_TOPK_TEST": 100000},
        },
        "INPUT": {"MIN_SIZE_TEST": 0},
        "TEST": {"DETECTIONS_PER_IMAGE": 3000},
    }
    cfg = get_cfg()
    cfg.merge_from_file(_write_config(tmp_path, overrides))
    rgb = _image(seed)
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))).float()
    d2_inputs = [{"image": bgr, "height": H, "width": W}]
    d2_model = d2_build_model(cfg).eval()
    rpn = d2_model.proposal_generator
    with torch.no_grad():
        rpn.post_nms_topk[False] = 150  # conditioning needs no exactness
        _condition(d2_model, d2_inputs, seed)
        # the post-NMS cut in a clear gap of the fork's proposal scores (p2's two levels tie exactly)
        rpn.post_nms_topk[False] = 100000
        images = d2_model.preprocess_image(d2_inputs)
        proposals, _ = rpn(images, d2_model.backbone(images.tensor))
        scores = proposals[0].objectness_logits.sort(descending=True).values.numpy()
        post_k = _gap_cut(scores, 150, 50, 1e-3)
        rpn.post_nms_topk[False] = post_k
        low = d2_model.inference(d2_inputs, do_postprocess=False)[0].to("cpu")
    s = np.sort(low.scores.numpy())[::-1]
    k = _gap_cut(s, min(40, len(s) - 1), min(10, len(s) - 1), 2.5e-3)
    thresh = float((s[k - 1] + s[k]) / 2)
    d2_raw = low[low.scores > thresh]
    d2_out = detector_postprocess(copy.deepcopy(d2_raw), H, W)
    overrides["MODEL"]["ROI_HEADS"]["SCORE_THRESH_TEST"] = thresh
    overrides["MODEL"]["RPN"]["POST_NMS_TOPK_TEST"] = post_k
    cfg_path = _write_config(tmp_path, overrides)
    weights = tmp_path / "model_final.pth"
    torch.save({"model": {k: v.detach().clone() for k, v in d2_model.state_dict().items()}, "iteration": 1}, weights)
    del d2_model
    model, config, report = load_detectron2_model(weights, cfg_path, CLASSES)
    assert config.arch == "cascade_mask_rcnn_ResNeSt_200_FPN" and config.score_thresh_test == thresh
    # the fork keeps its anchors as buffers: rebuilt from the config here; nothing else is left out
    assert sorted(report.ignored) == [f"proposal_generator.anchor_generator.cell_anchors.{i}" for i in range(6)]
    assert len(report.warnings) == 1 and "cell_anchors" in report.warnings[0], report.warnings
    with torch.no_grad():
        raw = model([torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()])[0]
    ours = MaskRCNNEngine(model, config).predict(rgb)
    return {"d2": d2_out, "d2_raw": d2_raw, "raw": raw, "ours": ours, "post_k": post_k, "thresh": thresh}


def test_same_instances_as_detectron2_resnest(tmp_path):
    from scipy.optimize import linear_sum_assignment

    torch.set_num_threads(1)
    outs = run_pair(tmp_path, 11)
    d2_out, d2_raw, raw, ours = outs["d2"], outs["d2_raw"], outs["raw"], outs["ours"]
    d2_boxes = d2_out.pred_boxes.tensor.numpy()
    d2_masks = d2_out.pred_masks.numpy()
    assert len(d2_boxes) >= 10, "the test model found too few instances to compare"
    assert len(ours) == len(d2_boxes), f"fork {len(d2_boxes)} instances, project {len(ours)}"
    iou = _box_iou(d2_boxes, ours.boxes)
    rows, cols = linear_sum_assignment(-iou)
    assert (iou[rows, cols] > 0.9).all()
    figures = {
        "instances": len(rows),
        "max_box_px": float(np.abs(d2_boxes[rows] - ours.boxes[cols]).max()),
        "max_score_diff": float(np.abs(d2_out.scores.numpy()[rows] - ours.scores[cols]).max()),
    }
    rr, cc = linear_sum_assignment(-_box_iou(d2_raw.pred_boxes.tensor.numpy(), raw["boxes"].numpy()))
    figures["max_raw_mask_diff"] = float(np.abs(d2_raw.pred_masks[:, 0].numpy()[rr] - raw["masks"][:, 0].numpy()[cc]).max())
    ious = []
    for i, j in zip(rows, cols):
        a, b = d2_masks[i], ours.full_mask(j) >= 0.5
        if a.sum() >= 20:
            ious.append(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())
    figures.update(min_mask_iou=float(min(ious, default=0.0)), masks_compared=len(ious))
    print("LIVECell anchor-based parity", figures, "post-NMS cut", outs["post_k"], "threshold", outs["thresh"])
    assert figures["max_box_px"] <= 0.05, figures
    assert len(ious) >= 5, figures
    assert figures["min_mask_iou"] >= 0.98, figures
