"""The registry of named pretrained weights (the model zoo): data and look-up only, no torch.

Three families, in the spirit of torchvision's weights enums (URL, hash, classes, provenance):

* ``livecell``, ``livecell-<line>``: the LIVECell authors' anchor-based models (Edlund et al., Nature
  Methods 2021; sartorius-research/LIVECell, ``model/README.md``): Cascade Mask R-CNN with a
  ResNeSt-200 FPN body (the chongruo/detectron2-ResNeSt fork), one class ``cell``, trained on all of
  LIVECell or on one of its eight cell lines (SH-SY5Y among them). detectron2 ``.pth`` checkpoints,
  imported with the bundled LIVECell config.
* ``coco-<arch>``: detectron2's COCO Mask R-CNN weights for the six seed architectures (detectron2's
  ``MODEL_ZOO.md`` / ``detectron2/model_zoo/model_zoo.py``), 80 COCO classes; model-zoo ``.pkl``.
* ``imagenet-<body>``: torchvision's ImageNet classification weights of the ResNet/ResNeXt bodies,
  for ``init-model --imagenet`` (URLs and hash prefixes from torchvision's weights enums).

Each :class:`PretrainedEntry` names its URL, the bundled detectron2 config it is imported with, the
architecture, classes, file size and SHA-256 where known, and a provenance/licence note. Nothing here
downloads: see :mod:`.download`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "PretrainedEntry",
    "REGISTRY",
    "COCO_CLASSES",
    "LIVECELL_CLASSES",
    "registry_names",
    "get_entry",
    "is_registry_name",
]

#: The kinds of entries: a detectron2 detection checkpoint, or torchvision ImageNet body weights.
KINDS = ("detectron2", "imagenet")

#: LIVECell's models detect one class.
LIVECELL_CLASSES: tuple[str, ...] = ("cell",)

#: COCO's 80 thing classes in detectron2's contiguous order (category ids 1..90 with the gaps removed).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

#: The LIVECell architecture's registry name (built by ``models.architectures``).
LIVECELL_ARCH = "cascade_mask_rcnn_ResNeSt_200_FPN"


@dataclass(frozen=True)
class PretrainedEntry:
    """One named set of pretrained weights.

    Attributes:
        name: the registry name (``--model NAME``), lower case.
        kind: ``"detectron2"`` (a detection checkpoint, imported into a project checkpoint) or
            ``"imagenet"`` (torchvision body weights for ``init-model --imagenet``).
        url: where the file is downloaded from (https).
        filename: the file's name in the download cache (the URL's last part).
        arch: the project architecture the weights belong to.
        classes: the foreground classes in the checkpoint's order (empty for ImageNet bodies).
        config: the bundled detectron2 config it is imported with (``kind == "detectron2"``), a key of
            ``d2_config.BUNDLED_CONFIGS``; None for ImageNet bodies.
        size_bytes: the exact file size in bytes when known (checked after download), else None.
        approx_mb: the approximate size in MB for display (None when unknown).
        sha256: the file's full SHA-256 (hex) when known (checked), else None.
        sha256_prefix: a known leading part of the SHA-256 (torchvision names its files with one; checked).
        description: one line for ``pretrained list``.
        provenance: where the weights come from, the data they were trained on and their licence terms.
    """

    name: str
    kind: str
    url: str
    filename: str
    arch: str
    classes: tuple[str, ...]
    config: str | None
    size_bytes: int | None
    approx_mb: float | None
    sha256: str | None
    sha256_prefix: str | None
    description: str
    provenance: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# -- LIVECell anchor-based models ------------------------------------------------------------------
_LIVECELL_BASE = "https://livecell-dataset.s3.eu-central-1.amazonaws.com/LIVECell_dataset_2021/models/Anchor_based"
_LIVECELL_NOTE = (
    "LIVECell anchor-based model (Edlund et al., 'LIVECell - A large-scale dataset for label-free live "
    "cell segmentation', Nature Methods 2021), sartorius-research/LIVECell model/README.md; Cascade Mask "
    "R-CNN ResNeSt-200 FPN from chongruo/detectron2-ResNeSt. Code MIT; the LIVECell images and "
    "annotations it was trained on are CC BY-NC 4.0: check the LIVECell terms before commercial use."
)
# (registry suffix, S3 folder, file infix, config file, cell line as written by LIVECell, box AP, mask AP)
_LIVECELL_LINES = (
    ("", "ALL", "", "livecell", "all of LIVECell (8 cell lines)", 48.43, 47.89),
    ("-a172", "A172", "_a172", "a172", "A172 (glioblastoma)", 36.37, 38.02),
    ("-bt474", "BT474", "_bt474", "bt474", "BT-474 (breast ductal carcinoma)", 43.25, 43.00),
    ("-bv2", "BV2", "_bv2", "bv2", "BV-2 (mouse microglia)", 54.36, 52.60),
    ("-huh7", "HUH7", "_huh7", "huh7", "Huh7 (hepatocellular carcinoma)", 52.79, 51.83),
    ("-mcf7", "MCF7", "_mcf7", "mcf7", "MCF7 (breast adenocarcinoma)", 37.53, 37.94),
    ("-shsy5y", "SHSY5Y", "_shsy5y", "shsy5y", "SH-SY5Y (neuroblastoma)", 27.87, 24.92),
    ("-skbr3", "SKBR3", "_skbr3", "skbr3", "SkBr3 (breast adenocarcinoma)", 64.41, 65.39),
    ("-skov3", "SKOV3", "_skov3", "skov3", "SK-OV-3 (ovarian carcinoma)", 53.29, 54.12),
)

#: Where the LIVECell configs live among the bundled detectron2 configs.
LIVECELL_CONFIG_DIR = "anchor_based"


def _livecell_entries() -> list[PretrainedEntry]:
    out = []
    for suffix, folder, infix, cfg, line, box_ap, mask_ap in _LIVECELL_LINES:
        filename = f"LIVECell_anchor_based{infix}_model.pth"
        out.append(
            PretrainedEntry(
                name=f"livecell{suffix}",
                kind="detectron2",
                url=f"{_LIVECELL_BASE}/{folder}/{filename}",
                filename=filename,
                arch=LIVECELL_ARCH,
                classes=LIVECELL_CLASSES,
                config=f"{LIVECELL_CONFIG_DIR}/{cfg}_config.yaml",
                size_bytes=None,
                approx_mb=None,
                sha256=None,
                sha256_prefix=None,
                description=f"LIVECell, trained on {line}: box AP {box_ap:.2f}, mask AP {mask_ap:.2f} "
                f"on its LIVECell test set; 1 class (cell)",
                provenance=_LIVECELL_NOTE,
            )
        )
    return out


# -- detectron2 COCO Mask R-CNN --------------------------------------------------------------------
_D2_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"
_D2_NOTE = (
    "detectron2 model zoo (facebookresearch/detectron2 MODEL_ZOO.md), trained on COCO 2017 train; "
    "the model zoo's weights are released under CC BY-SA 3.0 (detectron2 code Apache-2.0)."
)
# (registry name, architecture, model-zoo config without .yaml, URL suffix, box AP, mask AP per MODEL_ZOO.md)
_D2_MODELS = (
    ("coco-r50-c4", "mask_rcnn_R_50_C4", "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x",
     "137849525/model_final_4ce675.pkl", 39.8, 34.4),
    ("coco-r50-fpn", "mask_rcnn_R_50_FPN", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x",
     "137849600/model_final_f10217.pkl", 41.0, 37.2),
    ("coco-r101-c4", "mask_rcnn_R_101_C4", "COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x",
     "138363239/model_final_a2914c.pkl", 42.6, 36.7),
    ("coco-r101-fpn", "mask_rcnn_R_101_FPN", "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x",
     "138205316/model_final_a3ec72.pkl", 42.9, 38.6),
    ("coco-x101-fpn", "mask_rcnn_X_101_32x8d_FPN", "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x",
     "139653917/model_final_2d9806.pkl", 44.3, 39.5),
    ("coco-x152-cascade", "cascade_mask_rcnn_X_152_32x8d_FPN", "Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv",
     "18131413/model_0039999_e76410.pkl", 50.2, 44.0),
)  # fmt: skip


def _d2_entries() -> list[PretrainedEntry]:
    out = []
    for name, arch, cfg, suffix, box_ap, mask_ap in _D2_MODELS:
        out.append(
            PretrainedEntry(
                name=name,
                kind="detectron2",
                url=f"{_D2_PREFIX}{cfg}/{suffix}",
                # model ids keep the cached files of different models apart (all are model_final_*.pkl)
                filename=f"{cfg.rsplit('/', 1)[-1]}_{suffix.replace('/', '_')}",
                arch=arch,
                classes=COCO_CLASSES,
                config=f"{cfg}.yaml",
                size_bytes=None,
                approx_mb=None,
                sha256=None,
                sha256_prefix=None,
                description=f"detectron2 {cfg.rsplit('/', 1)[-1]} on COCO: box AP {box_ap}, mask AP {mask_ap}; "
                "80 classes (objects, not cells: a starting point for fine-tuning)",
                provenance=_D2_NOTE,
            )
        )
    return out


# -- torchvision ImageNet bodies -------------------------------------------------------------------
_TV_PREFIX = "https://download.pytorch.org/models/"
_TV_NOTE = (
    "torchvision ImageNet-1K classification weights (IMAGENET1K_V1, pytorch/vision, BSD-3-Clause code); "
    "trained on ImageNet, whose images are for non-commercial research."
)
# (registry name, architecture it initialises, file, approx MB, top-1, torchvision enum)
_TV_MODELS = (
    ("imagenet-r50", "mask_rcnn_R_50_FPN", "resnet50-0676ba61.pth", 97.781, 76.13, "ResNet50_Weights.IMAGENET1K_V1"),
    ("imagenet-r101", "mask_rcnn_R_101_FPN", "resnet101-63fe2227.pth", 170.511, 77.374,
     "ResNet101_Weights.IMAGENET1K_V1"),
    ("imagenet-x101-32x8d", "mask_rcnn_X_101_32x8d_FPN", "resnext101_32x8d-8ba56ff5.pth", 339.586, 79.312,
     "ResNeXt101_32X8D_Weights.IMAGENET1K_V1"),
)  # fmt: skip


def _tv_entries() -> list[PretrainedEntry]:
    out = []
    for name, arch, filename, mb, top1, enum in _TV_MODELS:
        out.append(
            PretrainedEntry(
                name=name,
                kind="imagenet",
                url=_TV_PREFIX + filename,
                filename=filename,
                arch=arch,
                classes=(),
                config=None,
                size_bytes=None,
                approx_mb=mb,
                sha256=None,
                # torch.hub's convention: the part after '-' is the start of the file's SHA-256
                sha256_prefix=filename.rsplit("-", 1)[1].split(".")[0],
                description=f"torchvision {enum} (ImageNet top-1 {top1} %): body weights for "
                f"`init-model {arch.replace('_FPN', '_*')} --imagenet {name}`",
                provenance=_TV_NOTE,
            )
        )
    return out


REGISTRY: dict[str, PretrainedEntry] = {e.name: e for e in _livecell_entries() + _d2_entries() + _tv_entries()}


def registry_names(kind: str | None = None) -> list[str]:
    """The registry names, in registry order (LIVECell, COCO, ImageNet), optionally of one kind."""
    return [n for n, e in REGISTRY.items() if kind is None or e.kind == kind]


def is_registry_name(value: object) -> bool:
    """True when ``value`` is a registry name (case-insensitive)."""
    return isinstance(value, str) and value.strip().lower() in REGISTRY


def get_entry(name: str, *, kinds: Sequence[str] | None = None) -> PretrainedEntry:
    """The entry called ``name`` (case-insensitive).

    Raises:
        ValueError: no such entry (the message lists the names), or it is not of one of ``kinds``.
    """
    key = str(name).strip().lower()
    entry = REGISTRY.get(key)
    if entry is None:
        raise ValueError(
            f"no pretrained model called {name!r}: use one of {', '.join(REGISTRY)} "
            "(`napari-sartorius pretrained list`)"
        )
    if kinds is not None and entry.kind not in kinds:
        what = {"detectron2": "a detection model", "imagenet": "ImageNet body weights (for init-model --imagenet)"}
        raise ValueError(f"{entry.name} is {what[entry.kind]}; here {' or '.join(what[k] for k in kinds)} is needed")
    return entry
