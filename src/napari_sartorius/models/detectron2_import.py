"""Import detectron2 checkpoints (``.pth`` and model-zoo ``.pkl``) without detectron2.

Reading never runs code from the file: ``.pth`` files go through ``torch.load(weights_only=True)``,
``.pkl`` files through :class:`RestrictedUnpickler`, which only reconstructs numpy arrays, numpy
scalars, dicts/lists and ``collections.OrderedDict``.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

__all__ = [
    "Detectron2ImportError",
    "RestrictedUnpickler",
    "restricted_pickle_load",
    "load_detectron2_state",
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
