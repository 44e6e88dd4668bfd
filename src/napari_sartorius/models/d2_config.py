"""Read detectron2 ``config.yaml`` files without detectron2.

A detectron2 model is described by a yacs config: the ``config.yaml`` detectron2 writes beside its
checkpoints (a full dump, no ``_BASE_``), or a model-zoo style file that names a base config with
``_BASE_: "../Base-RCNN-FPN.yaml"``. This module

* loads such a file with ``yaml.safe_load``, resolving ``_BASE_`` chains from disk or, when the base
  is one of detectron2's model-zoo files and is not on disk, from the small copies bundled in
  :mod:`.d2_tables` (:data:`BUNDLED_CONFIGS`, written from detectron2's ``configs/`` folder);
* merges detectron2's defaults (``detectron2/config/defaults.py``) for the keys that decide the
  network and its test-time behaviour (:data:`D2_DEFAULTS`);
* turns the result into the project's :class:`~napari_sartorius.models.config.ModelConfig`
  (:func:`config_to_model_config`), choosing one of the six architectures, and raises
  :class:`UnsupportedConfigError` naming the option for anything the project cannot rebuild.

Config dicts here are plain nested ``dict`` objects with detectron2's upper-case keys.
"""

from __future__ import annotations

import ast
import copy
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .d2_tables import BUNDLED_CONFIGS, D2_DEFAULTS  # the data tables

__all__ = [
    "UnsupportedConfigError",
    "D2_DEFAULTS",
    "BUNDLED_CONFIGS",
    "load_d2_config",
    "merge_d2_configs",
    "d2_architecture",
    "check_supported",
    "config_to_model_config",
]


class UnsupportedConfigError(ValueError):
    """A detectron2 config uses an option the project cannot rebuild (the message names it)."""


_MAX_BASE_DEPTH = 16


def _decode_value(value: Any) -> Any:
    """Decode a YAML value as yacs does: strings that are Python literals become the literal.

    ``"(0.5, 0.6, 0.7)"`` -> ``[0.5, 0.6, 0.7]``, ``"1e-3"`` -> ``0.001``; other strings stay strings.
    Tuples become lists so that merged configs compare equal to dumped ones.
    """
    if isinstance(value, dict):
        return {k: _decode_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode_value(v) for v in value]
    if isinstance(value, str):
        try:
            lit = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return value
        if isinstance(lit, (int, float, bool, list, tuple, dict)) or lit is None:
            return _decode_value(lit) if isinstance(lit, (list, tuple, dict)) else lit
        return value
    return value


def merge_d2_configs(base: Mapping, override: Mapping) -> dict:
    """Return a deep copy of ``base`` with ``override`` merged into it (``override`` wins).

    Nested dicts merge key by key, any other value is replaced whole (detectron2's rule: a list in the
    child replaces the base's list).
    """
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_d2_configs(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _bundled_key(name: str) -> str | None:
    """The :data:`BUNDLED_CONFIGS` key a base path such as ``../Base-RCNN-FPN.yaml`` refers to."""
    parts = [p for p in Path(name.replace("\\", "/")).parts if p not in ("..", ".", "/")]
    for n in (2, 1):
        if len(parts) >= n:
            key = "/".join(parts[-n:])
            if key in BUNDLED_CONFIGS:
                return key
    return None


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read detectron2 config {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise UnsupportedConfigError(
            f"{path} uses a Python YAML tag ({str(exc.problem or exc).strip()[:80]}); such values are code "
            "and are never evaluated here: replace them by plain numbers/lists"
        ) from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML ({exc}); pass the config.yaml written by detectron2") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a detectron2 config (a YAML mapping at the top level)")
    return data


def _load_with_bases(source: str | Path, depth: int, chain: tuple[str, ...]) -> dict:
    """Load one config (file path or bundled name) with its ``_BASE_`` chain merged in."""
    if depth > _MAX_BASE_DEPTH:
        raise ValueError(f"_BASE_ chain deeper than {_MAX_BASE_DEPTH}: {' -> '.join(chain)}")
    path = Path(os.path.expanduser(str(source)))
    bundled = None
    if path.is_file():
        if path.suffix == ".py":
            raise UnsupportedConfigError(
                f"{path} is a detectron2 LazyConfig (.py); only yacs YAML configs are supported. "
                "Dump the config as YAML (detectron2 writes config.yaml beside its checkpoints)"
            )
        data = _read_yaml(path)
        where = str(path.resolve())
    else:
        bundled = _bundled_key(str(source))
        if bundled is None:
            hint = ", ".join(sorted(BUNDLED_CONFIGS))
            raise FileNotFoundError(
                f"detectron2 config {source} not found"
                + (f" (base of {chain[-1]})" if chain else "")
                + f"; give a path to a config.yaml, or one of the bundled model-zoo names: {hint}"
            )
        data = copy.deepcopy(BUNDLED_CONFIGS[bundled])
        where = f"<bundled {bundled}>"
    if where in chain:
        raise ValueError(f"_BASE_ cycle: {' -> '.join(chain + (where,))}")
    base_name = data.pop("_BASE_", None)
    data = _decode_value(data)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ValueError(f"_BASE_ in {where} must be one file name, got {base_name!r}")
    if base_name.startswith(("http://", "https://")):
        raise UnsupportedConfigError(f"_BASE_ {base_name!r} in {where} is a URL; download it next to the config")
    base_name = os.path.expanduser(base_name)
    if bundled is not None:
        # A bundled file's relative base is another bundled file.
        base_src: str | Path = str(Path(bundled).parent / base_name)
    elif os.path.isabs(base_name):
        base_src = Path(base_name)
    else:
        base_src = path.parent / base_name
    base = _load_with_bases(base_src, depth + 1, chain + (where,))
    return merge_d2_configs(base, data)


def load_d2_config(path: str | Path) -> dict:
    """Read a detectron2 yacs config, resolve ``_BASE_`` and merge detectron2's defaults.

    Args:
        path: a ``config.yaml`` on disk, or a model-zoo name such as
            ``"COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"`` (see :data:`BUNDLED_CONFIGS`).
            A relative ``_BASE_`` is looked up beside the file first, then among the bundled configs.

    Returns:
        A nested dict with detectron2's upper-case keys; every key of :data:`D2_DEFAULTS` is present.

    Raises:
        FileNotFoundError: the file (or a base) exists neither on disk nor among the bundled configs.
        ValueError: the file is not YAML or not a mapping, or the ``_BASE_`` chain loops.
        UnsupportedConfigError: a LazyConfig ``.py`` file or a URL base.
    """
    data = _load_with_bases(path, 0, ())
    return merge_d2_configs(D2_DEFAULTS, data)


def _get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


#: The project's architectures (:mod:`.registry`), named as in detectron2's model zoo.
from .registry import ARCH_NAMES as ARCHITECTURES  # noqa: E402


_RESNEST_ARCHS = tuple(a for a in ARCHITECTURES if "_ResNeSt_" in a)
# FPN / head norms: detectron2 name -> project name (SyncBN is BatchNorm on one process, SyncBatchNorm
# under torchrun).
_NORMS = {"": "", "GN": "GN", "BN": "BN", "SyncBN": "BN", "nnSyncBN": "BN"}
_NORMS_TEXT = "'', 'GN', or 'BN'/'SyncBN'/'nnSyncBN' (BatchNorm)"


def _unsupported(option: str, value: Any, supported: str, where: str = "") -> UnsupportedConfigError:
    src = f" in {where}" if where else ""
    return UnsupportedConfigError(
        f"detectron2 option {option} = {value!r}{src} is not supported (supported: {supported})"
    )


def _expect(cfg: Mapping, option: str, allowed: Sequence, supported: str | None = None) -> Any:
    value = _get(cfg, option)
    if value not in allowed:
        raise _unsupported(option, value, supported or " or ".join(repr(a) for a in allowed))
    return value


def d2_architecture(cfg: Mapping) -> str:
    """Which of the six project architectures a loaded detectron2 config describes.

    Checks the options that decide the network's structure (not the project-side details such as
    normalisation layers, which :func:`check_supported` checks) and raises
    :class:`UnsupportedConfigError` naming the first option that none of the six architectures has.

    Args:
        cfg: a config from :func:`load_d2_config` (defaults merged).

    Returns:
        One of :data:`ARCHITECTURES`.
    """
    m = "MODEL."
    _expect(cfg, m + "META_ARCHITECTURE", ["GeneralizedRCNN"], "GeneralizedRCNN (Mask R-CNN)")
    if _get(cfg, m + "MASK_ON") is not True:
        raise _unsupported(m + "MASK_ON", _get(cfg, m + "MASK_ON"), "True; a box-only Faster R-CNN has no masks")
    _expect(cfg, m + "KEYPOINT_ON", [False])
    _expect(cfg, m + "LOAD_PROPOSALS", [False])
    _expect(cfg, m + "PROPOSAL_GENERATOR.NAME", ["RPN"])
    _expect(cfg, m + "RPN.HEAD_NAME", ["StandardRPNHead"])
    _expect(cfg, m + "ANCHOR_GENERATOR.NAME", ["DefaultAnchorGenerator"])
    _expect(cfg, m + "ROI_MASK_HEAD.NAME", ["MaskRCNNConvUpsampleHead"])
    _expect(cfg, m + "ROI_BOX_HEAD.USE_SIGMOID_CE", [False], "False (softmax classifier)")
    _expect(cfg, m + "RESNETS.RES5_DILATION", [1], "1 (no DC5 dilation)")
    radix = _get(cfg, m + "RESNETS.RADIX")
    if radix not in (0, 1, 2):
        raise _unsupported(m + "RESNETS.RADIX", radix, "1 (ResNet/ResNeXt) or 2 (ResNeSt)")
    resnest = radix == 2
    if not resnest:
        for key in ("DEEP_STEM", "AVD", "AVG_DOWN"):
            _expect(cfg, m + "RESNETS." + key, [False], "False (ResNeSt tricks are built with RADIX 2 only)")
    fmt = _get(cfg, "INPUT.FORMAT")
    if fmt not in ("BGR", "RGB"):
        raise _unsupported("INPUT.FORMAT", fmt, "'BGR' or 'RGB' (3-channel input)")

    backbone = _expect(
        cfg, m + "BACKBONE.NAME", ["build_resnet_fpn_backbone", "build_resnet_backbone"],
        "build_resnet_fpn_backbone (FPN) or build_resnet_backbone (C4)",
    )
    heads = _get(cfg, m + "ROI_HEADS.NAME")
    depth = _get(cfg, m + "RESNETS.DEPTH")
    groups = _get(cfg, m + "RESNETS.NUM_GROUPS")
    width = _get(cfg, m + "RESNETS.WIDTH_PER_GROUP")
    if resnest:
        _expect(cfg, m + "RESNETS.BOTTLENECK_WIDTH", [64])
        if (groups, width) != (1, 64):
            raise _unsupported(m + "RESNETS.NUM_GROUPS/WIDTH_PER_GROUP", (groups, width), "(1, 64) for ResNeSt")
        body = {50: "ResNeSt_50", 101: "ResNeSt_101", 200: "ResNeSt_200"}.get(depth)
        if body is None:
            raise _unsupported(m + "RESNETS.DEPTH", depth, "50, 101 or 200 for ResNeSt (RADIX 2)")
    elif (groups, width) == (1, 64):
        body = {50: "R_50", 101: "R_101"}.get(depth)
    elif (groups, width) == (32, 8):
        body = {101: "X_101_32x8d", 152: "X_152_32x8d"}.get(depth)
    else:
        raise _unsupported(
            m + "RESNETS.NUM_GROUPS/WIDTH_PER_GROUP", (groups, width), "(1, 64) for ResNet or (32, 8) for ResNeXt 32x8d"
        )
    if body is None:
        raise _unsupported(m + "RESNETS.DEPTH", depth, "50 or 101 for ResNet, 101 or 152 for ResNeXt 32x8d")

    if backbone == "build_resnet_backbone":
        if heads != "Res5ROIHeads":
            raise _unsupported(m + "ROI_HEADS.NAME", heads, "Res5ROIHeads with build_resnet_backbone (C4)")
        _expect(cfg, m + "RESNETS.OUT_FEATURES", [["res4"]])
        _expect(cfg, m + "RPN.IN_FEATURES", [["res4"]])
        _expect(cfg, m + "ROI_HEADS.IN_FEATURES", [["res4"]])
        arch = f"mask_rcnn_{body}_C4"
    else:
        levels = ["res2", "res3", "res4", "res5"]
        _expect(cfg, m + "FPN.IN_FEATURES", [levels])
        _expect(cfg, m + "FPN.FUSE_TYPE", ["sum"])
        rpn_in = _get(cfg, m + "RPN.IN_FEATURES")
        if not rpn_in or any(f not in ("p2", "p3", "p4", "p5", "p6") for f in rpn_in):
            raise _unsupported(m + "RPN.IN_FEATURES", rpn_in, "FPN levels among p2-p6 (a level may repeat)")
        _expect(cfg, m + "ROI_HEADS.IN_FEATURES", [["p2", "p3", "p4", "p5"]])
        _expect(cfg, m + "ROI_BOX_HEAD.NAME", ["FastRCNNConvFCHead"])
        if heads == "StandardROIHeads":
            arch = f"mask_rcnn_{body}_FPN"
        elif heads == "CascadeROIHeads":
            arch = f"cascade_mask_rcnn_{body}_FPN"
        else:
            raise _unsupported(m + "ROI_HEADS.NAME", heads, "StandardROIHeads or CascadeROIHeads with FPN")
    if arch not in ARCHITECTURES:
        raise UnsupportedConfigError(
            f"the detectron2 config describes {arch} (MODEL.RESNETS.DEPTH={depth}, NUM_GROUPS={groups}, "
            f"WIDTH_PER_GROUP={width}, MODEL.ROI_HEADS.NAME={heads}), which is not one of the project's "
            f"architectures: {', '.join(ARCHITECTURES)}"
        )
    return arch


def _same_for_all(option: str, per_level: list) -> list:
    """detectron2 lets per-level lists have one entry (broadcast) or one per level; we need one."""
    first = per_level[0]
    if any(list(p) != list(first) for p in per_level[1:]):
        raise _unsupported(option, per_level, "the same list at every feature level")
    return list(first)


def check_supported(cfg: Mapping) -> str:
    """Check every option that the project's model cannot reproduce; return the architecture.

    Runs :func:`d2_architecture`, then the options of the layers inside (normalisation, channel
    widths, pooler types, anchors). Raises :class:`UnsupportedConfigError` naming the option.
    """
    arch = d2_architecture(cfg)
    m = "MODEL."
    c4 = arch.endswith("_C4")
    _expect(cfg, m + "RESNETS.NORM", ["FrozenBN", "BN", "SyncBN", "nnSyncBN"],
            "FrozenBN, or BN/SyncBN (frozen to their running statistics at inference)")  # fmt: skip
    resnest = arch in _RESNEST_ARCHS
    if resnest:  # the deep stem's width is fixed by the depth; STEM_OUT_CHANNELS is not read
        _expect(cfg, m + "RESNETS.STRIDE_IN_1X1", [False], "False (ResNeSt's avd strides after the 3x3 conv)")
    else:
        _expect(cfg, m + "RESNETS.STEM_OUT_CHANNELS", [64])
    _expect(cfg, m + "RESNETS.RES2_OUT_CHANNELS", [256])
    _expect(cfg, m + "ANCHOR_GENERATOR.OFFSET", [0, 0.0], "0.0")
    _expect(cfg, m + "RPN.CONV_DIMS", [[-1]], "[-1] (one 3x3 conv as wide as its input)")
    rpn_w = [float(w) for w in _get(cfg, m + "RPN.BBOX_REG_WEIGHTS")]
    if rpn_w != [1.0, 1.0, 1.0, 1.0]:
        raise _unsupported(m + "RPN.BBOX_REG_WEIGHTS", rpn_w, "(1.0, 1.0, 1.0, 1.0)")
    _expect(cfg, m + "ROI_HEADS.IN_FEATURES", [["res4"]] if c4 else [["p2", "p3", "p4", "p5"]])
    box_pool = _expect(cfg, m + "ROI_BOX_HEAD.POOLER_TYPE", ["ROIAlignV2", "ROIAlign"])
    mask_pool = _get(cfg, m + "ROI_MASK_HEAD.POOLER_TYPE")
    if mask_pool != box_pool:
        raise _unsupported(m + "ROI_MASK_HEAD.POOLER_TYPE", mask_pool, f"the box head's pooler type ({box_pool})")
    ratio = _get(cfg, m + "ROI_BOX_HEAD.POOLER_SAMPLING_RATIO")
    _expect(cfg, m + "ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", [ratio], f"the box head's sampling ratio ({ratio})")
    _expect(cfg, m + "ROI_MASK_HEAD.CONV_DIM", [256])
    if c4:
        _expect(cfg, m + "ROI_BOX_HEAD.POOLER_RESOLUTION", [14], "14 (res5 head of C4 models)")
        _expect(cfg, m + "ROI_MASK_HEAD.NUM_CONV", [0], "0 (the C4 mask head is deconv + predictor)")
        deform = _get(cfg, m + "RESNETS.DEFORM_ON_PER_STAGE")
        if len(deform) == 4 and deform[3]:
            raise _unsupported(m + "RESNETS.DEFORM_ON_PER_STAGE", deform, "no deformable res5 in C4 models")
    else:
        _expect(cfg, m + "FPN.OUT_CHANNELS", [256])
        _expect(cfg, m + "FPN.NORM", list(_NORMS), _NORMS_TEXT)
        _expect(cfg, m + "ROI_BOX_HEAD.POOLER_RESOLUTION", [7])
        _expect(cfg, m + "ROI_MASK_HEAD.POOLER_RESOLUTION", [14])
        _expect(cfg, m + "ROI_BOX_HEAD.CONV_DIM", [256])
        _expect(cfg, m + "ROI_BOX_HEAD.NORM", list(_NORMS), _NORMS_TEXT)
        _expect(cfg, m + "ROI_MASK_HEAD.NORM", list(_NORMS), _NORMS_TEXT)
        if _get(cfg, m + "ROI_BOX_HEAD.NUM_CONV") + _get(cfg, m + "ROI_BOX_HEAD.NUM_FC") == 0:
            raise _unsupported(m + "ROI_BOX_HEAD.NUM_CONV/NUM_FC", (0, 0), "at least one conv or fc layer")
    if arch.startswith("cascade_"):
        _expect(cfg, m + "ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", [True], "True (detectron2's cascade requires it)")
        ious = _get(cfg, m + "ROI_BOX_CASCADE_HEAD.IOUS")
        weights = _get(cfg, m + "ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS")
        if len(ious) != len(weights) or not ious:
            raise _unsupported(m + "ROI_BOX_CASCADE_HEAD.IOUS", ious, "one IoU per BBOX_REG_WEIGHTS entry")
    sizes = _get(cfg, m + "ANCHOR_GENERATOR.SIZES")
    levels = 1 if c4 else len(_get(cfg, m + "RPN.IN_FEATURES"))
    if len(sizes) not in (1, levels):
        raise _unsupported(m + "ANCHOR_GENERATOR.SIZES", sizes, f"1 or {levels} lists of sizes")
    if len({len(s) for s in sizes}) != 1:
        raise _unsupported(m + "ANCHOR_GENERATOR.SIZES", sizes, "the same number of sizes at every level")
    if len(_get(cfg, m + "RESNETS.DEFORM_ON_PER_STAGE")) != 4:
        raise _unsupported(m + "RESNETS.DEFORM_ON_PER_STAGE", _get(cfg, m + "RESNETS.DEFORM_ON_PER_STAGE"), "4 flags")
    _same_for_all(m + "ANCHOR_GENERATOR.ASPECT_RATIOS", _get(cfg, m + "ANCHOR_GENERATOR.ASPECT_RATIOS"))
    n_mean, n_std = len(_get(cfg, m + "PIXEL_MEAN")), len(_get(cfg, m + "PIXEL_STD"))
    if n_mean != 3 or n_std != 3:
        raise _unsupported(m + "PIXEL_MEAN/PIXEL_STD", (n_mean, n_std), "3 values each (3-channel input)")
    return arch


def _train_sizes(cfg: Mapping) -> tuple[int, ...]:
    sizes = _get(cfg, "INPUT.MIN_SIZE_TRAIN")
    sizes = [int(s) for s in (sizes if isinstance(sizes, (list, tuple)) else [sizes])]
    if cfg["INPUT"].get("MIN_SIZE_TRAIN_SAMPLING", "choice") == "range" and len(sizes) == 2:
        lo, hi = sorted(sizes)
        sizes = list(range(lo, hi + 1, 32)) or [lo]
    return tuple(s for s in sizes if s > 0) or (800,)


def config_to_model_config(cfg: Mapping, class_names: Sequence[str], *, provenance: Mapping | None = None):
    """Turn a detectron2 config into the project's ``ModelConfig``.

    Keeps detectron2's input convention (``INPUT.FORMAT`` channel order, ``PIXEL_MEAN``/``PIXEL_STD``
    in 0..255 units, so the first convolution's weights are used unchanged), its anchors, RPN counts,
    RoIAlign type, head shapes, test size and test thresholds, with unrounded anchors as detectron2
    computes them.

    Args:
        cfg: from :func:`load_d2_config`.
        class_names: the K foreground classes, in detectron2's class-index order
            (``MODEL.ROI_HEADS.NUM_CLASSES`` must be K).
        provenance: extra JSON-able facts stored in ``ModelConfig.provenance``.

    Returns:
        A ``napari_sartorius.models.config.ModelConfig``.

    Raises:
        UnsupportedConfigError: an option the project cannot rebuild (named in the message).
        ValueError: ``class_names`` does not match ``NUM_CLASSES``.
    """
    from .config import ModelConfig

    arch = check_supported(cfg)
    model, inp = cfg["MODEL"], cfg["INPUT"]
    class_names = tuple(str(c) for c in class_names)
    k = int(model["ROI_HEADS"]["NUM_CLASSES"])
    if len(class_names) != k:
        raise ValueError(
            f"the detectron2 config has MODEL.ROI_HEADS.NUM_CLASSES = {k} but {len(class_names)} class "
            f"name(s) were given ({', '.join(class_names)}); pass {k} names in the model's class order"
        )
    c4 = arch.endswith("_C4")
    sizes = model["ANCHOR_GENERATOR"]["SIZES"]
    rpn_in = ("res4",) if c4 else tuple(model["RPN"]["IN_FEATURES"])
    if len(sizes) == 1:
        sizes = sizes * len(rpn_in)
    box, mask, rpn, heads, res = (
        model["ROI_BOX_HEAD"], model["ROI_MASK_HEAD"], model["RPN"], model["ROI_HEADS"], model["RESNETS"]
    )
    iou_lo, iou_hi = (list(rpn["IOU_THRESHOLDS"]) + [0.3, 0.7])[:2]
    prov = {
        "source": "detectron2",
        "d2_roi_heads": heads["NAME"],
        "d2_cls_agnostic_bbox_reg": bool(box["CLS_AGNOSTIC_BBOX_REG"]),
        "d2_cls_agnostic_mask": bool(mask["CLS_AGNOSTIC_MASK"]),
        "d2_resnets_norm": res["NORM"],
    }
    prov.update(dict(provenance or {}))
    kwargs = dict(
        arch=arch,
        class_names=class_names,
        input_format=inp["FORMAT"],
        pixel_mean=tuple(float(v) for v in model["PIXEL_MEAN"]),
        pixel_std=tuple(float(v) for v in model["PIXEL_STD"]),
        min_size_test=int(inp["MIN_SIZE_TEST"]),
        max_size_test=int(inp["MAX_SIZE_TEST"]),
        min_size_train=_train_sizes(cfg),
        max_size_train=int(inp["MAX_SIZE_TRAIN"]),
        stride_in_1x1=bool(res["STRIDE_IN_1X1"]),
        freeze_at=int(model["BACKBONE"]["FREEZE_AT"]),
        deform_on_per_stage=tuple(bool(v) for v in res["DEFORM_ON_PER_STAGE"]),
        deform_modulated=bool(res["DEFORM_MODULATED"]),
        deform_num_groups=int(res["DEFORM_NUM_GROUPS"]),
        fpn_norm="" if c4 else _NORMS[model["FPN"]["NORM"]],
        rpn_in_features=rpn_in,
        anchor_sizes=tuple(tuple(float(s) for s in level) for level in sizes),
        aspect_ratios=tuple(float(a) for a in model["ANCHOR_GENERATOR"]["ASPECT_RATIOS"][0]),
        round_anchors=False,
        rpn_pre_nms_top_n_train=int(rpn["PRE_NMS_TOPK_TRAIN"]),
        rpn_post_nms_top_n_train=int(rpn["POST_NMS_TOPK_TRAIN"]),
        rpn_pre_nms_top_n_test=int(rpn["PRE_NMS_TOPK_TEST"]),
        rpn_post_nms_top_n_test=int(rpn["POST_NMS_TOPK_TEST"]),
        rpn_nms_thresh=float(rpn["NMS_THRESH"]),
        rpn_batch_size_per_image=int(rpn["BATCH_SIZE_PER_IMAGE"]),
        rpn_positive_fraction=float(rpn["POSITIVE_FRACTION"]),
        rpn_fg_iou_thresh=float(iou_hi),
        rpn_bg_iou_thresh=float(iou_lo),
        roi_batch_size_per_image=int(heads["BATCH_SIZE_PER_IMAGE"]),
        roi_positive_fraction=float(heads["POSITIVE_FRACTION"]),
        roi_iou_thresh=float(list(heads["IOU_THRESHOLDS"])[0]),
        pooler_aligned=box["POOLER_TYPE"] == "ROIAlignV2",
        pooler_sampling_ratio=int(box["POOLER_SAMPLING_RATIO"]),
        box_head_convs=0 if c4 else int(box["NUM_CONV"]),
        box_head_fcs=0 if c4 else int(box["NUM_FC"]),
        box_head_norm="" if c4 else _NORMS[box["NORM"]],
        box_head_dim=int(box["FC_DIM"]),
        mask_head_convs=0 if c4 else int(mask["NUM_CONV"]),
        mask_head_norm="" if c4 else _NORMS[mask["NORM"]],
        bbox_reg_weights=tuple(float(w) for w in box["BBOX_REG_WEIGHTS"]),
        cascade_iou_thresholds=tuple(float(v) for v in model["ROI_BOX_CASCADE_HEAD"]["IOUS"]),
        cascade_bbox_reg_weights=tuple(
            tuple(float(w) for w in ws) for ws in model["ROI_BOX_CASCADE_HEAD"]["BBOX_REG_WEIGHTS"]
        ),
        score_thresh_test=float(heads["SCORE_THRESH_TEST"]),
        nms_thresh_test=float(heads["NMS_THRESH_TEST"]),
        detections_per_img=int(cfg["TEST"]["DETECTIONS_PER_IMAGE"]),
        provenance=prov,
    )
    try:
        return ModelConfig(**kwargs)
    except ValueError as exc:
        raise UnsupportedConfigError(f"the detectron2 config cannot be expressed as a project model: {exc}") from exc
