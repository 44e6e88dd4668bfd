"""Parity with detectron2 itself: the same weights and image give the same instances.

Runs only where detectron2 is importable (built from its own repository; never a dependency). For each
architecture: build detectron2's model from the model-zoo config at a small test size with seeded random
weights (made well-conditioned: FrozenBN statistics taken from the test image, head weights scaled so
scores and box deltas are spread), save its state dict as detectron2 does, import it with
:func:`load_detectron2_model` (no detectron2 code involved), run both on the same synthetic colour image
and compare: same number of instances, boxes within 1 px, mask IoU >= 0.95 per instance.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import yaml

d2 = pytest.importorskip("detectron2", exc_type=ImportError)  # absent or broken build: skip
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model as d2_build_model  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402

from napari_sartorius.models.d2_config import BUNDLED_CONFIGS  # noqa: E402
from napari_sartorius.models.detectron2_import import load_detectron2_model  # noqa: E402
from napari_sartorius.models.predictor import MaskRCNNEngine  # noqa: E402

from d2_parity_helpers import condition_  # noqa: E402

CLASSES = ("shsy5y", "astro", "cort")
H, W = 256, 320


def _write_zoo_config(tmp_path, name: str, overrides: dict) -> str:
    """Write the bundled model-zoo config ``name`` (and its base) as YAML files plus a leaf with the
    test overrides; return the leaf's path. Both detectron2 and the importer read these same files."""
    leaf = copy.deepcopy(BUNDLED_CONFIGS[name])
    base = leaf.pop("_BASE_")
    (tmp_path / "zoo").mkdir(exist_ok=True)
    base_path = tmp_path / "zoo" / base  # ../Base-*.yaml -> tmp_path/Base-*.yaml
    base_path.resolve().write_text(yaml.safe_dump(BUNDLED_CONFIGS[base.split("/")[-1]]))
    model_path = tmp_path / "zoo" / "model.yaml"
    model_path.write_text(yaml.safe_dump(dict(leaf, _BASE_=base)))
    test_path = tmp_path / "zoo" / "test.yaml"
    test_path.write_text(yaml.safe_dump(dict(overrides, _BASE_="model.yaml")))
    return str(test_path)


def _image(seed: int = 0) -> np.ndarray:
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
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-1, 1, size=3)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


CASES = [
    # (bundled config, model overrides, seed)
    # (bundled config, MODEL overrides, seed)
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {}, 1),
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml", {}, 2),
    ("COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml", {}, 3),
    ("COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x.yaml", {}, 4),
    ("COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml", {}, 5),
    ("Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml", {}, 6),
]


def _pick_threshold(scores: np.ndarray, target: int = 60, min_gap: float = 2.5e-3, least_gap: float = 5e-4) -> float:
    """A score threshold that keeps about ``target`` (at least 20) of ``scores`` and lies in a gap of
    at least ``min_gap``, more than twice the largest score difference seen between the
    implementations (1e-3 for X-152), so that no instance can cross it; where no such gap exists
    (dense scores), a gap of at least ``least_gap`` (50 times the R-50 differences, ~1e-5)."""
    s = np.sort(scores)[::-1]
    order = sorted(range(20, len(s)), key=lambda i: abs(i - target))
    for gap in (min_gap, least_gap):
        for i in order:
            if s[i - 1] - s[i] >= gap:
                return float((s[i - 1] + s[i]) / 2)
    raise AssertionError(f"no clear score gap to put the test threshold in ({len(s)} scores: {s[:3]} ... {s[-3:]})")


def run_pair(tmp_path, name: str, model_overrides: dict, seed: int, *, fmt: str = "pth"):
    """Build both models on the same weights; return detectron2's instances (pasted, and raw), the
    project model's raw output dict and the engine's :class:`Instances`.

    The score threshold is chosen from detectron2's scores on the test image (a clear gap near the
    100th instance) and written into the config both sides read. FPN cases switch the RPN's top-k
    cuts off (every anchor goes to NMS), so no proposal sits on a rank boundary; C4 cases keep a cut
    (each proposal costs a res5 pass) and rely on the spread of the objectness scores.
    """
    torch.manual_seed(seed)
    c4 = "C4" in name
    model = {
        "DEVICE": "cpu",
        "ROI_HEADS": {"NUM_CLASSES": len(CLASSES), "SCORE_THRESH_TEST": 0.05},
        # cell-sized anchors; C4 has several sizes per level, which checks the anchor order
        "ANCHOR_GENERATOR": {
            "SIZES": [[16, 32, 64, 128]] if c4 else [[16], [32], [64], [128], [256]],
            "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
        },
        "RPN": {"POST_NMS_TOPK_TEST": 150} if c4 else {"PRE_NMS_TOPK_TEST": 100000, "POST_NMS_TOPK_TEST": 100000},
    }
    overrides = {"MODEL": dict(model, **model_overrides), "INPUT": {"MIN_SIZE_TEST": 0}, "TEST": {"DETECTIONS_PER_IMAGE": 1000}}
    cfg_path = _write_zoo_config(tmp_path, name, overrides)
    cfg = get_cfg()
    cfg.merge_from_file(cfg_path)
    rgb = _image(seed)
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))).float()
    d2_inputs = [{"image": bgr, "height": H, "width": W}]
    d2_model = d2_build_model(cfg).eval()
    rpn = d2_model.proposal_generator
    with torch.no_grad():
        topk = dict(rpn.pre_nms_topk), dict(rpn.post_nms_topk)
        rpn.pre_nms_topk[False] = rpn.post_nms_topk[False] = 500  # conditioning needs no exactness
        condition_(d2_model, d2_inputs, seed)
        rpn.pre_nms_topk, rpn.post_nms_topk = topk
        # One pass at a low threshold; the result at threshold t is its subset scoring above t (NMS
        # only lets higher scores suppress lower ones, and fewer than DETECTIONS_PER_IMAGE remain).
        low = d2_model.inference(d2_inputs, do_postprocess=False)[0].to("cpu")
    thresh = _pick_threshold(low.scores.numpy())
    d2_raw = low[low.scores > thresh]
    d2_out = detector_postprocess(copy.deepcopy(d2_raw), H, W)
    overrides["MODEL"]["ROI_HEADS"]["SCORE_THRESH_TEST"] = thresh
    cfg_path = _write_zoo_config(tmp_path, name, overrides)
    state = {k: v.detach().clone() for k, v in d2_model.state_dict().items()}
    if fmt == "pth":
        weights = tmp_path / "model_final.pth"
        torch.save({"model": state, "iteration": 99}, weights)
    else:
        weights = tmp_path / "model_final.pkl"
        with open(weights, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)
    del d2_model
    model, config, report = load_detectron2_model(weights, cfg_path, CLASSES)
    assert not report.warnings, report.warnings
    assert config.score_thresh_test == thresh
    with torch.no_grad():
        raw = model([torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()])[0]
    ours = MaskRCNNEngine(model, config).predict(rgb)
    return {"d2": d2_out, "d2_raw": d2_raw, "raw": raw, "ours": ours}


def assert_same_instances(outs: dict, *, min_mask_pixels: int = 20) -> dict:
    """Same count, classes, boxes within 1 px, scores within 1.2e-3, raw M x M mask probabilities within
    1e-2, and pasted-mask IoU >= 0.95 for every instance whose detectron2 mask has at least
    ``min_mask_pixels`` pixels (a 3-pixel mask has no stable IoU). Returns the figures."""
    from scipy.optimize import linear_sum_assignment

    d2_out, d2_raw, raw, ours = outs["d2"], outs["d2_raw"], outs["raw"], outs["ours"]
    d2_boxes = d2_out.pred_boxes.tensor.numpy()
    d2_scores = d2_out.scores.numpy()
    d2_classes = d2_out.pred_classes.numpy()
    d2_masks = d2_out.pred_masks.numpy()
    assert len(d2_boxes) > 5, "the test model found too few instances to compare"
    assert len(ours) == len(d2_boxes), f"detectron2 {len(d2_boxes)} instances, project {len(ours)}"
    iou = _box_iou(d2_boxes, ours.boxes)
    iou[d2_classes[:, None] != ours.classes[None, :]] = -1
    rows, cols = linear_sum_assignment(-iou)
    assert (iou[rows, cols] > 0.9).all(), "some detectron2 instances have no counterpart of the same class"
    figures = {
        "instances": len(rows),
        "max_box_px": float(np.abs(d2_boxes[rows] - ours.boxes[cols]).max()),
        "max_score_diff": float(np.abs(d2_scores[rows] - ours.scores[cols]).max()),
    }
    # raw mask probabilities: detectron2's unpasted (N, 1, M, M) against the project model's
    d2_m = d2_raw.pred_masks[:, 0].numpy()
    rr, cc = linear_sum_assignment(-_box_iou(d2_raw.pred_boxes.tensor.numpy(), raw["boxes"].numpy()))
    figures["max_raw_mask_diff"] = float(np.abs(d2_m[rr] - raw["masks"][:, 0].numpy()[cc]).max())
    ious, tiny_diff = [], []
    for i, j in zip(rows, cols):
        a = d2_masks[i]
        b = ours.full_mask(j) >= 0.5
        if a.sum() < min_mask_pixels:
            tiny_diff.append(int(np.logical_xor(a, b).sum()))
        else:
            ious.append(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())
    figures.update(
        min_mask_iou=float(min(ious, default=1.0)),
        masks_compared=len(ious),
        tiny_masks=len(tiny_diff),
        tiny_masks_max_pixel_diff=max(tiny_diff, default=0),
    )
    assert figures["max_box_px"] <= 1.0, figures
    # float32 rounding grows with depth through random weights: R-50 ~1e-5 / 1e-4, X-152 ~1e-3 / 5e-3
    assert figures["max_score_diff"] <= 1.2e-3, figures
    assert figures["max_raw_mask_diff"] <= 1e-2, figures
    assert len(ious) >= 5, figures  # enough masks large enough for an IoU
    assert figures["tiny_masks_max_pixel_diff"] <= 2, figures
    assert figures["min_mask_iou"] >= 0.95, figures
    return figures


# Two full-size models per case (15-60 s of CPU each): slow, and skipped where detectron2 is absent.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, model_overrides, seed", CASES)
def test_same_instances_as_detectron2(tmp_path, name, model_overrides, seed):
    torch.set_num_threads(1)
    figures = assert_same_instances(run_pair(tmp_path, name, model_overrides, seed))
    print(name, figures)


def test_same_instances_from_a_model_zoo_style_pkl(tmp_path):
    torch.set_num_threads(1)
    assert_same_instances(run_pair(tmp_path, "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {}, 7, fmt="pkl"))
