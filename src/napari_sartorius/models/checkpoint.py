"""The project's checkpoint format: weights plus everything needed to rebuild and run the model.

A checkpoint is a ``torch.save``'d dict holding only plain data, so that it loads with
``torch.load(..., weights_only=True)`` (no pickled code is ever run)::

    {
        "format": "napari-sartorius-maskrcnn",
        "format_version": 1,
        "config": "<ModelConfig as JSON>",       # architecture, classes, normalisation, anchors, ...
        "extra": "<JSON object>",                # training provenance, metrics, ... (free)
        "state_dict": {name: tensor},            # model.state_dict(), CPU tensors
    }

It is written atomically (a temporary file in the same folder, then ``os.replace``), so an interrupted
save never leaves a half-written checkpoint under the final name.

:func:`load_checkpoint` also accepts a plain torchvision Mask R-CNN state dict (what
``torch.save(maskrcnn_resnet50_fpn(...).state_dict(), path)`` writes, also under a ``"model"`` key):
its body depth (ResNet-50/101, ResNeXt-101 32x8d) is read off the weights and it is wrapped with
torchvision's settings (see :func:`torchvision_config`).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..cell_types import DEFAULT_CLASSES
from ..io.atomic import atomic_path
from .checkpoint_file import CheckpointError, check_checkpoint_file
from .config import TORCHVISION_MEAN_RGB, TORCHVISION_STD_RGB, ModelConfig, check_arch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "check_checkpoint_file",
    "LoadReport",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "load_state",
    "init_checkpoint",
    "torchvision_config",
]

CHECKPOINT_FORMAT = "napari-sartorius-maskrcnn"
CHECKPOINT_VERSION = 1


# -- writing ---------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig, *, extra: Mapping | None = None) -> Path:
    """Write ``model``'s weights with ``config`` (and JSON-able ``extra``) to ``path`` atomically.

    Returns the path written. Raises ValueError if ``extra`` is not JSON-serialisable.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    try:
        extra_json = json.dumps(dict(extra or {}), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint extra data must be JSON-serialisable ({exc})") from exc
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": config.to_json(),
        "extra": extra_json,
        "state_dict": state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # ordinary permissions (0666 minus the umask), never a half-written file
        torch.save(payload, tmp)
    return path


# -- reading ---------------------------------------------------------------------------------------
def _torch_load(path: Path, map_location) -> Any:
    check_checkpoint_file(path)  # a text file, a plain pickle, ...: one line saying what it is
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" (it holds a pickled {m.group(1)})" if m else ""
        raise CheckpointError(
            f"{path}: refused to load{what}: checkpoints are read with torch.load(weights_only=True), "
            "which never runs code from the file. Save only tensors and plain data (a state dict), or "
            "convert detectron2 files with `napari-sartorius import-detectron2`, MMDetection files with "
            "`napari-sartorius import-mmdet`"
        ) from exc
    except (EOFError, RuntimeError, zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else 'empty file'}); copy or save it again"
        ) from exc


def _is_d2_state(state: Mapping) -> bool:
    return any(k.startswith(("backbone.bottom_up.", "proposal_generator.")) for k in state)


def _is_torchvision_state(state: Mapping) -> bool:
    return "roi_heads.box_predictor.cls_score.weight" in state and "backbone.body.conv1.weight" in state


def read_checkpoint(path: str | Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """The ``(state_dict, config, extra)`` of a checkpoint, without building the model.

    Plain torchvision Mask R-CNN state dicts are recognised (config from :func:`torchvision_config`,
    extra ``{}``). Raises FileNotFoundError or :class:`CheckpointError`.
    """
    path = Path(path)
    data = _torch_load(path, map_location)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a napari-sartorius checkpoint")
    if data.get("format") == CHECKPOINT_FORMAT:
        version = data.get("format_version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{path} has checkpoint format version {version!r}; this napari-sartorius reads up to "
                f"{CHECKPOINT_VERSION}: update napari-sartorius"
            )
        try:
            config = ModelConfig.from_json(data["config"])
            extra = json.loads(data.get("extra") or "{}")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: its model settings are invalid ({exc})") from exc
        state = data.get("state_dict")
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: its 'state_dict' entry is not a dict of tensors")
        return dict(state), config, extra
    state = data["model"] if isinstance(data.get("model"), Mapping) else data
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        if _is_d2_state(state):
            raise CheckpointError(
                f"{path} is a detectron2 checkpoint: convert it first with "
                "`napari-sartorius import-detectron2 WEIGHTS --config CONFIG.yaml --out CKPT`"
            )
        if _is_torchvision_state(state):
            return dict(state), torchvision_config(state, source=path), {}
    if isinstance(data.get("state_dict"), Mapping) and any(str(k).startswith("rpn_head.") for k in data["state_dict"]):
        raise CheckpointError(
            f"{path} is an MMDetection checkpoint: convert it first with "
            "`napari-sartorius import-mmdet WEIGHTS [--config CONFIG.py] --out CKPT`"
        )
    keys = ", ".join(map(str, list(data)[:6]))
    raise CheckpointError(
        f"{path} is not a napari-sartorius checkpoint (keys: {keys}); create one with "
        "`napari-sartorius init-model`, `train` or `import-detectron2`"
    )


def torchvision_config(
    state: Mapping[str, torch.Tensor], *, class_names: Sequence[str] | None = None, source: str | Path = "state dict"
) -> ModelConfig:
    """The :class:`ModelConfig` of a plain torchvision Mask R-CNN state dict.

    The body is read off the weights (ResNet-50 -> ``mask_rcnn_R_50_FPN``, ResNet-101 ->
    ``mask_rcnn_R_101_FPN``, ResNeXt-101 32x8d -> ``mask_rcnn_X_101_32x8d_FPN``). Settings are
    torchvision's ``maskrcnn_resnet50_fpn`` defaults where they shape the network's numbers: RGB input,
    ImageNet mean/std, anchors 32-512 with ratios 0.5/1/2 rounded to integers, RoIAlign not aligned with
    2 samples per bin, test size 800/1333, stride in the 3x3 conv. Counts and thresholds (proposals,
    1000 detections per image, score threshold 0.05) are the project's. Class names: ``class_names``,
    else COCO's for 91 outputs, the Sartorius types for 4, ``class_1..`` otherwise.
    """
    cls = state["roi_heads.box_predictor.cls_score.weight"]
    num_fg = int(cls.shape[0]) - 1
    layer3 = {k.split(".")[3] for k in state if k.startswith("backbone.body.layer3.")}
    groups_conv = state.get("backbone.body.layer1.0.conv2.weight")
    if len(layer3) == 6:
        arch = "mask_rcnn_R_50_FPN"
    elif len(layer3) == 23:
        wide = groups_conv is not None and groups_conv.shape[1] != groups_conv.shape[0]
        arch = "mask_rcnn_X_101_32x8d_FPN" if wide else "mask_rcnn_R_101_FPN"
    else:
        raise CheckpointError(f"{source}: a torchvision Mask R-CNN with an unsupported body ({len(layer3)} res4 blocks)")
    if "roi_heads.box_head.fc6.weight" not in state or "backbone.fpn.inner_blocks.0.0.weight" not in state:
        raise CheckpointError(
            f"{source}: only torchvision's maskrcnn_resnet50_fpn layout (FPN, 2-fc box head) loads as a plain "
            "state dict; this one has another head (e.g. maskrcnn_resnet50_fpn_v2)"
        )
    num_anchors = int(state["rpn.head.cls_logits.weight"].shape[0])
    if num_anchors == 3:
        anchors = dict(anchor_sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=(0.5, 1.0, 2.0))
    elif num_anchors == len(ModelConfig.__dataclass_fields__["aspect_ratios"].default):
        anchors = {}  # the project's cell anchors: the only 5-ratio set we know of
    else:
        raise CheckpointError(
            f"{source}: the RPN head predicts {num_anchors} anchors per location; only torchvision's 3 "
            "(sizes 32-512, ratios 0.5/1/2) or this project's 5 are known: export it as a napari-sartorius checkpoint"
        )
    if class_names is None:
        if num_fg == 90:
            class_names = _coco_names()
        elif num_fg == len(DEFAULT_CLASSES):
            class_names = DEFAULT_CLASSES
        else:
            class_names = tuple(f"class_{i}" for i in range(1, num_fg + 1))
    if len(class_names) != num_fg:
        raise CheckpointError(f"{source} has {num_fg} classes, {len(class_names)} class names were given")
    return ModelConfig(
        arch,
        class_names=tuple(class_names),
        input_format="RGB",
        pixel_mean=TORCHVISION_MEAN_RGB,
        pixel_std=TORCHVISION_STD_RGB,
        min_size_test=800,
        max_size_test=1333,
        min_size_train=(800,),
        max_size_train=1333,
        stride_in_1x1=False,
        round_anchors=True,
        pooler_aligned=False,
        pooler_sampling_ratio=2,
        provenance={"source": "torchvision state dict", "file": Path(str(source)).name},
        **anchors,
    )


def _coco_names() -> tuple[str, ...]:
    from torchvision.models.detection.mask_rcnn import MaskRCNN_ResNet50_FPN_Weights

    cats = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:]
    return tuple(c if c != "N/A" else f"N/A_{i}" for i, c in enumerate(cats, start=1))


@dataclass
class LoadReport:
    """What :func:`load_state` did: keys the model kept at their initial values (``missing``), keys of
    the file the model has no place for (``unexpected``), and keys skipped for their shape."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True, source: str | Path = "checkpoint"
) -> LoadReport:
    """Copy ``state`` into ``model``.

    ``strict=True``: every key must exist with the same shape, else :class:`CheckpointError` naming
    ``source`` (for a class-count mismatch it says so and how many). ``strict=False`` (fine-tuning from
    a model with other classes): tensors of another shape and keys without a place are skipped and
    reported; ``BatchNorm``'s ``num_batches_tracked`` counters are always ignored.
    """
    target = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    report = LoadReport(
        missing=[k for k in target if k not in state and not k.endswith("num_batches_tracked")],  # BN (ResNeSt)
        unexpected=[k for k in state if k not in target],
        mismatched=[k for k in state if k in target and tuple(state[k].shape) != tuple(target[k].shape)],
    )
    if strict and not report.complete:
        cls_key = next((k for k in report.mismatched if k.endswith("cls_score.weight")), None)
        if cls_key is not None:
            have, want = state[cls_key].shape[0] - 1, target[cls_key].shape[0] - 1
            raise CheckpointError(
                f"{source} has {have} classes, the model {want}: give the checkpoint's class names, or "
                "load it with strict=False to fine-tune (the class-specific layers start fresh)"
            )
        parts = []
        for name, keys in (("missing", report.missing), ("unexpected", report.unexpected), ("mis-shaped", report.mismatched)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    skip = set(report.mismatched)
    with torch.no_grad():
        for k, v in state.items():
            if k in target and k not in skip:
                target[k].copy_(v.to(dtype=target[k].dtype))
    return report


def load_checkpoint(
    path: str | Path,
    map_location="cpu",
    *,
    arch: str | None = None,
    class_names: Sequence[str] | None = None,
    strict: bool = True,
) -> tuple[nn.Module, ModelConfig]:
    """Rebuild the model of a checkpoint and load its weights.

    Args:
        path: a napari-sartorius checkpoint, or a plain torchvision Mask R-CNN state dict.
        map_location: where tensors are loaded (the model is built on the CPU, then its weights copied).
        arch: if given, the checkpoint must be of this architecture.
        class_names: if given, the checkpoint must have as many classes; the names replace its names.
        strict: see :func:`load_state`.

    Returns:
        ``(model, config)``; the model is in eval mode.

    Raises:
        FileNotFoundError; :class:`CheckpointError` (a ValueError) for a truncated or foreign file, a file
        with pickled objects, another architecture or class count than asked.
    """
    path = Path(path)
    state, config, _extra = read_checkpoint(path, map_location)
    if arch is not None and check_arch(arch) != config.arch:
        raise CheckpointError(f"{path} holds a {config.arch} model, not {arch}: pick a {arch} checkpoint or drop the architecture")
    if class_names is not None:
        class_names = tuple(class_names)
        if len(class_names) != config.num_classes:
            raise CheckpointError(
                f"{path} has {config.num_classes} classes ({', '.join(config.class_names)}), "
                f"{len(class_names)} were asked for ({', '.join(class_names)})"
            )
        config = config.replace(class_names=class_names)
    from .architectures import build_model

    model = build_model(config)
    load_state(model, state, strict=strict, source=path)
    model.eval()
    return model, config


def init_checkpoint(
    arch: str,
    out: str | Path,
    class_names: Sequence[str] = DEFAULT_CLASSES,
    imagenet_weights: str | Path | None = None,
    *,
    config: ModelConfig | None = None,
    seed: int | None = 0,
) -> Path:
    """Write a fresh checkpoint of ``arch``: randomly initialised, or with the body's ImageNet weights
    from ``imagenet_weights`` (a torchvision ResNet/ResNeXt state dict file the user has).

    ``config`` overrides the default settings (its ``arch`` must be ``arch``). Returns ``out``.
    """
    from .architectures import build_model

    check_arch(arch)
    if config is None:
        config = ModelConfig(arch, class_names=tuple(class_names))
    elif config.arch != arch:
        raise ValueError(f"config is for {config.arch}, not {arch}")
    provenance = dict(config.provenance)
    provenance.update(
        {
            "source": "init",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "imagenet_weights": Path(imagenet_weights).name if imagenet_weights else None,
            "torch": torch.__version__,
        }
    )
    config = config.replace(provenance=provenance)
    with torch.random.fork_rng(devices=[]):  # a reproducible init without touching the caller's RNG
        if seed is not None:
            torch.manual_seed(seed)
        model = build_model(config, weights_backbone=imagenet_weights)
    return save_checkpoint(out, model, config)
