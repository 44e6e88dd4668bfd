"""Bundled detectron2 configs of the ResNeSt cascades (merged into ``d2_config.BUNDLED_CONFIGS``).

* LIVECell's anchor-based models (sartorius-research/LIVECell, ``model/anchor_based/*.yaml``, MIT
  licence): the nine files (the model trained on all of LIVECell and the eight per-cell-line models)
  are byte-identical, so they share one dict here. Bundled names: ``anchor_based/livecell_config.yaml``
  and ``anchor_based/{a172,bt474,bv2,huh7,mcf7,shsy5y,skbr3,skov3}_config.yaml`` (a path ending so,
  e.g. ``model/anchor_based/shsy5y_config.yaml``, resolves to them when no such file exists).
* chongruo/detectron2-ResNeSt's ``configs/COCO-InstanceSegmentation/mask_cascade_rcnn_ResNeSt_*.yaml``
  (Apache-2.0), on detectron2's ``Base-RCNN-FPN.yaml`` (bundled in :mod:`.d2_config`).

As the other bundled configs, they keep the keys that define the network, its inputs and its test-time
behaviour; solver, dataset, dataloader and output keys are left out (they do not change the network).
Values are as in the files, including LIVECell's quirks: the RPN on ``p2`` twice, SyncBN everywhere,
``FREEZE_AT: 0``, grey-level normalisation 128 / 11.578, no ``MIN_SIZE_TEST`` (detectron2's 800 applies).
"""

from __future__ import annotations

__all__ = ["LIVECELL_ANCHOR_BASED", "LIVECELL_CELL_LINES", "RESNEST_CONFIGS"]

#: model/anchor_based/livecell_config.yaml (identical to the per-cell-line files).
LIVECELL_ANCHOR_BASED: dict = {
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "BACKBONE": {"NAME": "build_resnet_fpn_backbone", "FREEZE_AT": 0},
        "MASK_ON": True,
        "RESNETS": {
            "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
            "DEPTH": 200,
            "STRIDE_IN_1X1": False,
            "RADIX": 2,
            "DEFORM_ON_PER_STAGE": [False, True, True, True],
            "DEFORM_MODULATED": True,
            "DEFORM_NUM_GROUPS": 2,
            "NORM": "SyncBN",
        },
        "FPN": {"NORM": "SyncBN", "IN_FEATURES": ["res2", "res3", "res4", "res5"]},
        "ANCHOR_GENERATOR": {"SIZES": [[4], [9], [17], [31], [64], [127]], "ASPECT_RATIOS": [[0.25, 0.5, 1.0, 2.0, 4.0]]},
        "ROI_HEADS": {
            "NUM_CLASSES": 1,
            "BATCH_SIZE_PER_IMAGE": 512,
            "NAME": "CascadeROIHeads",
            "IN_FEATURES": ["p2", "p3", "p4", "p5"],
        },
        "ROI_BOX_HEAD": {
            "NAME": "FastRCNNConvFCHead",
            "NUM_CONV": 4,
            "NUM_FC": 1,
            "NORM": "SyncBN",
            "POOLER_RESOLUTION": 7,
            "CLS_AGNOSTIC_BBOX_REG": True,
        },
        "ROI_MASK_HEAD": {"NUM_CONV": 8, "NORM": "SyncBN"},
        "RPN": {
            "IN_FEATURES": ["p2", "p2", "p3", "p4", "p5", "p6"],
            "BATCH_SIZE_PER_IMAGE": 256,
            "POST_NMS_TOPK_TEST": 3000,
            "POST_NMS_TOPK_TRAIN": 3000,
            "PRE_NMS_TOPK_TEST": 6000,
            "PRE_NMS_TOPK_TRAIN": 12000,
        },
        "RETINANET": {"NUM_CLASSES": 1, "TOPK_CANDIDATES_TEST": 3000},
        "PIXEL_MEAN": [128, 128, 128],
        "PIXEL_STD": [11.578, 11.578, 11.578],
    },
    "INPUT": {"MIN_SIZE_TRAIN": [440, 480, 520, 560, 580, 620], "CROP": {"ENABLED": False}, "FORMAT": "BGR"},
    "TEST": {"DETECTIONS_PER_IMAGE": 3000, "PRECISE_BN": {"ENABLED": False}, "AUG": {"ENABLED": False}},
    "VERSION": 2,
}

#: The cell lines of LIVECell's per-cell-line anchor-based models (``<line>_config.yaml``).
LIVECELL_CELL_LINES = ("a172", "bt474", "bv2", "huh7", "mcf7", "shsy5y", "skbr3", "skov3")


def _fork(depth: int, *, dcn: bool = False, mask_convs: int = 4, range_scale: bool = False) -> dict:
    resnets = {"DEPTH": depth, "STRIDE_IN_1X1": False, "RADIX": 2, "NORM": "SyncBN"}
    if dcn:
        resnets.update(DEFORM_ON_PER_STAGE=[False, True, True, True], DEFORM_MODULATED=True, DEFORM_NUM_GROUPS=2)
    mask = {"NORM": "SyncBN"}
    if mask_convs != 4:
        mask["NUM_CONV"] = mask_convs
    out = {
        "_BASE_": "../Base-RCNN-FPN.yaml",
        "MODEL": {
            "MASK_ON": True,
            "RESNETS": resnets,
            "FPN": {"NORM": "SyncBN"},
            "ROI_HEADS": {"NAME": "CascadeROIHeads"},
            "ROI_BOX_HEAD": {
                "NAME": "FastRCNNConvFCHead",
                "NUM_CONV": 4,
                "NUM_FC": 1,
                "NORM": "SyncBN",
                "CLS_AGNOSTIC_BBOX_REG": True,
            },
            "ROI_MASK_HEAD": mask,
            "RPN": {"POST_NMS_TOPK_TRAIN": 2000},
            "PIXEL_MEAN": [123.68, 116.779, 103.939],
            "PIXEL_STD": [58.393, 57.12, 57.375],
        },
        "INPUT": {"FORMAT": "RGB"},
        "TEST": {"PRECISE_BN": {"ENABLED": True}},
    }
    if range_scale:
        out["INPUT"].update(MIN_SIZE_TRAIN=[640, 864], MIN_SIZE_TRAIN_SAMPLING="range", MAX_SIZE_TRAIN=1440, CROP={"ENABLED": True})
    return out


_COCO = "COCO-InstanceSegmentation/"
RESNEST_CONFIGS: dict[str, dict] = {
    "anchor_based/livecell_config.yaml": LIVECELL_ANCHOR_BASED,
    **{f"anchor_based/{line}_config.yaml": LIVECELL_ANCHOR_BASED for line in LIVECELL_CELL_LINES},
    _COCO + "mask_cascade_rcnn_ResNeSt_50_FPN_syncBN_1x.yaml": _fork(50),
    _COCO + "mask_cascade_rcnn_ResNeSt_101_FPN_syncBN_1x.yaml": _fork(101),
    _COCO + "mask_cascade_rcnn_ResNeSt_200_FPN_syncBN_all_tricks_3x.yaml": _fork(200, mask_convs=8, range_scale=True),
    _COCO + "mask_cascade_rcnn_ResNeSt_200_FPN_dcn_syncBN_all_tricks_3x.yaml": _fork(
        200, dcn=True, mask_convs=8, range_scale=True
    ),
}
