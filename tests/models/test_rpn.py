"""Proposals are ranked by raw objectness logits (detectron2), not by float32 sigmoid."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork

from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.models.rpn import LogitRankedRPN


def make_rpn(post_nms: int = 100) -> LogitRankedRPN:
    rpn = build_model(ModelConfig("mask_rcnn_R_50_FPN")).rpn
    assert isinstance(rpn, LogitRankedRPN)
    rpn.eval()
    rpn._pre_nms_top_n = dict(training=1000, testing=1000)
    rpn._post_nms_top_n = dict(training=post_nms, testing=post_nms)
    rpn.nms_thresh = 0.7
    return rpn


def test_confident_logits_keep_the_highest_logit():
    rpn = make_rpn()
    # two near-identical boxes (IoU ~0.9) with logits 20 and 30, both sigmoid 1.0 in float32, and a
    # third box apart; the less confident overlapping box comes first in anchor order
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [11.0, 11.0, 51.0, 51.0], [100.0, 100.0, 140.0, 140.0]]])
    logits = torch.tensor([[20.0, 30.0, 18.0]])
    assert torch.sigmoid(logits[0, 0]) == torch.sigmoid(logits[0, 1]) == 1.0  # the float32 tie
    kept, scores = rpn.filter_proposals(boxes, logits.reshape(-1, 1), [(200, 200)], [3])
    assert kept[0].shape == (2, 4)
    assert torch.equal(kept[0][0], boxes[0, 1])  # logit 30, not 20
    assert torch.equal(kept[0][1], boxes[0, 2])
    assert torch.allclose(scores[0], torch.ones(2))


def test_equals_torchvision_when_probabilities_are_distinct():
    rpn = make_rpn(post_nms=40)
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 300, 2, generator=gen) * 150
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 300, 2, generator=gen) * 40], dim=2)
    logits = torch.randn(2, 300, generator=gen) * 3  # |logit| < 16: sigmoid is strictly increasing here
    levels = [200, 100]
    got_b, got_s = rpn.filter_proposals(boxes, logits.reshape(-1, 1), [(180, 190), (160, 200)], levels)
    ref_b, ref_s = RegionProposalNetwork.filter_proposals(rpn, boxes, logits.reshape(-1, 1),
                                                          [(180, 190), (160, 200)], levels)
    for g, r, gs, rs in zip(got_b, ref_b, got_s, ref_s):
        assert len(g) == 40
        assert torch.equal(g, r)
        assert torch.allclose(gs, rs)


@pytest.mark.parametrize("thresh", [0.0, 0.5])
def test_score_threshold_reads_probabilities(thresh):
    rpn = make_rpn()
    rpn.score_thresh = thresh
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]])
    logits = torch.tensor([[2.0, -2.0]])
    kept, _ = rpn.filter_proposals(boxes, logits.reshape(-1, 1), [(100, 100)], [2])
    assert len(kept[0]) == (2 if thresh == 0.0 else 1)
