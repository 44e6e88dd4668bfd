"""Reading microscopy images as 8-bit grayscale.

Every image the engines see is ``uint8 (H, W)``. Conversions done here (documented because they
change pixel values):

* RGB / RGBA ``(H, W, 3|4)``: luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, as PIL's
  ``convert("L")``); alpha is dropped. Gray + alpha ``(H, W, 2)``: the gray channel.
* ``uint8``: unchanged. ``bool``: 0 / 255.
* Other integer types whose values all lie in 0..255: cast unchanged.
* Float images within [0, 1]: multiplied by 255 and rounded.
* Anything else (16-bit, 32-bit, floats outside [0, 1]): a linear stretch of the 0.1th..99.9th
  percentile range onto 0..255, clipped. Percentiles rather than min/max so that a few hot or dead
  pixels do not flatten the contrast of a phase-contrast image. A constant image maps to zeros.

TIFF files are read with tifffile; compressed TIFFs whose codec needs the optional ``imagecodecs``
package fall back to PIL (which decodes LZW, deflate and packbits itself); if neither can decode the
file the error says to ``pip install imagecodecs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "read_image",
    "read_stack",
    "read_raw",
    "image_size",
    "to_uint8_gray",
    "find_image",
    "default_image_dirs",
]

#: Extensions tried (in this order) when looking for an image by its stem.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

_TIFF = (".tif", ".tiff")

PERCENTILES = (0.1, 99.9)


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded; the message names the file and what to do."""


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file")
    return path


def _read_pil(path: Path, all_frames: bool = False) -> np.ndarray:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if not all_frames:
                return _pil_array(im)
            return np.stack([_pil_array(frame) for frame in ImageSequence.Iterator(im)])
    except UnidentifiedImageError as e:
        raise ImageReadError(f"cannot read {path}: not an image format PIL knows ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read {path}: {e}") from e


def _pil_array(im) -> np.ndarray:
    # Palette and exotic modes: convert to something numpy understands without losing bit depth.
    if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    return np.asarray(im)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        return np.asarray(tifffile.imread(path))
    except Exception as tiff_error:  # tifffile raises ValueError/KeyError/TiffFileError for codecs
        codec_missing = "imagecodecs" in str(tiff_error)
        try:
            arr = _read_pil(path, all_frames=True)
            return arr[0] if arr.shape[0] == 1 else arr
        except ImageReadError as pil_error:
            if codec_missing:
                raise ImageReadError(
                    f"cannot decode the compressed TIFF {path}: {tiff_error}. "
                    "Install the codecs with `pip install imagecodecs` and try again."
                ) from pil_error
            raise ImageReadError(f"cannot read TIFF {path}: {tiff_error}") from pil_error


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """The file's pixels as stored (any dtype, any shape), without conversion.

    Raises:
        FileNotFoundError: no such file.
        ImageReadError: the file cannot be decoded (message names the file).
    """
    path = _check_file(path)
    if path.suffix.lower() in _TIFF:
        return _read_tiff(path)
    try:
        return _read_pil(path)
    except ImageReadError as pil_error:
        try:
            import skimage.io

            return np.asarray(skimage.io.imread(path))
        except Exception:
            raise pil_error from None


def _to_gray(arr: np.ndarray) -> np.ndarray:
    """(..., H, W, C) colour -> (..., H, W) gray in the input dtype (floats stay float)."""
    if arr.ndim >= 3 and arr.shape[-1] in (3, 4):
        gray = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if np.issubdtype(arr.dtype, np.integer):  # stay in the input's integer range
            return np.round(gray).astype(arr.dtype)
        return gray
    if arr.ndim >= 3 and arr.shape[-1] == 2:
        return arr[..., 0]
    return arr


def to_uint8_gray(arr: np.ndarray, source: object = "image") -> np.ndarray:
    """Convert pixel values to ``uint8`` by the rules in the module docstring.

    ``arr`` may have any shape; the same mapping applies to all its pixels (a stack is stretched
    jointly). Colour must already have been reduced (see :func:`read_image`).
    """
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ImageReadError(f"{source}: complex-valued pixels are not supported")
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
    else:
        finite = np.isfinite(arr)
        if not finite.all():
            arr = np.where(finite, arr, np.nanmin(np.where(finite, arr, np.nan)) if finite.any() else 0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.round(arr * 255.0).astype(np.uint8)
    p_lo, p_hi = np.percentile(arr, PERCENTILES)
    if p_hi <= p_lo:  # nearly constant: fall back to the full range
        p_lo, p_hi = float(arr.min()), float(arr.max())
    if p_hi <= p_lo:
        return np.zeros(arr.shape, np.uint8)
    out = (arr.astype(np.float64) - p_lo) * (255.0 / (p_hi - p_lo))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2-D image (PNG, JPEG, TIFF, BMP) as ``uint8 (H, W)`` grayscale.

    Colour and bit depth are converted as the module docstring says. A TIFF holding one plane
    with singleton axes (e.g. ``(1, H, W)``) is accepted.

    Raises:
        FileNotFoundError: no such file (message names the path).
        ImageReadError (a ValueError): the file cannot be decoded, or it is a stack of several
            planes (use :func:`read_stack`).
    """
    path = Path(path)
    arr = read_raw(path)
    colour = arr.ndim >= 3 and arr.shape[-1] in (2, 3, 4)
    if colour:
        gray = _to_gray(arr)
    else:
        gray = arr
    gray = np.squeeze(gray) if gray.ndim > 2 else gray
    if gray.ndim != 2:
        raise ImageReadError(
            f"{path} holds an array of shape {arr.shape}, not a single 2-D image; "
            "use read_stack() for 3-D stacks"
        )
    if min(gray.shape) == 0:
        raise ImageReadError(f"{path} is an empty image of shape {arr.shape}")
    return to_uint8_gray(gray, path)


def read_stack(path: str | os.PathLike) -> np.ndarray:
    """Read an image or a stack of planes as ``uint8 (Z, H, W)``; a 2-D image gives ``Z = 1``.

    Multi-page TIFFs and multi-frame images give one plane per page/frame; RGB(A) planes are
    converted to gray. All planes share one intensity mapping (see the module docstring).
    """
    path = _check_file(path)
    if path.suffix.lower() in _TIFF:
        arr = _read_tiff(path)
    else:
        arr = _read_pil(path, all_frames=True)
    colour = arr.ndim >= 3 and arr.shape[-1] in (2, 3, 4)
    gray = _to_gray(arr) if colour else arr
    if gray.ndim == 2:
        gray = gray[None]
    elif gray.ndim > 3:
        gray = gray.reshape((-1,) + gray.shape[-2:])
    if gray.ndim != 3 or min(gray.shape) == 0:
        raise ImageReadError(f"{path} holds an array of shape {arr.shape}, not an image stack")
    return to_uint8_gray(gray, path)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of a 2-D image file, reading only its header where possible."""
    path = _check_file(path)
    if path.suffix.lower() in _TIFF:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
                if tif.pages[0].samplesperpixel > 1 and len(shape) == 3:
                    if tif.pages[0].planarconfig == 1:  # contiguous: (H, W, S)
                        return int(shape[0]), int(shape[1])
                    return int(shape[1]), int(shape[2])
                return int(shape[-2]), int(shape[-1])
        except Exception as e:
            raise ImageReadError(f"cannot read the TIFF header of {path}: {e}") from e
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            return int(h), int(w)
    except (UnidentifiedImageError, OSError) as e:
        h, w = read_image(path).shape  # let the full reader try (and raise its clear error)
        return h, w


def default_image_dirs(annotation_path: str | os.PathLike) -> list[Path]:
    """Where images of an annotation file usually are: beside it, and in an ``images/`` folder beside it.

    For a folder (of label images) the folder itself and its ``images/`` subfolder come first.
    """
    p = Path(annotation_path)
    base = p if p.is_dir() else p.parent
    dirs = [base, base / "images"]
    if p.is_dir():
        dirs.append(base.parent / "images")
    return [d for d in dirs if d.is_dir()]


def find_image(
    image_id_or_file_name: str, search_dirs: str | os.PathLike | Iterable[str | os.PathLike] | None
) -> Path | None:
    """Find an image file by its name or stem in ``search_dirs`` (searched in order).

    A name with an image extension (``"abc.png"``, or a relative path such as ``"train/abc.png"``) is
    first looked up as given (relative to each folder, then by its base name); then the stem is
    tried with each of :data:`IMAGE_EXTENSIONS` (lower and upper case). Label files
    (``<stem>_labels.*``) never match. Returns None when nothing is found.
    """
    if search_dirs is None:
        return None
    if isinstance(search_dirs, (str, os.PathLike)):
        search_dirs = [search_dirs]
    dirs = [Path(d) for d in search_dirs]
    name = str(image_id_or_file_name)
    rel = Path(name)
    has_ext = rel.suffix.lower() in IMAGE_EXTENSIONS
    stem = rel.stem if has_ext else rel.name
    for d in dirs:
        if not d.is_dir():
            continue
        if has_ext:
            for cand in (d / rel, d / rel.name):
                if cand.is_file():
                    return cand
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                cand = d / f"{stem}{e}"
                if cand.is_file():
                    return cand
    return None
