"""Import MMDetection (2.x / 3.x) Mask R-CNN and Cascade Mask R-CNN checkpoints without MMDetection.

Reading never runs code from the file: the checkpoint goes through ``torch.load(weights_only=True)``.
mmengine's training checkpoints also pickle its log buffers (``message_hub``: ``HistoryBuffer`` objects
holding numpy arrays); those few inert classes are rebuilt as empty stand-ins through
``torch.serialization.safe_globals`` and dropped. Any other class in the file (a whole pickled
``MaskRCNN``, an ``nn.Module``) is refused by name, before anything is unpickled.

The config is the ``.py`` file given, or the text MMDetection stores in the checkpoint
(``meta['config']`` in 2.x, ``meta['cfg']`` in 3.x); it is parsed as data (:mod:`.mmdet_config`). Class
names come from the caller, else ``meta['CLASSES']`` / ``meta['dataset_meta']['classes']``.

Name mapping onto the project model (:mod:`.architectures`): ``backbone.*`` -> ``backbone.body.*``
(MMDetection's ResNet uses torchvision's names; a deformable ``conv2.conv_offset`` -> ``conv2.offset``), ``neck.lateral_convs.i.conv`` / ``neck.fpn_convs.i.conv``
-> ``backbone.fpn.inner_blocks.i.0`` / ``layer_blocks.i.0``, ``rpn_head.rpn_conv/rpn_cls/rpn_reg`` ->
``rpn.head.conv.0.0/cls_logits/bbox_pred``, ``roi_head.bbox_head.shared_fcs.0/1`` -> ``box_head.fc6/fc7``,
``fc_cls``/``fc_reg`` -> ``box_predictor.cls_score``/``bbox_pred``, ``roi_head.mask_head.convs.i.conv`` ->
``mask_head.i.0``, ``upsample`` -> ``mask_predictor.conv5_mask``, ``conv_logits`` -> ``mask_fcn_logits``.
Cascade Mask R-CNN (:mod:`.mmdet_cascade`): the same per stage s, ``roi_head.bbox_head.{s}.*`` ->
``roi_heads.box_head.{s}.*`` / ``roi_heads.box_predictor.{s}.*``, ``roi_head.mask_head.{s}.*`` ->
``roi_heads.mask_head.{s}.*`` / ``roi_heads.mask_predictor.{s}.*`` (2.x and 3.x use the same names).

Tensor conversions (each tested in ``tests/models/test_mmdet_import.py``, per cascade stage in
``test_mmdet_cascade_import.py``):

* classifier rows: MMDetection puts background **last** (``fc_cls`` ``(K + 1, D)``), the project first;
* ``fc_reg`` ``(4 K, D)`` -> a zero background block first; class-agnostic ``(4, D)`` -> repeated per class
  (a cascade stage's class-agnostic ``(4, D)`` is kept: the project's stages are class-agnostic too);
  ``conv_logits`` ``(K, ...)`` -> a zero background channel first; class-agnostic ``(1, ...)`` -> repeated;
* box-coder ``target_means`` are folded into the regression biases (``b + mean / std`` for the R-CNN
  head, whose ``target_stds`` become ``bbox_reg_weights = 1 / std``; each cascade stage with its own
  means and stds, which become that stage's ``cascade_bbox_reg_weights``); the RPN's ``target_stds`` and
  ``target_means`` are folded into ``rpn_reg`` (rows scaled by std, bias ``b * std + mean``), since the
  project's RPN decodes with unit weights;
* anchors: with several ``scales`` and ``ratios`` per level and ``scale_major=True`` (MMDetection's
  default: ratio-major order) the RPN output channels are permuted into the project's size-major order.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..cell_types import DEFAULT_CLASSES
from .detectron2_import import ImportReport, _is_torch_file, _numpy_safe_globals, raise_for_unplaced

__all__ = [
    "MMDetImportError",
    "load_mmdet_checkpoint",
    "mmdet_to_project_name",
    "convert_mmdet_state",
    "mmdet_class_names",
    "load_mmdet_model",
    "import_mmdet",
    "is_mmdet_state",
]


class MMDetImportError(ValueError):
    """An MMDetection checkpoint cannot be turned into a project model (the message says why)."""


class _InertLogObject:
    """Stand-in for mmengine's pickled log objects: keeps their state as a dict, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _inert_getattr(obj, name, *default):
    """Stand-in for ``getattr`` in mmengine's pickled log buffers (they pickle bound statistics
    methods as ``getattr(buffer, 'mean')``): returns a placeholder, looks nothing up."""
    return _InertLogObject(name)


# Globals mmengine pickles beside the weights of a training checkpoint (its log buffers), rebuilt as
# inert stand-ins; ``builtins.getattr`` is accepted only beside them, and never really called.
_INERT_GLOBALS = {
    "mmengine.logging.history_buffer.HistoryBuffer": _InertLogObject,
    "mmengine.logging.message_hub.MessageHub": _InertLogObject,
    "builtins.getattr": _inert_getattr,
}
_MODEL_MODULES = ("mmdet.", "mmcv.", "mmengine.model", "torch.nn.modules", "torch.nn.parallel")


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be listed
        return []


def load_mmdet_checkpoint(weights_path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an MMDetection checkpoint's weights and ``meta`` without running code from the file.

    Args:
        weights_path: a ``.pth`` written by MMDetection 2.x (``{"meta": {...}, "state_dict": {...},
            "optimizer": ...}``) or 3.x / mmengine (the same plus ``message_hub``, ``param_schedulers``),
            or a bare state dict.

    Returns:
        ``({parameter/buffer name: CPU tensor}, meta)``; a ``module.`` prefix (distributed training) is
        removed; ``meta`` is ``{}`` when the file has none.

    Raises:
        FileNotFoundError: no such file.
        MMDetImportError: a whole pickled model or other classes (named), a truncated file, no weights.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"MMDetection checkpoint {path} not found")
    if not _is_torch_file(path):
        raise MMDetImportError(f"{path} is not a PyTorch checkpoint (MMDetection saves .pth files with torch.save)")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as first:
            found = _unsafe_globals(path)
            models = [g for g in found if g.startswith(_MODEL_MODULES)]
            if models:
                raise MMDetImportError(
                    f"{path} holds a whole pickled model ({', '.join(sorted(set(models))[:3])}), which only "
                    "unpickling code could rebuild; it was not loaded. Save its weights with "
                    "torch.save({'state_dict': model.state_dict(), 'meta': ...}) and import that"
                ) from first
            other = [g for g in found if g not in _INERT_GLOBALS and not g.startswith("numpy")]
            if not found or other or set(found) <= {"builtins.getattr"}:
                what = ", ".join(sorted(set(other))[:4]) or str(first).splitlines()[0][:120]
                raise MMDetImportError(f"{path}: refused to unpickle ({what}); only tensors and plain data are read") from first
            allowed: list[Any] = list(_numpy_safe_globals())
            allowed += [(stub, name) for name, stub in _INERT_GLOBALS.items()]
            with torch.serialization.safe_globals(allowed):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except MMDetImportError:
        raise
    except pickle.UnpicklingError as exc:
        raise MMDetImportError(f"{path}: refused to unpickle ({str(exc).splitlines()[0][:160]})") from exc
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MMDetImportError(f"{path} is truncated or not a checkpoint ({exc})") from exc
    if not isinstance(data, Mapping):
        raise MMDetImportError(f"{path} holds a {type(data).__name__}, not an MMDetection checkpoint dict")
    meta = data.get("meta") if isinstance(data.get("meta"), Mapping) else {}
    state = data.get("state_dict") if isinstance(data.get("state_dict"), Mapping) else None
    if state is None and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        state = data
    if state is None:
        raise MMDetImportError(f"{path}: no 'state_dict' entry with the weights (keys: {', '.join(map(str, list(data)[:8]))})")
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise MMDetImportError(f"{path}: state_dict entry {name!r} is not a named tensor")
        out[name[len("module."):] if name.startswith("module.") else name] = value.detach().cpu()
    return out, dict(meta)


def is_mmdet_state(state: Mapping) -> bool:
    """True for an MMDetection two-stage detector's state dict (``rpn_head.*`` and ``roi_head.*`` names)."""
    return any(k.startswith("rpn_head.") for k in state) and any(k.startswith(("roi_head.", "neck.")) for k in state)


def mmdet_class_names(meta: Mapping) -> tuple[str, ...] | None:
    """The class names stored in a checkpoint's meta (2.x ``CLASSES``, 3.x ``dataset_meta.classes``)."""
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if isinstance(names, str):
        names = (names,)
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _config_text(meta: Mapping) -> str | None:
    for key in ("cfg", "config"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key]
    return None


# -- name mapping -----------------------------------------------------------------------------------
_RULES = [
    (re.compile(r"^backbone\.(layer\d\.\d+\.conv2)\.conv_offset\.(weight|bias)$"), r"backbone.body.\1.offset.\2"),
    (re.compile(r"^backbone\.(.+)$"), r"backbone.body.\1"),
    (re.compile(r"^neck\.lateral_convs\.(\d)\.conv\.(weight|bias)$"), r"backbone.fpn.inner_blocks.\1.0.\2"),
    (re.compile(r"^neck\.fpn_convs\.(\d)\.conv\.(weight|bias)$"), r"backbone.fpn.layer_blocks.\1.0.\2"),
    (re.compile(r"^rpn_head\.rpn_conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^rpn_head\.rpn_cls\.(weight|bias)$"), r"rpn.head.cls_logits.\1"),
    (re.compile(r"^rpn_head\.rpn_reg\.(weight|bias)$"), r"rpn.head.bbox_pred.\1"),
    (re.compile(r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$"), r"roi_heads.box_head.fc6.\1"),
    (re.compile(r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$"), r"roi_heads.box_head.fc7.\1"),
    (re.compile(r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$"), r"roi_heads.box_predictor.cls_score.\1"),
    (re.compile(r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$"), r"roi_heads.box_predictor.bbox_pred.\1"),
    (re.compile(r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)$"), r"roi_heads.mask_head.\1.0.\2"),
    (re.compile(r"^roi_head\.mask_head\.upsample\.(weight|bias)$"), r"roi_heads.mask_predictor.conv5_mask.\1"),
    (re.compile(r"^roi_head\.mask_head\.conv_logits\.(weight|bias)$"), r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
    # Cascade Mask R-CNN: the same heads once per stage s (2.x and 3.x names)
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.shared_fcs\.0\.(weight|bias)$"), r"roi_heads.box_head.\1.fc6.\2"),
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.shared_fcs\.1\.(weight|bias)$"), r"roi_heads.box_head.\1.fc7.\2"),
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.fc_cls\.(weight|bias)$"), r"roi_heads.box_predictor.\1.cls_score.\2"),
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.fc_reg\.(weight|bias)$"), r"roi_heads.box_predictor.\1.bbox_pred.\2"),
    (re.compile(r"^roi_head\.mask_head\.(\d+)\.convs\.(\d+)\.conv\.(weight|bias)$"), r"roi_heads.mask_head.\1.\2.0.\3"),
    (re.compile(r"^roi_head\.mask_head\.(\d+)\.upsample\.(weight|bias)$"), r"roi_heads.mask_predictor.\1.conv5_mask.\2"),
    (re.compile(r"^roi_head\.mask_head\.(\d+)\.conv_logits\.(weight|bias)$"), r"roi_heads.mask_predictor.\1.mask_fcn_logits.\2"),
]
_STAGE_REG_BIAS = re.compile(r"^roi_heads\.box_predictor\.(\d+)\.bbox_pred\.bias$")
_IGNORABLE = [
    (re.compile(r"(^|\.)num_batches_tracked$"), "BatchNorm step counter (unused at inference)"),
    (re.compile(r"^ema_"), "exponential-moving-average copy kept by MMDetection's EMA hook"),
    (re.compile(r"^data_preprocessor\."), "input normalisation (taken from the config)"),
]


def mmdet_to_project_name(name: str) -> str | None:
    """The project parameter name of MMDetection parameter ``name`` (``None`` if it has none)."""
    for pattern, repl in _RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def _anchor_permutation(num_scales: int, num_ratios: int) -> torch.Tensor:
    """Project anchor ``s * R + r`` (size-major) takes MMDetection's scale-major anchor ``r * S + s``."""
    return torch.tensor([r * num_scales + s for s in range(num_scales) for r in range(num_ratios)])


def _convert_rpn(new: str, value: torch.Tensor, facts: Mapping) -> torch.Tensor:
    a_scales, a_ratios = facts["num_scales"], facts["num_ratios"]
    is_reg = new.startswith("rpn.head.bbox_pred.")
    if facts["scale_major"] and a_scales > 1 and a_ratios > 1:
        perm = _anchor_permutation(a_scales, a_ratios)
        if is_reg:
            perm = (perm[:, None] * 4 + torch.arange(4)[None, :]).reshape(-1)
        if value.shape[0] == len(perm):
            value = value[perm]
    if is_reg:
        std = torch.tensor(facts["rpn_stds"], dtype=value.dtype)
        mean = torch.tensor(facts["rpn_means"], dtype=value.dtype)
        rows = value.shape[0] // 4
        v = value.reshape((rows, 4) + tuple(value.shape[1:]))
        value = (v * std.view((1, 4) + (1,) * (value.dim() - 1))).reshape(value.shape)
        if new.endswith(".bias"):
            value = value + mean.repeat(rows)
    return value


def _fold_box_means(value: torch.Tensor, facts: Mapping, stage: int | None = None) -> torch.Tensor:
    """``fc_reg`` bias + mean / std for each of its 4-row blocks (weights unchanged); ``stage``: the
    cascade stage whose coder applies."""
    means = facts["bbox_means"] if stage is None else facts["stage_bbox_means"][stage]
    stds = facts["bbox_stds"] if stage is None else facts["stage_bbox_stds"][stage]
    offset = torch.tensor([m / s for m, s in zip(means, stds)], dtype=value.dtype)
    if value.shape[0] % 4:
        return value
    return value + offset.repeat(value.shape[0] // 4)


def _class_rows(new: str, value: torch.Tensor, want: torch.Size, k: int, source: str) -> torch.Tensor:
    """MMDetection's class layout -> the project's (see the module docstring)."""
    rows = value.shape[0]

    def fail(expected: str) -> MMDetImportError:
        return MMDetImportError(
            f"{source}: {new} has {rows} rows, expected {expected} for {k} class(es); the checkpoint was "
            "trained with another number of classes: pass that many class names"
        )

    if ".cls_score." in new:
        if rows != k + 1:
            raise fail(f"{k + 1} (K + 1, background last)")
        return torch.cat([value[k:], value[:k]])
    if ".bbox_pred." in new:
        if rows == 4 and want[0] == 4:  # a cascade stage: class-agnostic on both sides
            return value
        if rows == 4:
            return value.repeat((k + 1,) + (1,) * (value.dim() - 1))
        if rows != 4 * k:
            raise fail(f"{4 * k} (4 K) or 4 (class-agnostic)")
        return torch.cat([torch.zeros_like(value[:4]), value])
    if ".mask_fcn_logits." in new:
        if rows == 1:
            return value.repeat((k + 1,) + (1,) * (value.dim() - 1))
        if rows != k:
            raise fail(f"{k} (K) or 1 (class-agnostic)")
        return torch.cat([torch.zeros_like(value[:1]), value])
    return value


def convert_mmdet_state(
    mm_state: Mapping[str, torch.Tensor],
    target_state: Mapping[str, torch.Tensor],
    facts: Mapping,
    *,
    num_classes: int,
    source: str = "checkpoint",
) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Rename and convert an MMDetection state dict into the project model's layout.

    Args:
        mm_state: ``{MMDetection name: tensor}`` (:func:`load_mmdet_checkpoint`).
        target_state: the project model's ``state_dict()`` (names and shapes to fill).
        facts: the conversion facts of :func:`.mmdet_config.mmdet_to_model_config`.
        num_classes: K foreground classes.
        source: the file name, for messages.

    Returns:
        ``(state, report)``: ``state`` has exactly the keys of ``target_state`` (load with
        ``strict=True``); ``report.mapped`` is ``{project name: MMDetection name}``.

    Raises:
        MMDetImportError: tensors that map nowhere, project tensors nothing fills, wrong shapes or a
            class-count mismatch; the message lists the names.
    """
    report = ImportReport()
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    bad_shapes: list[str] = []
    for name, value in mm_state.items():
        reason = next((why for pat, why in _IGNORABLE if pat.search(name)), None)
        if reason is not None:
            report.ignored[name] = reason
            continue
        new = mmdet_to_project_name(name)
        if new is None or new not in target_state:
            unmapped.append(name)
            continue
        want = target_state[new]
        value = value.to(torch.float32) if value.is_floating_point() else value
        if new.startswith("rpn.head.") and not new.startswith("rpn.head.conv."):
            value = _convert_rpn(new, value, facts)
        if new == "roi_heads.box_predictor.bbox_pred.bias":
            value = _fold_box_means(value, facts)
        stage = _STAGE_REG_BIAS.match(new)
        if stage is not None:  # a cascade stage's fc_reg: that stage's coder
            value = _fold_box_means(value, facts, int(stage.group(1)))
        if new.startswith("roi_heads.box_predictor.") or ".mask_fcn_logits." in new:
            value = _class_rows(new, value, want.shape, num_classes, source)
        if tuple(value.shape) != tuple(want.shape):
            bad_shapes.append(f"{name} {tuple(value.shape)} -> {new} {tuple(want.shape)}")
            continue
        out[new] = value.to(dtype=want.dtype)
        report.mapped[new] = name
    raise_for_unplaced(MMDetImportError, source, "MMDetection", unmapped, bad_shapes, config="its config's")
    missing = [k for k in target_state if k not in out]
    if missing:
        raise MMDetImportError(
            f"{source}: {len(missing)} project tensor(s) are not in the checkpoint (e.g. "
            f"{', '.join(missing[:6])}); the checkpoint does not match its config's architecture"
        )
    return out, report


# -- whole models -----------------------------------------------------------------------------------
def _resolve_classes(class_names, meta: Mapping, k: int, source: str, warnings: list[str]) -> tuple[str, ...]:
    if class_names:
        return tuple(str(c) for c in class_names)
    stored = mmdet_class_names(meta)
    if stored is not None:
        return stored
    if k == len(DEFAULT_CLASSES):
        warnings.append(f"{source} stores no class names: assumed {', '.join(DEFAULT_CLASSES)} (pass --classes to name them)")
        return DEFAULT_CLASSES
    raise MMDetImportError(f"{source} stores no class names and has {k} classes: pass {k} names in training order (--classes)")


def load_mmdet_model(
    weights_path: str | Path,
    config_path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
):
    """Build the project model of an MMDetection config and fill it with the checkpoint's weights.

    Args:
        weights_path: the MMDetection ``.pth``.
        config_path: its ``.py`` config, or a bundled model-zoo name; None takes the config text
            stored in the checkpoint's meta.
        class_names: the K classes in training order; None takes the names stored in the checkpoint.

    Returns:
        ``(model, config, report)``: a ``CellMaskRCNN`` in eval mode, its ``ModelConfig`` and the
        :class:`~.detectron2_import.ImportReport` (``warnings`` filled).

    Raises:
        FileNotFoundError, :class:`MMDetImportError`, :class:`~.mmdet_config.UnsupportedMMDetConfigError`,
        :class:`~.mmdet_pyconfig.ConfigNeedsExecutionError` (all ``ValueError`` but the first).
    """
    from .architectures import build_model
    from .mmdet_config import load_mmdet_config, mmdet_to_model_config

    source = str(weights_path)
    state, meta = load_mmdet_checkpoint(weights_path)
    if not is_mmdet_state(state):
        raise MMDetImportError(f"{source} is not an MMDetection two-stage detector (no rpn_head.* / roi_head.* weights)")
    if config_path is not None:
        cfg = load_mmdet_config(config_path)
        cfg_source = str(config_path)
    else:
        text = _config_text(meta)
        if text is None:
            raise MMDetImportError(
                f"{source} has no config in its meta: import it with the .py config it was trained with, "
                "`napari-sartorius import-mmdet WEIGHTS --config CONFIG.py --out CKPT`"
            )
        cfg = load_mmdet_config(text=text, source=f"{Path(source).name} meta config")
        cfg_source = "checkpoint meta"
    warnings: list[str] = []
    k = _num_classes(cfg)
    names = _resolve_classes(class_names, meta, k, source, warnings)
    prov = {"mmdet_weights": Path(source).name, "mmdet_config": cfg_source}
    config, facts = mmdet_to_model_config(cfg, names, provenance=prov)
    warnings += facts["warnings"]
    model = build_model(config)
    converted, report = convert_mmdet_state(state, model.state_dict(), facts, num_classes=config.num_classes, source=source)
    model.load_state_dict(converted, strict=True)
    model.eval()
    report.warnings.extend(warnings)
    return model, config, report


def _num_classes(cfg: Mapping) -> int:
    try:
        head = cfg["model"]["roi_head"]["bbox_head"]
        head = head[-1] if isinstance(head, (list, tuple)) else head
        return int(head.get("num_classes", 80))
    except (KeyError, TypeError, AttributeError):
        return len(DEFAULT_CLASSES)


def import_mmdet(
    weights_path: str | Path,
    out_path: str | Path,
    config_path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Turn an MMDetection checkpoint into a project checkpoint at ``out_path`` (written atomically).

    The project checkpoint keeps MMDetection's input convention (channel order, mean/std), anchors,
    test size and thresholds; the import's facts (source files, tensors ignored, warnings) go into its
    ``extra`` data, and the warnings are also issued as :class:`UserWarning`.

    Returns:
        The path written.
    """
    import warnings

    from .checkpoint import save_checkpoint

    model, config, report = load_mmdet_model(weights_path, config_path, class_names)
    for message in report.warnings:
        warnings.warn(f"{weights_path}: {message}", UserWarning, stacklevel=2)
    extra = {
        "imported_from": {
            "mmdet_weights": str(weights_path),
            "mmdet_config": str(config_path) if config_path is not None else "checkpoint meta",
            "tensors": len(report.mapped),
            "ignored": dict(collections.Counter(report.ignored.values())),
            "warnings": report.warnings,
        }
    }
    return save_checkpoint(out_path, model, config, extra=extra)
