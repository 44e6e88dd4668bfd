"""Import detectron2 checkpoints (``.pth`` and model-zoo ``.pkl``) without detectron2.

Why over 500 lines: the name mapping of every detectron2 tensor onto the project's models and the
conversions that go with it are one table-driven procedure; the config side is in ``d2_config``.

Reading never runs code from the file: ``.pth`` files go through ``torch.load(weights_only=True)``,
``.pkl`` files through :class:`RestrictedUnpickler`, which only reconstructs numpy arrays, numpy
scalars, dicts/lists and ``collections.OrderedDict``.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..cell_types import DEFAULT_CLASSES

__all__ = [
    "Detectron2ImportError",
    "RestrictedUnpickler",
    "restricted_pickle_load",
    "load_detectron2_state",
    "d2_to_project_name",
    "convert_detectron2_state",
    "ImportReport",
    "detectron2_model_config",
    "load_detectron2_model",
    "import_detectron2",
]


class Detectron2ImportError(ValueError):
    """A detectron2 checkpoint cannot be turned into a project model (the message says why)."""


# (module, name) pairs a numpy-array pickle needs. numpy 2 writes ``numpy._core``; files written with
# numpy 1 name ``numpy.core``. ``_codecs.encode`` rebuilds bytes in protocol-2 pickles (a str -> bytes
# conversion, nothing more).
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}
_NUMPY_RENAMES = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only numpy arrays/scalars and plain containers.

    Any other global (``os.system``, ``builtins.eval``, a class of some package, ...) raises
    :class:`pickle.UnpicklingError` before it is imported, so a hostile file cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        target = (_NUMPY_RENAMES.get(module, module), name)
        if target not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in a "
                "detectron2 .pkl checkpoint"
            )
        if target[0].startswith("numpy._core") and not hasattr(np, "_core"):  # numpy < 2
            target = (target[0].replace("numpy._core", "numpy.core"), name)
        return super().find_class(*target)


def restricted_pickle_load(fileobj) -> Any:
    """Unpickle ``fileobj`` with :class:`RestrictedUnpickler` (latin1 for Python-2 era pickles)."""
    return RestrictedUnpickler(fileobj, encoding="latin1").load()


# torch.save's legacy (non-zip) format starts with its pickled magic number 0x1950A86A20F9469CFC6C.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


def _is_torch_file(path: Path) -> bool:
    """True for files written by ``torch.save`` (zip or legacy format), False for plain pickles."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    return head.startswith(b"PK\x03\x04") or head == _LEGACY_TORCH_MAGIC


def _to_tensor_dict(weights: Mapping, source: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        if not isinstance(name, str):
            raise Detectron2ImportError(f"{source}: weight name {name!r} is not a string")
        if isinstance(value, torch.Tensor):
            out[name] = value.detach().cpu()
        elif isinstance(value, np.ndarray):
            if value.dtype == object:
                raise Detectron2ImportError(f"{source}: weight {name} is an object array, not numbers")
            out[name] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, (np.generic, int, float)):
            out[name] = torch.as_tensor(np.asarray(value))
        else:
            raise Detectron2ImportError(
                f"{source}: weight {name} is a {type(value).__name__}, expected an array"
            )
    return out


def _unwrap(data: Any, source: Path) -> Mapping:
    """The state dict inside a loaded detectron2 checkpoint object."""
    if not isinstance(data, Mapping):
        raise Detectron2ImportError(f"{source} holds a {type(data).__name__}, not a detectron2 checkpoint dict")
    if "blobs" in data:
        raise Detectron2ImportError(
            f"{source} is a Caffe2/Detectron1 blob file (ImageNet backbone or Detectron1 model); "
            "only detectron2-trained checkpoints (names like backbone.bottom_up.res2.0.conv1.weight) load"
        )
    if "model" in data and isinstance(data["model"], Mapping):
        return data["model"]
    if "state_dict" in data and isinstance(data["state_dict"], Mapping):
        return data["state_dict"]
    if data and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in data.values()):
        return data  # a bare state dict
    raise Detectron2ImportError(
        f"{source}: no 'model' entry with the weights (keys: {', '.join(map(str, list(data)[:8]))})"
    )


def load_detectron2_state(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of a detectron2 checkpoint without running code from the file.

    Args:
        weights_path: a ``.pth`` written by detectron2's ``DetectionCheckpointer`` (``{"model": state
            dict, "optimizer": ..., "iteration": ...}``) or a model-zoo ``.pkl`` (``{"model": {name:
            ndarray}, "__author__": ...}``). The format is taken from the file's bytes, not its suffix.

    Returns:
        ``{detectron2 parameter/buffer name: CPU tensor}`` (float32 weights, as stored).

    Raises:
        FileNotFoundError: no such file.
        Detectron2ImportError: not a detectron2 checkpoint, a truncated file, or a file that needs
            code to unpickle (refused).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"detectron2 checkpoint {path} not found")
    try:
        if _is_torch_file(path):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                # Some trainers store numpy scalars (iteration counters) beside the weights; allow the
                # numpy reconstruction globals and nothing else.
                with torch.serialization.safe_globals(_numpy_safe_globals()):
                    data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                data = restricted_pickle_load(f)
    except pickle.UnpicklingError as exc:
        raise Detectron2ImportError(f"{path}: refused to unpickle ({exc})") from exc
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Detectron2ImportError(f"{path} is truncated or not a checkpoint ({exc})") from exc
    return _to_tensor_dict(_unwrap(data, path), path)


def _numpy_safe_globals() -> list:
    core = np._core if hasattr(np, "_core") else np.core  # type: ignore[attr-defined]
    globs = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar, collections.OrderedDict]
    globs += [type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8", "u1", "b1")]
    return globs


# -- name mapping -----------------------------------------------------------------------------------
_BLOCK_PARTS = [
    # (detectron2 suffix inside a bottleneck block, project suffix)
    (re.compile(r"^conv(\d)\.weight$"), r"conv\1.weight"),
    (re.compile(r"^conv(\d)\.norm\.(weight|bias|running_mean|running_var|num_batches_tracked)$"), r"bn\1.\2"),
    (re.compile(r"^shortcut\.weight$"), r"downsample.0.weight"),
    (re.compile(r"^shortcut\.norm\.(weight|bias|running_mean|running_var|num_batches_tracked)$"), r"downsample.1.\1"),
    (re.compile(r"^conv2_offset\.(weight|bias)$"), r"conv2.offset.\1"),
]
_STEM = re.compile(r"^stem\.conv1\.(?:(weight)|norm\.(weight|bias|running_mean|running_var|num_batches_tracked))$")
_RES = re.compile(r"^res([2-5])\.(\d+)\.(.+)$")
_BN = r"weight|bias|running_mean|running_var|num_batches_tracked"  # a norm's tensors (GroupNorm: the first two)
_FPN = re.compile(rf"^backbone\.fpn_(lateral|output)([2-5])\.(?:(weight|bias)|norm\.({_BN}))$")
_RPN = {
    "proposal_generator.rpn_head.conv.weight": "rpn.head.conv.0.0.weight",
    "proposal_generator.rpn_head.conv.bias": "rpn.head.conv.0.0.bias",
    "proposal_generator.rpn_head.objectness_logits.weight": "rpn.head.cls_logits.weight",
    "proposal_generator.rpn_head.objectness_logits.bias": "rpn.head.cls_logits.bias",
    "proposal_generator.rpn_head.anchor_deltas.weight": "rpn.head.bbox_pred.weight",
    "proposal_generator.rpn_head.anchor_deltas.bias": "rpn.head.bbox_pred.bias",
}
_BOX_HEAD = re.compile(rf"^roi_heads\.box_head\.(?:(\d+)\.)?(conv|fc)(\d+)\.(?:(weight|bias)|norm\.({_BN}))$")
_BOX_PRED = re.compile(r"^roi_heads\.box_predictor\.(?:(\d+)\.)?(cls_score|bbox_pred)\.(weight|bias)$")
_MASK_HEAD = re.compile(
    rf"^roi_heads\.mask_head\.(?:mask_fcn(\d+)\.(?:(weight|bias)|norm\.({_BN}))|(deconv|predictor)\.(weight|bias))$"
)
_IGNORABLE = [
    (re.compile(r"(^|\.)num_batches_tracked$"), "BatchNorm step counter (unused at inference)"),
    (re.compile(r"^pixel_(mean|std)$"), "input normalisation (taken from the config)"),
    (re.compile(r"^proposal_generator\.anchor_generator\.cell_anchors\.\d+$"), "anchors (rebuilt from the config)"),
]


_RESNEST_STEM = "backbone.body.stem.conv1_1.weight"


def _block_name(rest: str) -> str | None:
    for pattern, repl in _BLOCK_PARTS:
        if pattern.match(rest):
            return pattern.sub(repl, rest)
    return None


def _box_head_name(stage: str | None, kind: str, index: int, param: str, is_norm: bool, target: set[str]) -> str | None:
    """Project name of a detectron2 ``FastRCNNConvFCHead`` parameter (conv/fc ``index`` is 1-based)."""
    prefix = "roi_heads.box_head." + (f"{stage}." if stage is not None else "")
    if kind == "fc" and not is_norm and prefix + "fc6.weight" in target:  # torchvision TwoMLPHead
        return prefix + f"fc{index + 5}.{param}" if index in (1, 2) else None
    convs = 0
    while prefix + f"{convs}.0.weight" in target:  # Conv2dNormActivation blocks, then Flatten, Linear/ReLU
        convs += 1
    if kind == "conv":
        if index > convs:
            return None
        return prefix + f"{index - 1}.{1 if is_norm else 0}.{param}"
    return prefix + f"{convs + 1 + 2 * (index - 1)}.{param}"


def d2_to_project_name(name: str, target: set[str], *, c4: bool) -> str | None:
    """The project parameter name of detectron2 parameter ``name`` (``None`` if it has none).

    Args:
        name: a detectron2 state-dict key.
        target: the project model's state-dict keys (decides between the head layouts).
        c4: the model is a C4 model (backbone without ``bottom_up``, res5 in the RoI head).

    Class-dependent tensors (``cls_score``, ``bbox_pred``, mask ``predictor``) map to their project
    names here; their rows are rearranged by :func:`convert_detectron2_state`.
    """
    body_prefix = "backbone." if c4 else "backbone.bottom_up."
    if name.startswith(body_prefix) and _RESNEST_STEM in target:
        # ResNeSt bodies (:mod:`.resnest`) keep detectron2's module names under backbone.body.
        return "backbone.body." + name[len(body_prefix) :]
    if name.startswith(body_prefix):
        rest = name[len(body_prefix) :]
        m = _STEM.match(rest)
        if m:
            return "backbone.body." + ("conv1.weight" if m.group(1) else f"bn1.{m.group(2)}")
        m = _RES.match(rest)
        if m and not (c4 and m.group(1) == "5"):
            block = _block_name(m.group(3))
            return None if block is None else f"backbone.body.layer{int(m.group(1)) - 1}.{m.group(2)}.{block}"
        if not c4:
            return None
    if c4 and name.startswith("roi_heads.res5."):
        m = re.match(r"^roi_heads\.res5\.(\d+)\.(.+)$", name)
        block = _block_name(m.group(2)) if m else None
        return None if block is None else f"roi_heads.res5.{m.group(1)}.{block}"
    m = _FPN.match(name)
    if m and not c4:
        kind = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
        idx = int(m.group(2)) - 2
        return f"backbone.fpn.{kind}.{idx}." + (f"0.{m.group(3)}" if m.group(3) else f"1.{m.group(4)}")
    if name in _RPN:
        return _RPN[name]
    m = _BOX_HEAD.match(name)
    if m and not c4:
        stage, kind, index = m.group(1), m.group(2), int(m.group(3))
        param, is_norm = (m.group(4), False) if m.group(4) else (m.group(5), True)
        return _box_head_name(stage, kind, index, param, is_norm, target)
    m = _BOX_PRED.match(name)
    if m:
        stage = f"{m.group(1)}." if m.group(1) is not None else ""
        return f"roi_heads.box_predictor.{stage}{m.group(2)}.{m.group(3)}"
    m = _MASK_HEAD.match(name)
    if m:
        if m.group(1):
            i = int(m.group(1)) - 1
            return f"roi_heads.mask_head.{i}." + (f"0.{m.group(2)}" if m.group(2) else f"1.{m.group(3)}")
        part = "conv5_mask" if m.group(4) == "deconv" else "mask_fcn_logits"
        return f"roi_heads.mask_predictor.{part}.{m.group(5)}"
    return None


def _class_rows(name: str, value: torch.Tensor, want: torch.Size, k: int, source: str) -> torch.Tensor:
    """Rearrange a class-dependent tensor from detectron2's layout to the project's.

    * ``cls_score`` ``(K + 1, ...)``, background last -> background first.
    * ``bbox_pred`` ``(4 K, ...)`` class-specific -> ``(4 (K + 1), ...)`` with a zero background block
      first; ``(4, ...)`` class-agnostic -> repeated for every class when the project head is
      class-specific (identical boxes), kept as is for a class-agnostic (cascade) head.
    * mask ``predictor`` ``(K, ...)`` -> ``(K + 1, ...)`` with a zero background channel first;
      ``(1, ...)`` class-agnostic -> repeated for every class.
    """
    rows, want_rows = value.shape[0], want[0]

    def fail(expected: str):
        return Detectron2ImportError(
            f"{source}: {name} has {rows} rows, expected {expected} for {k} class(es); the checkpoint was "
            "trained with another number of classes: pass that many class names"
        )

    if name.endswith(("cls_score.weight", "cls_score.bias")):
        if rows != k + 1:
            raise fail(f"{k + 1} (K + 1)")
        return torch.cat([value[k:], value[:k]])
    if name.endswith(("bbox_pred.weight", "bbox_pred.bias")):
        if want_rows == 4:
            if rows != 4:
                raise fail("4 (class-agnostic cascade stage)")
            return value
        if rows == 4:
            return value.repeat((k + 1,) + (1,) * (value.dim() - 1))
        if rows != 4 * k:
            raise fail(f"{4 * k} (4 K) or 4")
        return torch.cat([torch.zeros_like(value[:4]), value])
    if name.endswith(("mask_fcn_logits.weight", "mask_fcn_logits.bias")):
        if rows == 1:
            return value.repeat((k + 1,) + (1,) * (value.dim() - 1))
        if rows != k:
            raise fail(f"{k} (K) or 1")
        return torch.cat([torch.zeros_like(value[:1]), value])
    return value


_CLASS_DEPENDENT = ("cls_score.", "bbox_pred.", "mask_fcn_logits.")


@dataclass
class ImportReport:
    """What :func:`convert_detectron2_state` did.

    Attributes:
        mapped: ``{project name: detectron2 name}`` of every copied tensor.
        ignored: ``{detectron2 name: reason}`` of tensors deliberately not used.
        warnings: human-readable notes (filled-in statistics, class-agnostic expansion, ...).
    """

    mapped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def raise_for_unplaced(error: type[Exception], source: str, library: str, unmapped, bad_shapes, config: str = "the config's") -> None:
    """Raise ``error`` listing the file's tensors with no place in the project model (``unmapped``
    names), else those of the wrong shape (``"name (shape) -> project name (shape)"`` lines); the
    detectron2 and MMDetection imports share it. ``library`` names the file's origin in the message."""
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:8])
        raise error(
            f"{source}: {len(unmapped)} {library} tensor(s) have no place in the project model "
            f"(e.g. {shown}); the checkpoint does not match {config} architecture"
        )
    if bad_shapes:
        raise error(
            f"{source}: {len(bad_shapes)} tensor(s) have the wrong shape for the config's architecture: "
            + "; ".join(bad_shapes[:5])
        )


def convert_detectron2_state(
    d2_state: Mapping[str, torch.Tensor],
    target_state: Mapping[str, torch.Tensor],
    *,
    c4: bool,
    num_classes: int,
    source: str = "checkpoint",
) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Rename and rearrange a detectron2 state dict into the project model's layout.

    Args:
        d2_state: ``{detectron2 name: tensor}`` (:func:`load_detectron2_state`).
        target_state: the project model's ``state_dict()`` (names and shapes to fill).
        c4: the model is a C4 model.
        num_classes: K foreground classes.
        source: the file name, for messages.

    Returns:
        ``(state, report)``: ``state`` has exactly the keys of ``target_state`` (float tensors in the
        target's dtypes), loadable with ``load_state_dict(strict=True)``.

    Raises:
        Detectron2ImportError: a detectron2 tensor that maps nowhere (and is not a known ignorable
            buffer), a project tensor that nothing fills, a shape mismatch, or a class-count mismatch;
            the message lists the names.
    """
    target = set(target_state)
    report = ImportReport()
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    bad_shapes: list[str] = []
    for name, value in d2_state.items():
        reason = next((why for pat, why in _IGNORABLE if pat.search(name)), None)
        new = None
        if reason is None or name.endswith(".num_batches_tracked"):  # BatchNorm (not FrozenBN) keeps its counter
            new = d2_to_project_name(name, target, c4=c4)
        if reason is not None and new not in target:
            report.ignored[name] = reason
            continue
        if new is None or new not in target:
            unmapped.append(name)
            continue
        if new in out:
            raise Detectron2ImportError(f"{source}: {name} and {report.mapped[new]} both map to {new}")
        want = target_state[new]
        if new.startswith("roi_heads.") and any(part in new for part in _CLASS_DEPENDENT):
            value = _class_rows(new, value, want.shape, num_classes, source)
        if tuple(value.shape) != tuple(want.shape):
            bad_shapes.append(f"{name} {tuple(value.shape)} -> {new} {tuple(want.shape)}")
            continue
        out[new] = value.to(dtype=want.dtype)
        report.mapped[new] = name
    raise_for_unplaced(Detectron2ImportError, source, "detectron2", unmapped, bad_shapes)
    missing = [k for k in target_state if k not in out]
    for k in list(missing):
        # BatchNorm step counters (detectron2's are ignored above): unused at inference, start at 0.
        if k.endswith(".num_batches_tracked") and k.rsplit(".", 1)[0] + ".running_mean" in out:
            out[k] = torch.zeros_like(target_state[k])
            missing.remove(k)
    filled = []
    for k in list(missing):
        # detectron2's FrozenBatchNorm2d loads files without statistics as mean 0, var 1.
        if k.endswith(".running_mean") or k.endswith(".running_var"):
            bn = k.rsplit(".", 1)[0]
            if bn + ".weight" in out:
                fill = torch.zeros_like if k.endswith("mean") else torch.ones_like
                out[k] = fill(target_state[k])
                filled.append(k)
                missing.remove(k)
    if filled:
        report.warnings.append(
            f"{len(filled)} BatchNorm statistics absent from {source} were set to mean 0 / var 1 "
            f"(as detectron2 does), e.g. {filled[0]}"
        )
    if missing:
        raise Detectron2ImportError(
            f"{source}: {len(missing)} project tensor(s) are not in the checkpoint (e.g. "
            f"{', '.join(missing[:6])}); the checkpoint does not match the config's architecture"
        )
    return out, report


# -- whole models -----------------------------------------------------------------------------------
def detectron2_model_config(config_path: str | Path, class_names: Sequence[str] = DEFAULT_CLASSES, *, weights_path=None):
    """The project's ``ModelConfig`` for a detectron2 config (see :mod:`.d2_config`)."""
    from .d2_config import config_to_model_config, load_d2_config

    cfg = load_d2_config(config_path)
    prov = {"d2_config": str(config_path)}
    if weights_path is not None:
        prov["d2_weights"] = Path(weights_path).name
    return config_to_model_config(cfg, class_names, provenance=prov)


def load_detectron2_model(
    weights_path: str | Path,
    config_path: str | Path,
    class_names: Sequence[str] = DEFAULT_CLASSES,
):
    """Build the project model of a detectron2 config and fill it with a detectron2 checkpoint.

    Args:
        weights_path: ``.pth`` or model-zoo ``.pkl`` (:func:`load_detectron2_state`).
        config_path: the detectron2 ``config.yaml`` it was trained with (or a bundled model-zoo name).
        class_names: the K foreground classes in the checkpoint's class order.

    Returns:
        ``(model, config, report)``: a ``CellMaskRCNN`` in eval mode, its ``ModelConfig``, and the
        :class:`ImportReport`.

    Raises:
        UnsupportedConfigError: the config uses an option the project cannot rebuild.
        Detectron2ImportError: the file is not a detectron2 checkpoint of that architecture/classes.
    """
    from .architectures import build_model

    config = detectron2_model_config(config_path, class_names, weights_path=weights_path)
    state = load_detectron2_state(weights_path)
    model = build_model(config)
    converted, report = convert_detectron2_state(
        state, model.state_dict(), c4=config.is_c4, num_classes=config.num_classes, source=str(weights_path)
    )
    model.load_state_dict(converted, strict=True)
    model.eval()
    if report.ignored:
        report.warnings.append(
            f"{len(report.ignored)} tensor(s) not used: " + ", ".join(f"{k} ({v})" for k, v in list(report.ignored.items())[:4])
        )
    return model, config, report


def import_detectron2(
    weights_path: str | Path,
    config_path: str | Path,
    out_path: str | Path,
    class_names: Sequence[str] = DEFAULT_CLASSES,
) -> Path:
    """Turn a detectron2 checkpoint and its config into a project checkpoint at ``out_path``.

    The project checkpoint keeps detectron2's input convention (BGR, its pixel mean/std), anchors,
    test size and thresholds; it is written atomically by ``checkpoint.save_checkpoint``, with the
    import's facts (source files, tensors ignored, warnings) in its ``extra`` data. Warnings of the
    import (e.g. BatchNorm statistics filled in) are also issued as :class:`UserWarning`.

    Returns:
        The path written.

    Raises:
        FileNotFoundError, :class:`~.d2_config.UnsupportedConfigError`, :class:`Detectron2ImportError`
        (all ``ValueError`` subclasses apart from the first), with the file and the reason in the message.
    """
    import warnings

    from .checkpoint import save_checkpoint

    model, config, report = load_detectron2_model(weights_path, config_path, class_names)
    for message in report.warnings:
        warnings.warn(f"{weights_path}: {message}", UserWarning, stacklevel=2)
    extra = {
        "imported_from": {
            "detectron2_weights": str(weights_path),
            "detectron2_config": str(config_path),
            "tensors": len(report.mapped),
            "ignored": report.ignored,
            "warnings": report.warnings,
        }
    }
    return save_checkpoint(out_path, model, config, extra=extra)
