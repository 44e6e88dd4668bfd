"""Shared by the MMDetection parity tests (3.x: ``test_mmdet_parity.py``, 2.x: ``test_mmdet2_parity.py``).

The test harness outside the package: :func:`install_torchvision_ops` gives MMDetection the compiled ops
that mmcv-lite (3.x) / mmcv without ops (2.x) lack, from torchvision; the rest builds the test image,
conditions random weights and compares the instances of both implementations.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import sys
import types

import numpy as np
import torch


def install_torchvision_ops() -> None:
    """Put a ``mmcv.ops`` module backed by torchvision into ``sys.modules`` (mmcv-lite has none)."""
    import mmcv
    import torchvision
    from torch import nn

    if getattr(sys.modules.get("mmcv.ops"), "_torchvision_harness", False):
        return
    mod = types.ModuleType("mmcv.ops")
    mod._torchvision_harness = True

    class RoIAlign(nn.Module):
        def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg", aligned=True, use_torchvision=False):
            super().__init__()
            assert pool_mode == "avg"
            self.output_size = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size, output_size)
            self.spatial_scale, self.sampling_ratio, self.aligned = float(spatial_scale), int(sampling_ratio), bool(aligned)

        def forward(self, x, rois):
            return torchvision.ops.roi_align(x, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def nms(boxes, scores, iou_threshold, offset=0, score_threshold=0, max_num=-1):
        assert offset == 0
        keep = torchvision.ops.nms(boxes.float(), scores.float(), float(iou_threshold))
        if max_num > 0:
            keep = keep[:max_num]
        return torch.cat([boxes[keep], scores[keep][:, None]], -1), keep

    def batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
        cfg = dict(nms_cfg)
        class_agnostic = cfg.pop("class_agnostic", class_agnostic)
        assert cfg.pop("type", "nms") == "nms"
        iou = float(cfg.pop("iou_threshold"))
        if class_agnostic:
            keep = torchvision.ops.nms(boxes, scores, iou)
        else:
            keep = torchvision.ops.batched_nms(boxes, scores, idxs, iou)
        if cfg.get("max_num", -1) > 0:
            keep = keep[: cfg["max_num"]]
        return torch.cat([boxes[keep], scores[keep][:, None]], -1), keep

    class DeformConv2dPack(nn.Module):
        """mmcv's DCN (v1) / DCNv2 (``modulated``): a 3x3 conv whose offsets (and mask) come from
        ``conv_offset``; offsets ``(dy, dx)`` per tap, then (v2) the mask logits, as torchvision's."""

        modulated = False

        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, deform_groups=1, bias=False, **_):
            super().__init__()
            k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
            self.stride, self.padding, self.dilation = stride, padding, dilation
            self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, k, k))
            self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
            per = (3 if self.modulated else 2) * k * k
            self.conv_offset = nn.Conv2d(in_channels, deform_groups * per, k, stride, padding, dilation, bias=True)
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)

        def forward(self, x):
            out = self.conv_offset(x)
            mask = None
            if self.modulated:
                o1, o2, mask = torch.chunk(out, 3, dim=1)
                out, mask = torch.cat((o1, o2), dim=1), mask.sigmoid()
            return torchvision.ops.deform_conv2d(x, out, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    class ModulatedDeformConv2dPack(DeformConv2dPack):
        modulated = True

    try:  # MMDetection 3.x builds mmcv's DCN layers from mmengine's registry
        from mmengine.registry import MODELS as MMENGINE_MODELS
    except ImportError:  # 2.x: no mmengine (deformable cases are not run there)
        MMENGINE_MODELS = None
    if MMENGINE_MODELS is not None:
        MMENGINE_MODELS.register_module("DCN", module=DeformConv2dPack, force=True)
        MMENGINE_MODELS.register_module("DCNv2", module=ModulatedDeformConv2dPack, force=True)

    def roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg", aligned=True):
        return RoIAlign(output_size, spatial_scale, sampling_ratio, pool_mode, aligned)(x, rois)

    provided = {
        "RoIAlign": RoIAlign, "roi_align": roi_align, "nms": nms, "batched_nms": batched_nms,
        "DeformConv2dPack": DeformConv2dPack, "ModulatedDeformConv2dPack": ModulatedDeformConv2dPack,
    }  # fmt: skip

    def placeholder(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in provided:
            return provided[name]
        return type(name, (nn.Module,), {"__init__": lambda self, *a, **k: nn.Module.__init__(self)})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # every mmcv.ops.<submodule> is a stub module with the same attributes
        def find_spec(self, fullname, path, target=None):
            if fullname.startswith("mmcv.ops."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            sub = types.ModuleType(spec.name)
            sub.__path__ = []
            sub.__getattr__ = placeholder
            return sub

        def exec_module(self, module):
            pass

    mod.__path__ = []
    mod.__getattr__ = placeholder
    sys.modules["mmcv.ops"] = mod
    sys.meta_path.insert(0, Finder())
    mmcv.ops = mod



def class_overrides(name: str, num_classes: int = 3, num_stages: int = 3) -> dict:
    """``merge_from_dict`` keys setting ``num_classes`` of the box and mask heads of config ``name``
    (a cascade's ``bbox_head`` is a list of stages; its one ``mask_head`` dict serves every stage)."""
    if "cascade" in name:
        out = {f"model.roi_head.bbox_head.{s}.num_classes": num_classes for s in range(num_stages)}
    else:
        out = {"model.roi_head.bbox_head.num_classes": num_classes}
    out["model.roi_head.mask_head.num_classes"] = num_classes
    return out


def image(seed: int, H: int = 256, W: int = 320) -> np.ndarray:
    """A uint8 (H, W, 3) RGB image of blurred blobs whose channels differ (checks the BGR handling)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.float32)
    for c in range(3):
        noise = ndimage.gaussian_filter(rng.normal(size=(H, W)), 6 + 3 * c)
        img[..., c] = noise / (np.abs(noise).max() + 1e-6)
    yy, xx = np.mgrid[:H, :W]
    for _ in range(25):
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(5, 30)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-1, 1, size=3)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def smooth_(mod, g) -> None:
    """Spatially smooth mask-head weights (real mask heads predict smooth shapes; random 3x3 kernels
    make 28 x 28 pixel noise whose binarisation after resampling is a coin toss)."""
    w = mod.weight
    if isinstance(mod, torch.nn.ConvTranspose2d):
        mix = torch.randn(w.shape[:2], generator=g) / math.sqrt(w.shape[0])
        w.copy_(mix[:, :, None, None].expand_as(w))
    else:
        blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        w.copy_(torch.randn(w.shape[:2], generator=g)[:, :, None, None] * 1.5 / math.sqrt(w.shape[1]) * blur)
    if mod.bias is not None:
        mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)


def condition(model, predict, seed: int) -> None:
    """Spread, decisive outputs from random weights (as the detectron2 parity test does): head layers
    redrawn with variance ~ 1 / fan_in, BatchNorm statistics taken from the test image with a random
    affine, then class / objectness / mask logits rescaled to the spreads of trained models (and
    centred where one class or mask cell would otherwise dominate). ``predict()`` runs the model once
    on the test image."""
    g = torch.Generator().manual_seed(seed)
    nn = torch.nn
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("conv_offset"):  # deformable offsets of a few pixels, mask logits of order 1
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.3 / math.sqrt(mod.weight[0].numel()))
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.5)
                continue
            if not name.startswith(("rpn_head", "roi_head")) or not isinstance(mod, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith("roi_head.mask_head") and leaf != "conv_logits":
                smooth_(mod, g)
                continue
            w = mod.weight
            fan_in = w.shape[0 if isinstance(mod, nn.ConvTranspose2d) else 1] * math.prod(w.shape[2:])
            gain = {"rpn_reg": 0.05, "fc_reg": 0.05}.get(leaf, 1.5)
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
            mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)
            mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)

        hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        try:
            predict()
        finally:
            for h in hooks:
                h.remove()
        targets = {"fc_cls": 1.5, "rpn_cls": 3.0, "conv_logits": 6.0}

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
            if leaf in targets and isinstance(m, (nn.Linear, nn.Conv2d)):
                m.target_std, m.center = targets[leaf], leaf in ("conv_logits", "fc_cls")
                hooks.append(m.register_forward_hook(rescale))
        try:
            predict()
        finally:
            for h in hooks:
                h.remove()


def pick_threshold(scores: np.ndarray, target: int = 60, min_gap: float = 2.5e-3, least_gap: float = 5e-4) -> float:
    """A score threshold keeping about ``target`` instances, inside a gap between consecutive scores."""
    s = np.sort(scores)[::-1]
    order = sorted(range(20, len(s)), key=lambda i: abs(i - target))
    for gap in (min_gap, least_gap):
        for i in order:
            if s[i - 1] - s[i] >= gap:
                return float((s[i - 1] + s[i]) / 2)
    raise AssertionError(f"no clear score gap for the test threshold ({len(s)} scores)")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def assert_same_instances(ref: dict, ours, *, min_mask_pixels: int = 20, min_side: float = 8.0) -> dict:
    from scipy.optimize import linear_sum_assignment

    boxes, scores, labels, masks = ref["bboxes"], ref["scores"], ref["labels"], ref["masks"]
    assert len(boxes) > 5, "the test model found too few instances to compare"
    assert len(ours) == len(boxes), f"MMDetection {len(boxes)} instances, project {len(ours)}"
    iou = box_iou(boxes, ours.boxes)
    iou[labels[:, None] != ours.classes[None, :]] = -1
    rows, cols = linear_sum_assignment(-iou)
    assert (iou[rows, cols] > 0.9).all(), "some MMDetection instances have no counterpart of the same class"
    # Masks of >= min_mask_pixels px in boxes >= min_side px each way: IoU >= 0.98. Smaller or thinner
    # masks: at most max(2, 5 %) differing pixels (a 7 px wide box stretches each mask cell over
    # 1/4 px, so the sub-pixel box differences of deep float32 networks move its edge pixels).
    ious, small = [], []
    for i, j in zip(rows, cols):
        a, b = masks[i], ours.full_mask(j) >= 0.5
        x0, y0, x1, y1 = boxes[i]
        iou_ij = np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)
        if a.sum() < min_mask_pixels or min(x1 - x0, y1 - y0) < min_side:
            small.append((int(np.logical_xor(a, b).sum()), int(a.sum()), float(iou_ij)))
        else:
            ious.append(iou_ij)
    figures = {
        "instances": len(rows),
        "max_box_px": float(np.abs(boxes[rows] - ours.boxes[cols]).max()),
        "max_score_diff": float(np.abs(scores[rows] - ours.scores[cols]).max()),
        "min_mask_iou": float(min(ious, default=1.0)),
        "masks_compared": len(ious),
        "small_or_thin_masks": len(small),
        "small_or_thin_max_pixel_diff": max((d for d, _, _ in small), default=0),
        "small_or_thin_min_iou": min((u for d, n, u in small if n >= min_mask_pixels), default=1.0),
    }
    assert figures["max_box_px"] <= 0.05, figures
    assert figures["max_score_diff"] <= 1e-3, figures
    assert len(ious) >= 5, figures
    assert all(d <= max(2, 0.05 * n) for d, n, _ in small), figures
    assert figures["min_mask_iou"] >= 0.98, figures
    return figures
