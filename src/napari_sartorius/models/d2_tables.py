"""The data tables of :mod:`.d2_config`: detectron2's defaults for the keys the import reads, and the
bundled model-zoo configs (the six architectures' bases and configs, plus the ResNeSt cascades of
:mod:`.d2_zoo_resnest`). Data only: no logic lives here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["D2_DEFAULTS", "BUNDLED_CONFIGS"]


# Detectron2's defaults (detectron2/config/defaults.py, v0.6 and later) for every key this module
# reads. Keys not listed here are carried through from the file but never interpreted.
D2_DEFAULTS: dict[str, Any] = {
    "VERSION": 2,
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "MASK_ON": False,
        "KEYPOINT_ON": False,
        "LOAD_PROPOSALS": False,
        "PIXEL_MEAN": [103.530, 116.280, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": "", "FUSE_TYPE": "sum"},
        "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
        "ANCHOR_GENERATOR": {
            "NAME": "DefaultAnchorGenerator",
            "SIZES": [[32, 64, 128, 256, 512]],
            "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
            "ANGLES": [[-90, 0, 90]],
            "OFFSET": 0.0,
        },
        "RPN": {
            "HEAD_NAME": "StandardRPNHead",
            "IN_FEATURES": ["res4"],
            "BOUNDARY_THRESH": -1,
            "IOU_THRESHOLDS": [0.3, 0.7],
            "BATCH_SIZE_PER_IMAGE": 256,
            "POSITIVE_FRACTION": 0.5,
            "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
            "PRE_NMS_TOPK_TRAIN": 12000,
            "PRE_NMS_TOPK_TEST": 6000,
            "POST_NMS_TOPK_TRAIN": 2000,
            "POST_NMS_TOPK_TEST": 1000,
            "NMS_THRESH": 0.7,
            "CONV_DIMS": [-1],
        },
        "ROI_HEADS": {
            "NAME": "Res5ROIHeads",
            "NUM_CLASSES": 80,
            "IN_FEATURES": ["res4"],
            "IOU_THRESHOLDS": [0.5],
            "BATCH_SIZE_PER_IMAGE": 512,
            "POSITIVE_FRACTION": 0.25,
            "SCORE_THRESH_TEST": 0.05,
            "NMS_THRESH_TEST": 0.5,
        },
        "ROI_BOX_HEAD": {
            "NAME": "",
            "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "POOLER_TYPE": "ROIAlignV2",
            "NUM_FC": 0,
            "FC_DIM": 1024,
            "NUM_CONV": 0,
            "CONV_DIM": 256,
            "NORM": "",
            "CLS_AGNOSTIC_BBOX_REG": False,
            "USE_FED_LOSS": False,
            "USE_SIGMOID_CE": False,
        },
        "ROI_BOX_CASCADE_HEAD": {
            "BBOX_REG_WEIGHTS": [
                [10.0, 10.0, 5.0, 5.0],
                [20.0, 20.0, 10.0, 10.0],
                [30.0, 30.0, 15.0, 15.0],
            ],
            "IOUS": [0.5, 0.6, 0.7],
        },
        "ROI_MASK_HEAD": {
            "NAME": "MaskRCNNConvUpsampleHead",
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "NUM_CONV": 0,
            "CONV_DIM": 256,
            "NORM": "",
            "CLS_AGNOSTIC_MASK": False,
            "POOLER_TYPE": "ROIAlignV2",
        },
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res4"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            "STRIDE_IN_1X1": True,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
            "DEFORM_ON_PER_STAGE": [False, False, False, False],
            "DEFORM_MODULATED": False,
            "DEFORM_NUM_GROUPS": 1,
            # detectron2-ResNeSt's additions (chongruo/detectron2-ResNeSt config/defaults.py); RADIX > 1
            # switches DEEP_STEM, AVD and AVG_DOWN on whatever they say.
            "RADIX": 1,
            "DEEP_STEM": False,
            "AVD": False,
            "AVG_DOWN": False,
            "BOTTLENECK_WIDTH": 64,
        },
    },
    "INPUT": {
        "MIN_SIZE_TRAIN": [800],
        "MAX_SIZE_TRAIN": 1333,
        "MIN_SIZE_TEST": 800,
        "MAX_SIZE_TEST": 1333,
        "FORMAT": "BGR",
    },
    "TEST": {"DETECTIONS_PER_IMAGE": 100, "AUG": {"ENABLED": False}},
}

_BASE_RCNN_FPN = {
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "BACKBONE": {"NAME": "build_resnet_fpn_backbone"},
        "RESNETS": {"OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
        "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"]},
        "ANCHOR_GENERATOR": {"SIZES": [[32], [64], [128], [256], [512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
        "RPN": {
            "IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
            "PRE_NMS_TOPK_TRAIN": 2000,
            "PRE_NMS_TOPK_TEST": 1000,
            "POST_NMS_TOPK_TRAIN": 1000,
            "POST_NMS_TOPK_TEST": 1000,
        },
        "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"]},
        "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "POOLER_RESOLUTION": 7},
        "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 4, "POOLER_RESOLUTION": 14},
    },
    "INPUT": {"MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800]},
    "VERSION": 2,
}

_BASE_RCNN_C4 = {
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "RPN": {"PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000},
        "ROI_HEADS": {"NAME": "Res5ROIHeads"},
    },
    "INPUT": {"MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800]},
    "VERSION": 2,
}

# The model-zoo configs of the six architectures (and their bases), reduced to the model keys; the
# solver/dataset keys of the originals do not change the network. Paths as in detectron2's configs/.
BUNDLED_CONFIGS: dict[str, dict] = {
    "Base-RCNN-FPN.yaml": _BASE_RCNN_FPN,
    "Base-RCNN-C4.yaml": _BASE_RCNN_C4,
    "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml": {
        "_BASE_": "../Base-RCNN-C4.yaml",
        "MODEL": {"MASK_ON": True, "RESNETS": {"DEPTH": 50}},
    },
    "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml": {
        "_BASE_": "../Base-RCNN-C4.yaml",
        "MODEL": {"MASK_ON": True, "RESNETS": {"DEPTH": 50}},
    },
    "COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x.yaml": {
        "_BASE_": "../Base-RCNN-C4.yaml",
        "MODEL": {"MASK_ON": True, "RESNETS": {"DEPTH": 101}},
    },
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml": {
        "_BASE_": "../Base-RCNN-FPN.yaml",
        "MODEL": {"MASK_ON": True, "RESNETS": {"DEPTH": 50}},
    },
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml": {
        "_BASE_": "../Base-RCNN-FPN.yaml",
        "MODEL": {"MASK_ON": True, "RESNETS": {"DEPTH": 50}},
    },
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml": {
        "_BASE_": "../Base-RCNN-FPN.yaml",
        "MODEL": {"MASK_ON": True, "RESNETS": {"DEPTH": 101}},
    },
    "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml": {
        "_BASE_": "../Base-RCNN-FPN.yaml",
        "MODEL": {
            "MASK_ON": True,
            "PIXEL_STD": [57.375, 57.120, 58.395],
            "RESNETS": {"STRIDE_IN_1X1": False, "NUM_GROUPS": 32, "WIDTH_PER_GROUP": 8, "DEPTH": 101},
        },
    },
    "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml": {
        "_BASE_": "../Base-RCNN-FPN.yaml",
        "MODEL": {
            "MASK_ON": True,
            "RESNETS": {"DEPTH": 50},
            "ROI_HEADS": {"NAME": "CascadeROIHeads"},
            "ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True},
            "RPN": {"POST_NMS_TOPK_TRAIN": 2000},
        },
    },
    "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml": {
        "_BASE_": "../Base-RCNN-FPN.yaml",
        "MODEL": {
            "MASK_ON": True,
            "RESNETS": {"DEPTH": 50},
            "ROI_HEADS": {"NAME": "CascadeROIHeads"},
            "ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True},
            "RPN": {"POST_NMS_TOPK_TRAIN": 2000},
        },
    },
    "Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml": {
        "_BASE_": "../Base-RCNN-FPN.yaml",
        "MODEL": {
            "MASK_ON": True,
            "RESNETS": {
                "STRIDE_IN_1X1": False,
                "NUM_GROUPS": 32,
                "WIDTH_PER_GROUP": 8,
                "DEPTH": 152,
                "DEFORM_ON_PER_STAGE": [False, True, True, True],
            },
            "ROI_HEADS": {"NAME": "CascadeROIHeads"},
            "ROI_BOX_HEAD": {
                "NAME": "FastRCNNConvFCHead",
                "NUM_CONV": 4,
                "NUM_FC": 1,
                "NORM": "GN",
                "CLS_AGNOSTIC_BBOX_REG": True,
            },
            "ROI_MASK_HEAD": {"NUM_CONV": 8, "NORM": "GN"},
            "RPN": {"POST_NMS_TOPK_TRAIN": 2000},
        },
        "INPUT": {"MIN_SIZE_TRAIN": [640, 864], "MIN_SIZE_TRAIN_SAMPLING": "range", "MAX_SIZE_TRAIN": 1440},
    },
}

from .d2_zoo_resnest import RESNEST_CONFIGS  # noqa: E402 - after the six architectures' configs

BUNDLED_CONFIGS.update(RESNEST_CONFIGS)  # LIVECell's anchor-based and detectron2-ResNeSt's cascades
