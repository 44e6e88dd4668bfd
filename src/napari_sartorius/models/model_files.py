"""Model files as the user gives them (``--model``, the Segment dock's "Add checkpoint…") -> project checkpoints.

:func:`resolve_model_file` passes the project's own checkpoints (and anything it does not recognise)
through unchanged, and imports an MMDetection checkpoint that carries its config in its ``meta`` once
into the cache of imported checkpoints (:func:`imported_cache_dir`), returning the cached file.
Recognising a file reads only its pickle's structure (the names), not its tensors.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

__all__ = ["imported_cache_dir", "looks_like_mmdet", "resolve_model_file"]

_PEEK_BYTES = 8 << 20


def imported_cache_dir() -> Path:
    """Where imported checkpoints are kept: ``imported/`` in the project's one cache folder
    (:func:`.download.cache_dir`: ``$NAPARI_SARTORIUS_HOME``, else the platform's cache folder)."""
    from .download import cache_dir

    return cache_dir() / "imported"


def _pickle_bytes(path: Path) -> bytes:
    """The pickled structure of a ``torch.save`` zip file (``*/data.pkl``), or the head of another file."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                if names:
                    with z.open(names[0]) as f:
                        return f.read(_PEEK_BYTES)
        with open(path, "rb") as f:
            return f.read(_PEEK_BYTES)
    except (OSError, zipfile.BadZipFile):
        return b""


def looks_like_mmdet(path: str | Path) -> bool:
    """True when the file's weight names are an MMDetection two-stage detector's (``rpn_head.rpn_conv``,
    ``roi_head.``); reads names only."""
    head = _pickle_bytes(Path(path))
    return b"rpn_head.rpn_conv" in head and b"roi_head." in head


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_model_file(path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The project checkpoint to load for a model file the user gave.

    Args:
        path: a project checkpoint, a torchvision state dict, or an MMDetection ``.pth`` whose
            ``meta`` holds its config (as MMDetection 2.x and 3.x write them).
        cache_dir: where imports are kept (default :func:`imported_cache_dir`).

    Returns:
        ``path`` itself, unless it is an MMDetection checkpoint: then the imported project checkpoint
        ``<cache_dir>/mmdet-<name>-<content hash>.pt``, written on the first call (atomically) and
        reused afterwards.

    Raises:
        MMDetImportError / UnsupportedMMDetConfigError / ConfigNeedsExecutionError: the MMDetection
        file cannot be imported (no config in it, an unsupported model, ...); the message says what
        to do (e.g. ``napari-sartorius import-mmdet WEIGHTS --config CONFIG.py``).
    """
    path = Path(path)
    if not path.is_file() or not looks_like_mmdet(path):
        return path
    from .mmdet_import import import_mmdet

    cache = Path(cache_dir) if cache_dir is not None else imported_cache_dir()
    target = cache / f"mmdet-{path.stem}-{_digest(path)}.pt"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    import_mmdet(path, target)
    return target
