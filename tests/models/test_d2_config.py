"""detectron2 config reading without detectron2: _BASE_ chains, defaults, unsupported options."""

from __future__ import annotations

import textwrap

import pytest

from napari_sartorius.models.d2_config import (
    BUNDLED_CONFIGS,
    D2_DEFAULTS,
    UnsupportedConfigError,
    check_supported,
    config_to_model_config,
    d2_architecture,
    load_d2_config,
    merge_d2_configs,
)


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_bundled_model_zoo_name_resolves_its_base():
    cfg = load_d2_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert cfg["MODEL"]["BACKBONE"]["NAME"] == "build_resnet_fpn_backbone"
    assert cfg["MODEL"]["ANCHOR_GENERATOR"]["SIZES"] == [[32], [64], [128], [256], [512]]
    assert cfg["MODEL"]["ROI_HEADS"]["NAME"] == "StandardROIHeads"
    assert cfg["MODEL"]["MASK_ON"] is True
    # defaults merged for keys neither file sets
    assert cfg["MODEL"]["PIXEL_MEAN"] == [103.530, 116.280, 123.675]
    assert cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 80
    assert cfg["TEST"]["DETECTIONS_PER_IMAGE"] == 100


def test_user_config_with_model_zoo_relative_base_not_on_disk(tmp_path):
    # A Kaggle-style config next to its weights, naming a model-zoo base that is not on disk.
    cfg_path = _write(
        tmp_path / "config.yaml",
        """
        _BASE_: "../Base-RCNN-FPN.yaml"
        MODEL:
          MASK_ON: True
          RESNETS: {DEPTH: 101}
          ANCHOR_GENERATOR:
            SIZES: [[8], [16], [32], [64], [128]]
            ASPECT_RATIOS: [[0.25, 0.5, 1.0, 2.0, 4.0]]
          ROI_HEADS: {NUM_CLASSES: 3, SCORE_THRESH_TEST: 0.3}
        INPUT: {MIN_SIZE_TEST: 1024, MAX_SIZE_TEST: 2000}
        TEST: {DETECTIONS_PER_IMAGE: 1000}
        SOLVER:
          STEPS: (1000, 2000)
        """,
    )
    cfg = load_d2_config(cfg_path)
    assert cfg["MODEL"]["RESNETS"]["DEPTH"] == 101
    assert cfg["MODEL"]["RPN"]["PRE_NMS_TOPK_TEST"] == 1000  # from the FPN base
    assert cfg["MODEL"]["ANCHOR_GENERATOR"]["ASPECT_RATIOS"] == [[0.25, 0.5, 1.0, 2.0, 4.0]]
    assert cfg["INPUT"]["MIN_SIZE_TEST"] == 1024
    assert cfg["SOLVER"]["STEPS"] == [1000, 2000]  # yacs-style literal decoding
    assert d2_architecture(cfg) == "mask_rcnn_R_101_FPN"


def test_base_on_disk_wins_and_chains(tmp_path):
    (tmp_path / "zoo").mkdir()
    _write(
        tmp_path / "Base-RCNN-FPN.yaml",
        """
        MODEL:
          BACKBONE: {NAME: build_resnet_fpn_backbone}
          ROI_HEADS: {NAME: StandardROIHeads}
          ROI_BOX_HEAD: {NAME: FastRCNNConvFCHead, NUM_FC: 2, POOLER_RESOLUTION: 7}
          ROI_MASK_HEAD: {NUM_CONV: 4}
          RPN: {IN_FEATURES: [p2, p3, p4, p5, p6], PRE_NMS_TOPK_TEST: 777}
          ANCHOR_GENERATOR: {SIZES: [[32], [64], [128], [256], [512]]}
        """,
    )
    _write(tmp_path / "zoo" / "mid.yaml", '_BASE_: "../Base-RCNN-FPN.yaml"\nMODEL: {MASK_ON: True}\n')
    leaf = _write(tmp_path / "zoo" / "leaf.yaml", '_BASE_: "mid.yaml"\nMODEL: {RPN: {POST_NMS_TOPK_TEST: 5}}\n')
    cfg = load_d2_config(leaf)
    assert cfg["MODEL"]["RPN"]["PRE_NMS_TOPK_TEST"] == 777  # the file on disk, not the bundled base
    assert cfg["MODEL"]["RPN"]["POST_NMS_TOPK_TEST"] == 5
    assert cfg["MODEL"]["MASK_ON"] is True


def test_base_cycle_and_missing_base(tmp_path):
    a = _write(tmp_path / "a.yaml", '_BASE_: "b.yaml"\n')
    _write(tmp_path / "b.yaml", '_BASE_: "a.yaml"\n')
    with pytest.raises(ValueError, match="cycle"):
        load_d2_config(a)
    c = _write(tmp_path / "c.yaml", '_BASE_: "nowhere.yaml"\n')
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_d2_config(c)
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_d2_config(tmp_path / "missing.yaml")


def test_not_yaml_and_lazy_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_d2_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_d2_config(lst)
    lazy = tmp_path / "mask_rcnn_R_50_FPN_1x.py"
    lazy.write_text("model = None\n")
    with pytest.raises(UnsupportedConfigError, match="LazyConfig"):
        load_d2_config(lazy)


def test_merge_replaces_lists_and_merges_dicts():
    base = {"A": {"X": [1, 2], "Y": 1}, "B": 2}
    out = merge_d2_configs(base, {"A": {"X": [3]}, "C": 4})
    assert out == {"A": {"X": [3], "Y": 1}, "B": 2, "C": 4}
    assert base == {"A": {"X": [1, 2], "Y": 1}, "B": 2}  # not mutated


@pytest.mark.parametrize(
    "name, arch",
    [
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml", "mask_rcnn_R_50_C4"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "mask_rcnn_R_50_FPN"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x.yaml", "mask_rcnn_R_101_C4"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml", "mask_rcnn_R_101_FPN"),
        ("COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml", "mask_rcnn_X_101_32x8d_FPN"),
        ("Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml", "cascade_mask_rcnn_X_152_32x8d_FPN"),
    ],
)
def test_model_zoo_configs_map_to_the_six_architectures(name, arch):
    assert name in BUNDLED_CONFIGS
    assert d2_architecture(load_d2_config(name)) == arch


@pytest.mark.parametrize(
    "override, option",
    [
        ({"MODEL": {"MASK_ON": False}}, "MODEL.MASK_ON"),
        ({"MODEL": {"KEYPOINT_ON": True}}, "MODEL.KEYPOINT_ON"),
        ({"MODEL": {"META_ARCHITECTURE": "PanopticFPN"}}, "MODEL.META_ARCHITECTURE"),
        ({"MODEL": {"META_ARCHITECTURE": "RetinaNet"}}, "MODEL.META_ARCHITECTURE"),
        ({"MODEL": {"RESNETS": {"DEPTH": 34}}}, "MODEL.RESNETS.DEPTH"),
        ({"MODEL": {"RESNETS": {"RADIX": 4}}}, "MODEL.RESNETS.RADIX"),
        ({"MODEL": {"RESNETS": {"AVD": True}}}, "MODEL.RESNETS.AVD"),
        ({"MODEL": {"RESNETS": {"RADIX": 2, "DEPTH": 152}}}, "MODEL.RESNETS.DEPTH"),
        ({"MODEL": {"RESNETS": {"RADIX": 2}}}, "mask_rcnn_ResNeSt_50_FPN"),  # only the cascades are built
        ({"MODEL": {"RPN": {"IN_FEATURES": ["p2", "p7"]}}}, "MODEL.RPN.IN_FEATURES"),
        ({"MODEL": {"RESNETS": {"RES5_DILATION": 2}}}, "MODEL.RESNETS.RES5_DILATION"),
        ({"MODEL": {"BACKBONE": {"NAME": "build_regnet_fpn_backbone"}}}, "MODEL.BACKBONE.NAME"),
        ({"MODEL": {"ROI_HEADS": {"NAME": "MyHeads"}}}, "MODEL.ROI_HEADS.NAME"),
        ({"MODEL": {"ROI_BOX_HEAD": {"USE_SIGMOID_CE": True}}}, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE"),
        ({"MODEL": {"ROI_MASK_HEAD": {"NAME": "PointRendMaskHead"}}}, "MODEL.ROI_MASK_HEAD.NAME"),
        ({"MODEL": {"ANCHOR_GENERATOR": {"NAME": "RotatedAnchorGenerator"}}}, "MODEL.ANCHOR_GENERATOR.NAME"),
        ({"MODEL": {"RPN": {"HEAD_NAME": "Custom"}}}, "MODEL.RPN.HEAD_NAME"),
        ({"INPUT": {"FORMAT": "L"}}, "INPUT.FORMAT"),
    ],
)
def test_unsupported_options_name_the_option(override, option):
    cfg = merge_d2_configs(load_d2_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"), override)
    with pytest.raises(UnsupportedConfigError, match=option.replace(".", r"\.")):
        d2_architecture(cfg)


def test_defaults_are_not_mutated_by_loading():
    before = repr(D2_DEFAULTS)
    cfg = load_d2_config("Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml")
    cfg["MODEL"]["RESNETS"]["DEPTH"] = 1
    assert repr(D2_DEFAULTS) == before


def _zoo(name: str, **model_overrides) -> dict:
    cfg = load_d2_config(name)
    cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] = 3
    return merge_d2_configs(cfg, {"MODEL": model_overrides}) if model_overrides else cfg


def test_config_to_model_config_keeps_detectron2_conventions():
    cfg = _zoo("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml")
    mc = config_to_model_config(cfg, ("shsy5y", "astro", "cort"))
    assert mc.arch == "mask_rcnn_R_50_C4"
    assert mc.input_format == "BGR" and mc.pixel_mean == (103.53, 116.28, 123.675) and mc.pixel_std == (1.0, 1.0, 1.0)
    assert mc.stride_in_1x1 is True  # MSRA weights
    assert mc.anchor_sizes == ((32.0, 64.0, 128.0, 256.0, 512.0),)
    assert mc.round_anchors is False and mc.pooler_aligned is True
    assert mc.rpn_pre_nms_top_n_test == 6000 and mc.rpn_post_nms_top_n_test == 1000
    assert mc.box_head_convs == 0 and mc.mask_head_convs == 0 and mc.mask_size == 14
    assert mc.detections_per_img == 100 and mc.score_thresh_test == 0.05
    assert mc.provenance["source"] == "detectron2"


def test_config_to_model_config_fpn_broadcasts_anchor_sizes_and_reads_test_settings():
    cfg = _zoo("COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml")
    cfg = merge_d2_configs(
        cfg,
        {
            "MODEL": {
                "ANCHOR_GENERATOR": {"SIZES": [[8, 16]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]] * 5},
                "ROI_HEADS": {"SCORE_THRESH_TEST": 0.25, "NMS_THRESH_TEST": 0.4},
                "ROI_BOX_HEAD": {"POOLER_TYPE": "ROIAlign", "POOLER_SAMPLING_RATIO": 2},
                "ROI_MASK_HEAD": {"POOLER_TYPE": "ROIAlign", "POOLER_SAMPLING_RATIO": 2},
            },
            "INPUT": {"MIN_SIZE_TEST": 1024, "MAX_SIZE_TEST": 1800},
            "TEST": {"DETECTIONS_PER_IMAGE": 1500},
        },
    )
    mc = config_to_model_config(cfg, ("a", "b", "c"))
    assert mc.arch == "mask_rcnn_X_101_32x8d_FPN"
    assert mc.anchor_sizes == ((8.0, 16.0),) * 5
    assert mc.stride_in_1x1 is False and mc.pixel_std == (57.375, 57.12, 58.395)
    assert (mc.min_size_test, mc.max_size_test, mc.detections_per_img) == (1024, 1800, 1500)
    assert (mc.score_thresh_test, mc.nms_thresh_test) == (0.25, 0.4)
    assert mc.pooler_aligned is False and mc.pooler_sampling_ratio == 2


def test_config_to_model_config_x152_cascade():
    mc = config_to_model_config(_zoo("Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml"), ("a", "b", "c"))
    assert mc.arch == "cascade_mask_rcnn_X_152_32x8d_FPN"
    assert mc.deform_on_per_stage == (False, True, True, True)
    assert (mc.box_head_convs, mc.box_head_fcs, mc.box_head_norm) == (4, 1, "GN")
    assert (mc.mask_head_convs, mc.mask_head_norm) == (8, "GN")
    assert mc.cascade_iou_thresholds == (0.5, 0.6, 0.7)
    assert mc.min_size_train[0] == 640 and mc.min_size_train[-1] == 864  # "range" sampling


def test_class_count_mismatch_names_num_classes():
    cfg = _zoo("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    with pytest.raises(ValueError, match="NUM_CLASSES = 3"):
        config_to_model_config(cfg, ("cell",))


@pytest.mark.parametrize(
    "name, override, option",
    [
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {"RESNETS": {"NORM": "GN"}}, "MODEL.RESNETS.NORM"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {"FPN": {"NORM": "FrozenBN"}}, "MODEL.FPN.NORM"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {"ROI_BOX_HEAD": {"NORM": "FrozenBN"}}, "MODEL.ROI_BOX_HEAD.NORM"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {"ROI_BOX_HEAD": {"POOLER_TYPE": "ROIPool"}},
         "MODEL.ROI_BOX_HEAD.POOLER_TYPE"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {"ANCHOR_GENERATOR": {"OFFSET": 0.5}},
         "MODEL.ANCHOR_GENERATOR.OFFSET"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {"ANCHOR_GENERATOR": {"SIZES": [[8], [16]]}},
         "MODEL.ANCHOR_GENERATOR.SIZES"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
         {"ANCHOR_GENERATOR": {"ASPECT_RATIOS": [[1.0], [0.5, 1.0], [1.0], [1.0], [1.0]]}},
         "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {"ROI_MASK_HEAD": {"CONV_DIM": 128}},
         "MODEL.ROI_MASK_HEAD.CONV_DIM"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml", {"ROI_MASK_HEAD": {"NUM_CONV": 2}},
         "MODEL.ROI_MASK_HEAD.NUM_CONV"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml",
         {"RESNETS": {"DEFORM_ON_PER_STAGE": [False, False, False, True]}}, "MODEL.RESNETS.DEFORM_ON_PER_STAGE"),
        ("Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml", {"ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": False}},
         "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"),
    ],
)
def test_unsupported_layer_options(name, override, option):
    with pytest.raises(UnsupportedConfigError, match=option.replace(".", r"\.")):
        config_to_model_config(_zoo(name, **override), ("a", "b", "c"))


def test_cascade_with_resnet50_is_not_one_of_the_six():
    with pytest.raises(UnsupportedConfigError, match="cascade_mask_rcnn_R_50_FPN"):
        check_supported(_zoo("Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"))


def test_python_yaml_tags_are_refused_not_evaluated(tmp_path):
    # detectron2's Base-RetinaNet.yaml computes anchor sizes with !!python/object/apply:eval
    path = tmp_path / "retina.yaml"
    path.write_text('MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: !!python/object/apply:eval ["[[32]]"]\n')
    with pytest.raises(UnsupportedConfigError, match="Python YAML tag"):
        load_d2_config(path)


LIVECELL_NAMES = ["anchor_based/livecell_config.yaml"] + [
    f"anchor_based/{line}_config.yaml" for line in ("a172", "bt474", "bv2", "huh7", "mcf7", "shsy5y", "skbr3", "skov3")
]


@pytest.mark.parametrize("name", LIVECELL_NAMES)
def test_livecell_anchor_based_configs_are_bundled_with_their_quirks(name):
    cfg = load_d2_config("model/" + name)  # a LIVECell checkout path resolves to the bundled copy
    assert d2_architecture(cfg) == "cascade_mask_rcnn_ResNeSt_200_FPN"
    mc = config_to_model_config(cfg, ("cell",))
    assert mc.arch == "cascade_mask_rcnn_ResNeSt_200_FPN"
    assert mc.rpn_in_features == ("p2", "p2", "p3", "p4", "p5", "p6")
    assert mc.anchor_sizes == ((4,), (9,), (17,), (31,), (64,), (127,))
    assert mc.aspect_ratios == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert (mc.fpn_norm, mc.box_head_norm, mc.mask_head_norm) == ("BN", "BN", "BN")
    assert (mc.box_head_convs, mc.box_head_fcs, mc.mask_head_convs) == (4, 1, 8)
    assert mc.deform_on_per_stage == (False, True, True, True) and mc.deform_modulated and mc.deform_num_groups == 2
    assert mc.pixel_mean == (128.0,) * 3 and mc.pixel_std == (11.578,) * 3 and mc.input_format == "BGR"
    assert mc.freeze_at == 0 and mc.detections_per_img == 3000
    assert (mc.rpn_pre_nms_top_n_test, mc.rpn_post_nms_top_n_test) == (6000, 3000)
    assert (mc.min_size_test, mc.max_size_test) == (800, 1333)  # not in the file: detectron2's defaults
    assert mc.min_size_train == (440, 480, 520, 560, 580, 620)
    assert mc.provenance["d2_resnets_norm"] == "SyncBN"


@pytest.mark.parametrize(
    "name, arch, deform, mask_convs",
    [
        ("mask_cascade_rcnn_ResNeSt_50_FPN_syncBN_1x.yaml", "cascade_mask_rcnn_ResNeSt_50_FPN", False, 4),
        ("mask_cascade_rcnn_ResNeSt_101_FPN_syncBN_1x.yaml", "cascade_mask_rcnn_ResNeSt_101_FPN", False, 4),
        ("mask_cascade_rcnn_ResNeSt_200_FPN_syncBN_all_tricks_3x.yaml", "cascade_mask_rcnn_ResNeSt_200_FPN", False, 8),
        ("mask_cascade_rcnn_ResNeSt_200_FPN_dcn_syncBN_all_tricks_3x.yaml", "cascade_mask_rcnn_ResNeSt_200_FPN", True, 8),
    ],
)
def test_detectron2_resnest_coco_cascades_are_bundled(name, arch, deform, mask_convs):
    cfg = _zoo("COCO-InstanceSegmentation/" + name)
    mc = config_to_model_config(cfg, ("a", "b", "c"))
    assert mc.arch == arch and mc.mask_head_convs == mask_convs and mc.input_format == "RGB"
    assert mc.rpn_in_features == ("p2", "p3", "p4", "p5", "p6") and len(mc.anchor_sizes) == 5
    assert mc.deform_on_per_stage == ((False, True, True, True) if deform else (False,) * 4)
    assert mc.deform_modulated == deform and mc.fpn_norm == "BN" and mc.freeze_at == 2
