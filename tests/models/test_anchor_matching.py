"""Chunked RPN anchor matching equals torchvision's full-matrix matching."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from napari_sartorius.models.anchor_matching import ChunkedMatchRPN, match_in_chunks
from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.config import ModelConfig


def boxes_and_anchors(seed: int, g: int = 30, a: int = 2000):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(g, 2, generator=gen) * 200
    gt = torch.cat([xy, xy + 5 + torch.rand(g, 2, generator=gen) * 40], dim=1)
    # an anchor grid plus random anchors, these twice (exact ties at a ground truth's best IoU)
    centres = torch.stack(torch.meshgrid(torch.arange(0, 240, 8.0), torch.arange(0, 240, 8.0), indexing="ij"), -1)
    centres = centres.reshape(-1, 2)
    grid = torch.cat([centres - 16, centres + 16], dim=1)
    xy = torch.rand(a, 2, generator=gen) * 220
    rand = torch.cat([xy, xy + 2 + torch.rand(a, 2, generator=gen) * 60], dim=1)
    return gt, torch.cat([grid, rand, rand])


@pytest.mark.parametrize("low_quality", [True, False])
@pytest.mark.parametrize("max_pairs", [30 * 97, 30 * 1001, 10**9])
def test_matches_equal_torchvision(low_quality, max_pairs):
    gt, anchors = boxes_and_anchors(0)
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    ref = matcher(box_iou(gt, anchors))
    got = match_in_chunks(gt, anchors, matcher, max_pairs)
    assert torch.equal(got, ref)
    assert (ref == -2).any() and (ref == -1).any() and (ref >= 0).any()
    iou = box_iou(gt, anchors)
    assert ((iou == iou.max(dim=1, keepdim=True).values).sum(dim=1) > 1).any()  # ties at a best IoU
    if low_quality:
        assert not torch.equal(ref, Matcher(0.7, 0.3, False)(iou))  # low-quality matches were added


def test_empty_ground_truth_raises_like_torchvision():
    with pytest.raises(ValueError, match="No ground-truth boxes"):
        match_in_chunks(torch.zeros(0, 4), torch.ones(5, 4), Matcher(0.7, 0.3, True))


def test_rpn_targets_equal_torchvision():
    rpn = build_model(ModelConfig("mask_rcnn_R_50_FPN")).rpn
    assert isinstance(rpn, ChunkedMatchRPN)
    rpn.match_chunk_pairs = 30 * 300
    gt0, anchors0 = boxes_and_anchors(1)
    gt1, anchors1 = boxes_and_anchors(2, g=1)
    anchors = [anchors0, anchors1, anchors1]
    targets = [{"boxes": gt0}, {"boxes": gt1}, {"boxes": torch.zeros(0, 4)}]
    got = rpn.assign_targets_to_anchors(anchors, targets)
    ref = RegionProposalNetwork.assign_targets_to_anchors(rpn, anchors, targets)
    for g_list, r_list in zip(got, ref):
        for g, r in zip(g_list, r_list):
            assert g.dtype == r.dtype and torch.equal(g, r)
