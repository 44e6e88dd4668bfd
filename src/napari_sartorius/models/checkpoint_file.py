"""Is this file a checkpoint at all? A cheap check that reads a few bytes and imports no torch.

:func:`check_checkpoint_file` is what the command line (``--model``, ``--base``) and the Segment
dock ("Add checkpoint...") call before they accept a file, so that a text file, a detectron2 pickle
or a truncated download is refused with one line saying what it is and what to do, instead of
failing later inside ``torch.load``. It does not read the weights: the full check (format version,
model settings, tensors) happens when :func:`napari_sartorius.models.checkpoint.read_checkpoint`
loads the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

__all__ = ["CheckpointError", "check_checkpoint_file"]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and what to do."""


# torch.save's legacy (non-zip) format starts with its pickled magic number 0x1950A86A20F9469CFC6C.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
_MAKE_ONE = "give a file written by `napari-sartorius init-model`, `train` or `import-detectron2`, or a torchvision state dict"


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the sample is fine
        return exc.start >= len(head) - 3
    return True


def check_checkpoint_file(path: str | os.PathLike) -> str:
    """Check that ``path`` is a file ``torch.save`` wrote; return what it is ("zip" or "legacy").

    Reads at most 4 KiB (and a zip's table of contents); never unpickles anything.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ValueError) the message starts with ``not a checkpoint:`` and says what
            the file is instead (a folder, empty, text, a plain pickle such as a detectron2 ``.pkl``,
            a damaged zip, other bytes) and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"not a checkpoint: {path} is a folder; give the checkpoint file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise CheckpointError(f"not a checkpoint: {path} is empty; copy or save it again")
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "legacy"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(
                f"not a checkpoint: {path} is a truncated or damaged zip ({exc}); copy or save it again"
            ) from None
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise CheckpointError(f"not a checkpoint: {path} is a zip archive that torch.save did not write; {_MAKE_ONE}")
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(
            f"not a checkpoint: {path} is a plain Python pickle (a detectron2 model-zoo .pkl?); convert it with "
            "`napari-sartorius import-detectron2 WEIGHTS --config CONFIG.yaml --out CKPT`"
        )
    if _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()
        start = (first[0][:40] if first else "").strip()
        shown = f" starting {start!r}" if start else ""
        raise CheckpointError(f"not a checkpoint: {path} is a text file{shown}; {_MAKE_ONE}")
    raise CheckpointError(f"not a checkpoint: {path} was not written by torch.save (it starts {head[:8]!r}); {_MAKE_ONE}")
