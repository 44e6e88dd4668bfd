"""MMDetection model-zoo config files bundled as text, for configs whose ``_base_`` files are not on disk.

Written from MMDetection's ``configs/`` folder (2.x: v2.28, underscore names; 3.x: v3.3, hyphenated
names), reduced to what decides the network, its input and its test-time behaviour (model, test
pipeline, the variables those refer to); the training schedules and dataset paths are trimmed. They are
read by :mod:`.mmdet_pyconfig` like any other config file. Keys are ``"<2.x|3.x>/<path under configs/>"``.
"""

from __future__ import annotations

import posixpath
import re

__all__ = ["BUNDLED_MMDET_CONFIGS", "bundled_lookup"]

_MODEL_3X = """
model = dict(
    type='MaskRCNN',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_mask=True,
        pad_size_divisor=32),
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_outs=5),
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            scales=[8],
            ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[.0, .0, .0, .0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0., 0., 0., 0.],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        mask_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead',
            num_convs=4,
            in_channels=256,
            conv_out_channels=256,
            num_classes=80,
            loss_mask=dict(
                type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=256,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(
            nms_pre=2000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=512,
                pos_fraction=0.25,
                neg_pos_ub=-1,
                add_gt_as_proposals=True),
            mask_size=28,
            pos_weight=-1,
            debug=False)),
    test_cfg=dict(
        rpn=dict(
            nms_pre=1000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.5),
            max_per_img=100,
            mask_thr_binary=0.5)))
"""

# 2.x's base differs from 3.x's by having no data_preprocessor (normalisation is in the pipeline).
_MODEL_2X = _MODEL_3X.replace(
    """    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_mask=True,
        pad_size_divisor=32),
""",
    "",
)
assert _MODEL_2X != _MODEL_3X

_CASCADE_HEAD = """
        bbox_head=[
            dict(
                type='Shared2FCBBoxHead',
                in_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0., 0., 0., 0.],
                    target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=True),
            dict(
                type='Shared2FCBBoxHead',
                in_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0., 0., 0., 0.],
                    target_stds=[0.05, 0.05, 0.1, 0.1]),
                reg_class_agnostic=True),
            dict(
                type='Shared2FCBBoxHead',
                in_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0., 0., 0., 0.],
                    target_stds=[0.033, 0.033, 0.067, 0.067]),
                reg_class_agnostic=True)
        ],"""


def _cascade(model_text: str) -> str:
    """The cascade base: the Mask R-CNN base with CascadeRCNN / CascadeRoIHead and three box heads
    (training settings trimmed: they do not change the network)."""
    text = model_text.replace("type='MaskRCNN'", "type='CascadeRCNN'")
    text = text.replace("type='StandardRoIHead',", "type='CascadeRoIHead',\n        num_stages=3,\n        stage_loss_weights=[1, 0.5, 0.25],")
    text = re.sub(r"\n        bbox_head=dict\(.*?\n            loss_bbox=dict\(type='L1Loss', loss_weight=1.0\)\),", _CASCADE_HEAD, text, flags=re.S)
    text = re.sub(r"\n    train_cfg=dict\(.*?debug=False\)\),", "", text, flags=re.S)
    return text


_COCO_INSTANCE_3X = """
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
backend_args = None
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric=['bbox', 'segm'],
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator
"""

_COCO_INSTANCE_2X = """
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1333, 800),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', **img_norm_cfg),
            dict(type='Pad', size_divisor=32),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img']),
        ])
]
data = dict(
    samples_per_gpu=2,
    workers_per_gpu=2,
    val=dict(
        type=dataset_type,
        ann_file=data_root + 'annotations/instances_val2017.json',
        img_prefix=data_root + 'val2017/',
        pipeline=test_pipeline),
    test=dict(
        type=dataset_type,
        ann_file=data_root + 'annotations/instances_val2017.json',
        img_prefix=data_root + 'val2017/',
        pipeline=test_pipeline))
evaluation = dict(metric=['bbox', 'segm'])
"""

_SCHEDULE_1X_3X = """
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
"""
_SCHEDULE_1X_2X = """
optimizer = dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001)
runner = dict(type='EpochBasedRunner', max_epochs=12)
"""
_RUNTIME_3X = "default_scope = 'mmdet'\nlog_level = 'INFO'\nload_from = None\nresume = False\n"
_RUNTIME_2X = "log_level = 'INFO'\nload_from = None\nresume_from = None\nworkflow = [('train', 1)]\n"

_CAFFE_PIPELINE_2X = """
img_norm_cfg = dict(
    mean=[103.530, 116.280, 123.675], std=[{std}], to_rgb=False)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1333, 800),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', **img_norm_cfg),
            dict(type='Pad', size_divisor=32),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img']),
        ])
]
data = dict(val=dict(pipeline=test_pipeline), test=dict(pipeline=test_pipeline))
"""

_BASES_3X = "['../_base_/models/{m}', '../_base_/datasets/coco_instance.py', '../_base_/schedules/schedule_1x.py', '../_base_/default_runtime.py']"
_BASES_2X = _BASES_3X

BUNDLED_MMDET_CONFIGS: dict[str, str] = {
    # -- MMDetection 3.x ------------------------------------------------------------------------
    "3.x/_base_/models/mask-rcnn_r50_fpn.py": _MODEL_3X,
    "3.x/_base_/models/cascade-mask-rcnn_r50_fpn.py": _cascade(_MODEL_3X),
    "3.x/_base_/datasets/coco_instance.py": _COCO_INSTANCE_3X,
    "3.x/_base_/schedules/schedule_1x.py": _SCHEDULE_1X_3X,
    "3.x/_base_/default_runtime.py": _RUNTIME_3X,
    "3.x/mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py": "_base_ = " + _BASES_3X.format(m="mask-rcnn_r50_fpn.py") + "\n",
    "3.x/mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py": """
_base_ = './mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained',
                      checkpoint='torchvision://resnet101')))
""",
    "3.x/mask_rcnn/mask-rcnn_r50-caffe_fpn_1x_coco.py": """
_base_ = './mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    # use caffe img_norm
    data_preprocessor=dict(
        mean=[103.530, 116.280, 123.675],
        std=[1.0, 1.0, 1.0],
        bgr_to_rgb=False),
    backbone=dict(
        norm_cfg=dict(requires_grad=False),
        style='caffe',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='open-mmlab://detectron2/resnet50_caffe')))
""",
    "3.x/mask_rcnn/mask-rcnn_x101-32x8d_fpn_1x_coco.py": """
_base_ = './mask-rcnn_r101_fpn_1x_coco.py'
model = dict(
    # ResNeXt-101-32x8d model trained with Caffe2 at FB,
    # so the mean and std need to be changed.
    data_preprocessor=dict(
        mean=[103.530, 116.280, 123.675],
        std=[57.375, 57.120, 58.395],
        bgr_to_rgb=False),
    backbone=dict(
        type='ResNeXt',
        depth=101,
        groups=32,
        base_width=8,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        style='pytorch',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='open-mmlab://detectron2/resnext101_32x8d')))
""",
    "3.x/mask_rcnn/mask-rcnn_x101-32x4d_fpn_1x_coco.py": """
_base_ = './mask-rcnn_r101_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        type='ResNeXt',
        depth=101,
        groups=32,
        base_width=4,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        style='pytorch',
        init_cfg=dict(
            type='Pretrained', checkpoint='open-mmlab://resnext101_32x4d')))
""",
    "3.x/cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py": "_base_ = "
    + _BASES_3X.format(m="cascade-mask-rcnn_r50_fpn.py")
    + "\n",
    # -- MMDetection 2.x ------------------------------------------------------------------------
    "2.x/_base_/models/mask_rcnn_r50_fpn.py": _MODEL_2X,
    "2.x/_base_/models/cascade_mask_rcnn_r50_fpn.py": _cascade(_MODEL_2X),
    "2.x/_base_/datasets/coco_instance.py": _COCO_INSTANCE_2X,
    "2.x/_base_/schedules/schedule_1x.py": _SCHEDULE_1X_2X,
    "2.x/_base_/default_runtime.py": _RUNTIME_2X,
    "2.x/mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py": "_base_ = " + _BASES_2X.format(m="mask_rcnn_r50_fpn.py") + "\n",
    "2.x/mask_rcnn/mask_rcnn_r101_fpn_1x_coco.py": """
_base_ = './mask_rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained',
                      checkpoint='torchvision://resnet101')))
""",
    "2.x/mask_rcnn/mask_rcnn_r50_caffe_fpn_1x_coco.py": """
_base_ = './mask_rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        norm_cfg=dict(requires_grad=False),
        style='caffe',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='open-mmlab://detectron2/resnet50_caffe')))
# use caffe img_norm
"""
    + _CAFFE_PIPELINE_2X.format(std="1.0, 1.0, 1.0"),
    "2.x/mask_rcnn/mask_rcnn_x101_32x8d_fpn_1x_coco.py": """
_base_ = './mask_rcnn_r101_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        type='ResNeXt',
        depth=101,
        groups=32,
        base_width=8,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        style='pytorch',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='open-mmlab://detectron2/resnext101_32x8d')))
"""
    + _CAFFE_PIPELINE_2X.format(std="57.375, 57.120, 58.395"),
    "2.x/cascade_rcnn/cascade_mask_rcnn_r50_fpn_1x_coco.py": "_base_ = "
    + _BASES_2X.format(m="cascade_mask_rcnn_r50_fpn.py")
    + "\n",
}


def _normalise(name: str) -> str:
    parts = [p for p in posixpath.normpath(name.replace("\\", "/")).split("/") if p not in ("..", ".", "")]
    if parts and parts[0] == "configs":
        parts = parts[1:]
    return "/".join(parts)


def bundled_lookup():
    """A ``bundled(name, chain)`` function for :func:`.mmdet_pyconfig.load_config_file`.

    A name is matched against the bundled paths by its last components (``../_base_/models/x.py`` ->
    ``_base_/models/x.py``); relative names inside a bundled file resolve against that file's folder.
    Names that exist in both MMDetection versions (``_base_/datasets/coco_instance.py``) take the
    version of the bundled files found before them in the same config (3.x when none).
    """
    state = {"family": None}

    def lookup(name: str, chain: tuple[str, ...]):
        parent = chain[-1] if chain else ""
        m = re.fullmatch(r"<bundled (2\.x|3\.x)/(.*)>", parent)
        if m and not name.startswith("_base_"):
            rel = _normalise(posixpath.join(posixpath.dirname(m.group(2)), name))
            families = [m.group(1)]
        else:
            rel = _normalise(name)
            families = [state["family"]] if state["family"] else ["3.x", "2.x"]
        if m:
            families = [m.group(1)]
        parts = rel.split("/")
        for family in families:
            for n in range(len(parts), 0, -1):
                key = f"{family}/" + "/".join(parts[-n:])
                if key in BUNDLED_MMDET_CONFIGS:
                    if state["family"] is None and not any(
                        f"{other}/" + "/".join(parts[-n:]) in BUNDLED_MMDET_CONFIGS for other in ("2.x", "3.x") if other != family
                    ):
                        state["family"] = family
                    return key, BUNDLED_MMDET_CONFIGS[key]
        return None

    return lookup
