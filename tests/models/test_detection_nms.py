"""NMS on a prefix of the boxes (models/detection_nms.py) equals NMS on all of them, where the RPN and
the box head use it."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.models.detection_nms import first_kept, select_detections


def random_boxes(n: int, extent: float, seed: int, categories: int = 3):
    """Boxes of 2-32 px in a square of ``extent`` px (smaller: more overlap, more suppression), distinct
    scores (a permutation), random categories."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * extent
    boxes = torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=gen) * 30], 1)
    scores = torch.randperm(n, generator=gen).float() / n
    return boxes, scores, torch.randint(0, categories, (n,), generator=gen)


@pytest.mark.parametrize("extent", [3000.0, 400.0, 120.0, 40.0])  # from no suppression to most boxes suppressed
@pytest.mark.parametrize("k", [1, 50, 300])
def test_first_kept_equals_nms_on_all_boxes(extent, k):
    boxes, scores, cats = random_boxes(4000, extent, seed=int(extent) + k)
    want = box_ops.batched_nms(boxes, scores, cats, 0.6)[:k]
    got = first_kept(boxes, scores, cats, 0.6, k)
    assert torch.equal(got, want)


def test_fewer_survivors_than_asked_gives_all_of_them():
    boxes, scores, cats = random_boxes(2000, 30.0, seed=1, categories=1)
    everything = box_ops.batched_nms(boxes, scores, cats, 0.3)
    assert len(everything) < 500
    assert torch.equal(first_kept(boxes, scores, cats, 0.3, 500), everything)


def test_tied_scores_at_the_cut_are_taken_together():
    """Boxes tied in score across the first prefix's end (2k = 240): all of them are visited, as in the
    full call; the result equals it up to which tied boxes come first (the sort's choice in both)."""
    boxes, scores, cats = random_boxes(600, 2000.0, seed=2)
    scores[:50] = torch.linspace(0.99, 0.6, 50)
    scores[50:250] = 0.5
    scores[250:] = torch.linspace(0.45, 0.01, 350)
    full = box_ops.batched_nms(boxes, scores, cats, 0.6)
    got = first_kept(boxes, scores, cats, 0.6, 120)
    assert torch.equal(scores[got], scores[full[:120]])
    assert set(got.tolist()) <= set(full.tolist())
    assert torch.equal(got[:50], full[:50])  # the distinct scores: the same boxes in the same order


def test_nothing_asked_or_nothing_given():
    boxes, scores, cats = random_boxes(10, 100.0, seed=3)
    assert first_kept(boxes, scores, cats, 0.5, 0).numel() == 0
    empty = torch.zeros(0, 4)
    assert first_kept(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5, 5).numel() == 0


def test_select_detections_thresholds_and_suppresses_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]])[:, None, :].expand(-1, 2, 4)
    scores = torch.tensor([[0.9, 0.01], [0.8, 0.7], [0.02, 0.6]])
    b, s, lab = select_detections(boxes, scores, score_thresh=0.05, nms_thresh=0.5, detections_per_img=10)
    # box 1 class 1 is suppressed by box 0; box 1 class 2 survives (other class)
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6]) and lab.tolist() == [1, 2, 2]
    b, s, lab = select_detections(boxes, scores, score_thresh=0.05, nms_thresh=0.5, detections_per_img=1)
    assert len(s) == 1


@pytest.mark.parametrize("arch", ["mask_rcnn_R_50_FPN", "mask_rcnn_R_50_C4"])
def test_box_head_detections_equal_torchvision(arch):
    """The heads' postprocess_detections (NMS on a prefix) against torchvision's (NMS on all), with a
    cap small enough for the prefix to be used."""
    heads = build_model(ModelConfig(arch, detections_per_img=30)).roi_heads.eval()
    gen = torch.Generator().manual_seed(0)
    n_cls = heads.box_predictor.cls_score.out_features
    proposals = []
    for _ in range(2):
        xy = torch.rand(400, 2, generator=gen) * 200
        proposals.append(torch.cat([xy, xy + 4 + torch.rand(400, 2, generator=gen) * 40], 1))
    logits = torch.randn(800, n_cls, generator=gen) * 2
    deltas = torch.randn(800, 4 * n_cls, generator=gen) * 0.1
    shapes = [(240, 250), (230, 260)]
    got = heads.postprocess_detections(logits, deltas, proposals, shapes)
    want = RoIHeads.postprocess_detections(heads, logits, deltas, proposals, shapes)
    for g_list, w_list in zip(got, want):
        for g, w in zip(g_list, w_list):
            assert len(g) == 30
            assert torch.equal(g, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extent", [3000.0, 120.0])
def test_first_kept_on_cuda_equals_nms_on_all_boxes(extent):
    """On CUDA a prefix of 2k boxes takes torchvision's coordinate-offset path where all the boxes take
    its per-category loop: the same boxes still."""
    boxes, scores, cats = (t.cuda() for t in random_boxes(30000, extent * 4, seed=5, categories=5))
    want = box_ops.batched_nms(boxes, scores, cats, 0.7)[:3000]
    got = first_kept(boxes, scores, cats, 0.7, 3000)
    assert torch.equal(got, want)
