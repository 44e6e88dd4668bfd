"""Checks of command-line arguments that end in one line saying what to do (exit status 2).

Kept out of :mod:`napari_sartorius.cli` so that the parser and the commands stay readable:

- :class:`CLIError`: a user-facing error, printed as one line by ``cli.main`` (exit status 2);
- :func:`unit_interval`: an ``argparse`` type for thresholds in (0, 1] such as ``--iou``;
- :func:`output_folder`: ``--out`` as a folder, created, never an existing file;
- :func:`check_model_files`: every ``--model`` is ``classical`` or a file ``torch.save`` wrote;
- :func:`check_label_predictions`: predictions read from label images really are label images
  (a folder of raw microscopy images would otherwise score 0 without a word).

No torch here: these run before any model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

__all__ = ["CLIError", "unit_interval", "output_folder", "check_model_files", "check_label_predictions"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def unit_interval(text: str) -> float:
    """``argparse`` type: a number in (0, 1] (an IoU or score threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give one in (0, 1], e.g. 0.5") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]; give a threshold such as 0.5")
    return value


def output_folder(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents) and return it.

    Raises:
        CLIError: ``path`` (or a folder above it) is an existing file, or it cannot be created.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path} is an existing file, not a folder: give a folder name (it is created)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CLIError(f"{option} {path}: a part of this path is an existing file; give a folder name") from None
    except PermissionError:
        raise CLIError(f"{option} {path}: no permission to create this folder; pick another place") from None
    return path


def check_model_files(models: Sequence[str] | None, option: str = "--model") -> None:
    """Every entry is ``classical`` or a file that ``torch.save`` wrote (cheap: reads a few bytes).

    Raises:
        CLIError: no such file, or ``not a checkpoint: ...`` saying what the file is instead.
    """
    from .models.checkpoint_file import CheckpointError, check_checkpoint_file

    for m in models or ():
        if m == "classical":
            continue
        if not Path(m).is_file() and not Path(m).is_dir():
            hint = f" (or use {option} classical)" if option == "--model" else ""
            raise CLIError(f"{option} {m}: no such checkpoint file{hint}")
        try:
            check_checkpoint_file(m)
        except CheckpointError as exc:
            raise CLIError(f"{option} {m}: {exc}") from None


#: A label image keeps background (label 0) around its cells; a raw image read as labels (every
#: grey level a "label") has almost none.
MIN_BACKGROUND = 0.01


def check_label_predictions(aset, path: str | Path, option: str = "--pred") -> None:
    """Refuse label images that are really raw microscopy images.

    An image is suspect when label 0 covers under ``MIN_BACKGROUND`` of it.

    Raises:
        CLIError: every image of ``aset`` is suspect (the message says what was found and what to do).
    """
    suspects = []
    for im in aset:
        inst = im.instances
        if len(inst) == 0:
            continue
        background = 1.0 - float((inst.to_label_image() > 0).mean())
        if background < MIN_BACKGROUND:
            suspects.append((im.image_id, len(inst), background))
    if suspects and len(suspects) == len(aset):
        name, n, background = suspects[0]
        raise CLIError(
            f"{option} {path}: its {len(suspects)} image(s) look like raw microscopy images, not label images "
            f"({name}: {n} 'labels' and {background:.1%} background); segment them first "
            "(`napari-sartorius segment IMAGES --out DIR`) and pass DIR/predictions.json or DIR"
        )
