"""The Mask R-CNN engine: runs a model on images and returns :class:`~napari_sartorius.instances.Instances`.

Engine contract (what inference consumes): ``name``, ``class_names`` and
``predict_batch(images) -> list[Instances]``. Images are ``(H, W)`` grayscale or ``(H, W, 3)`` RGB,
uint8 or float in 0..255; each is resized inside the model to ``config.min_size_test`` and the
results come back in the image's own pixels, with raw scores (above ``config.score_thresh_test``,
overlaps kept) and masks as **crops**: the mask head's ``M x M`` probabilities resampled onto the integer
pixel window around each box, exactly as detectron2's ``paste_masks_in_image`` samples them (bilinear at
pixel centres, the ``M x M`` grid spanning the float box, zero outside it) but never into a full image.
All detections of a batch are pasted at once on the model's device (:func:`~.mask_paste.paste_crops_batch`,
equal to :func:`paste_mask_crop`'s NumPy resampling) and only the crops' own pixels are copied back.

On CUDA the forward runs under fp16 autocast. A CUDA out-of-memory error prints a warning that names the
batch and moves the engine to the CPU for good (the batch is then run again there).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..instances import Instances
from ..device import autocast_context, empty_cache, is_out_of_memory, resolve_device
from .config import ModelConfig

__all__ = ["MaskRCNNEngine", "paste_mask_crop", "image_to_tensor"]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """An ``(H, W)`` or ``(H, W, 3)`` image (uint8 or float 0..255) as a float32 ``(3, H, W)`` RGB tensor.

    Raises ValueError for other shapes, empty images or non-finite values.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[None], 3, axis=0)
    elif arr.ndim == 3 and arr.shape[2] == 3:
        arr = np.moveaxis(arr, 2, 0)
    else:
        raise ValueError(
            f"an image must be (H, W) grayscale or (H, W, 3) RGB, got shape {arr.shape}: "
            "convert it (e.g. drop an alpha channel, take one plane of a stack) first"
        )
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"empty image of shape {np.asarray(image).shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"images must hold numbers in 0..255, got dtype {arr.dtype}")
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    # integers are always finite: only float images are checked (a full pass over 3 x H x W values)
    if np.issubdtype(arr.dtype, np.floating) and not torch.isfinite(out).all():
        raise ValueError("the image holds NaN or infinite values")
    return out


def _compact_tensor(image: np.ndarray) -> torch.Tensor:
    """A uint8 grayscale image as its own ``(H, W)`` uint8 tensor (12 times fewer bytes to copy to the
    device, made float and 3-channel there by :meth:`MaskRCNNEngine._run`: the same values as
    :func:`image_to_tensor`'s); any other image as :func:`image_to_tensor` gives it."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2 and arr.dtype == np.uint8 and arr.size:
        return torch.from_numpy(np.ascontiguousarray(arr))
    return image_to_tensor(image)


def _interp_weights(coords: np.ndarray, m: int) -> np.ndarray:
    """``(n, m)`` bilinear weights of sample positions ``coords`` (in mask pixel-index units, pixel
    centres at 0..m-1) on a length-``m`` grid; neighbours outside the grid count as zero."""
    lo = np.floor(coords)
    frac = (coords - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    w = np.zeros((len(coords), m + 2), np.float32)  # one padding column each side
    rows = np.arange(len(coords))
    w[rows, np.clip(lo + 1, 0, m + 1)] += 1.0 - frac
    w[rows, np.clip(lo + 2, 0, m + 1)] += frac
    return w[:, 1 : m + 1]


def paste_mask_crop(mask: np.ndarray, box, image_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Resample an ``(M, M)`` mask over the float box ``(x0, y0, x1, y1)`` onto its pixel window.

    Returns the float32 crop ``(h, w)`` and its origin ``(y0, x0)``: the window covers the pixels the box
    touches plus one on each side (``floor(x0) - 1 .. ceil(x1) + 1``, detectron2's paste window), clipped
    to the image, at least one pixel. Pixel ``(y, x)``
    samples the mask at ``((x + 0.5 - x0) / (x1 - x0)) * M - 0.5`` (and likewise in y), bilinear, zero
    outside the mask: the values detectron2's ``paste_masks_in_image`` writes into the full image.
    """
    mask = np.asarray(mask, np.float32)
    mh, mw = mask.shape
    h_img, w_img = image_size
    x0, y0, x1, y1 = (float(v) for v in box)
    # detectron2's window: one pixel beyond the box each side (bilinear spreads half a mask cell)
    cx0 = min(max(int(math.floor(x0)) - 1, 0), w_img - 1)
    cy0 = min(max(int(math.floor(y0)) - 1, 0), h_img - 1)
    cx1 = min(max(int(math.ceil(x1)) + 1, cx0 + 1), w_img)
    cy1 = min(max(int(math.ceil(y1)) + 1, cy0 + 1), h_img)
    xs = (np.arange(cx0, cx1, dtype=np.float64) + 0.5 - x0) / max(x1 - x0, 1e-6) * mw - 0.5
    ys = (np.arange(cy0, cy1, dtype=np.float64) + 0.5 - y0) / max(y1 - y0, 1e-6) * mh - 0.5
    crop = _interp_weights(ys, mh) @ mask @ _interp_weights(xs, mw).T
    return np.clip(crop, 0.0, 1.0).astype(np.float32), (cy0, cx0)


class MaskRCNNEngine:
    """Runs a Mask R-CNN of this project on images (the engine contract).

    Args:
        model: a model from :func:`~.architectures.build_model` (or :func:`~.checkpoint.load_checkpoint`).
        config: its :class:`ModelConfig` (class names, thresholds).
        device: "cpu", "cuda", "cuda:1", "mps" or "auto".
        name: shown in progress and fusion reports (default: the architecture).
        amp: fp16 autocast on CUDA.
        cpu_batch: images per network pass on the CPU (default 1). A batch (e.g. the 4 flips of one
            image) goes through the GPU in one pass, which is what makes batching pay; CPU kernels
            already use every core inside one image, and 4 images of 1024 x 1386 px in one pass
            hold ~1.2 GB more activations (measured: 4.35 GB peak RSS for 3 R50-FPN x 4 flips, a
            batch at a time, vs. the 3 GB target), so the CPU takes them one at a time.
        fast: fold FrozenBN into the convolutions and make their weights channels-last, in place
            (:mod:`.fast_inference`; on the CPU and CUDA): results change by float rounding only, but
            the model's ``state_dict`` loses the checkpoint's layout, so only for a model nothing else
            trains or saves (:meth:`from_checkpoint` engines, where it is the default).
    """

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        device: str | torch.device = "cpu",
        *,
        name: str | None = None,
        amp: bool = True,
        cpu_batch: int = 1,
        fast: bool = False,
    ) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.class_names: tuple[str, ...] = tuple(config.class_names)
        self.name = name or config.provenance.get("name") or config.arch
        self.device = resolve_device(device)
        self.amp = bool(amp)
        if int(cpu_batch) < 1:
            raise ValueError(f"cpu_batch must be at least 1, got {cpu_batch}")
        self.cpu_batch = int(cpu_batch)
        self.model = model.eval().to(self.device)
        if fast and self.device.type in ("cpu", "cuda"):
            from .fast_inference import prepare_for_inference_

            prepare_for_inference_(self.model)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> MaskRCNNEngine:
        """Load a checkpoint (see :func:`~.checkpoint.load_checkpoint`); ``name`` defaults to the file stem."""
        from .checkpoint import load_checkpoint

        model, config = load_checkpoint(path, map_location="cpu")
        kwargs.setdefault("name", Path(path).stem)
        kwargs.setdefault("fast", True)  # the freshly loaded model is the engine's own
        return cls(model, config, device=device, **kwargs)

    def __repr__(self) -> str:
        return f"MaskRCNNEngine({self.name!r}, arch={self.config.arch}, device={self.device})"

    def set_test_size(self, min_size: int, max_size: int | None = None) -> None:
        """Change the shorter side images are resized to (0: keep their size) and the cap on the longer
        side (default: unchanged), e.g. for multi-scale test-time augmentation."""
        max_size = self.config.max_size_test if max_size is None else int(max_size)
        self.config = self.config.replace(min_size_test=int(min_size), max_size_test=max_size)
        self.model.transform.min_size_test = self.config.min_size_test
        self.model.transform.max_size_test = self.config.max_size_test

    # -- running ------------------------------------------------------------------------------
    def predict(self, image: np.ndarray) -> Instances:
        """:meth:`predict_batch` of one image."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Instances of each image, in that image's pixel coordinates (one network pass for the batch
        on a GPU; ``cpu_batch`` images per pass on the CPU)."""
        tensors = [_compact_tensor(img) for img in images]
        if not tensors:
            return []
        outputs: list[dict[str, torch.Tensor]] = []
        while len(outputs) < len(tensors):
            # read per pass: after an out-of-memory fallback the rest of the batch runs on the CPU
            step = self.cpu_batch if self.device.type == "cpu" else len(tensors)
            outputs.extend(self._run_with_fallback(tensors[len(outputs) : len(outputs) + step]))
        return [self._to_instances(out, tuple(t.shape[-2:])) for out, t in zip(outputs, tensors)]

    def _run_with_fallback(self, tensors: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        try:
            return self._run(tensors)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if self.device.type == "cpu" or not is_out_of_memory(exc):
                raise
            shapes = ", ".join(f"{t.shape[-2]}x{t.shape[-1]}" for t in tensors)
            warnings.warn(
                f"{self.name}: out of GPU memory on {self.device} for {len(tensors)} image(s) of {shapes} "
                f"at test size {self.config.min_size_test} ({str(exc).splitlines()[0][:100]}); continuing "
                "on the CPU, which is much slower. Fewer TTA variants, smaller tiles or a smaller "
                "min_size_test keep it on the GPU.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.model.to("cpu")
            empty_cache()
            self.device = torch.device("cpu")
            return self._run(tensors)

    def _run(self, tensors: list[torch.Tensor]) -> list[dict]:
        """One eval forward on ``self.device``, masks pasted into crops there (:mod:`.mask_paste`);
        boxes, scores, labels as float32/int64 CPU tensors, ``crops`` and ``origins`` as NumPy."""
        from .mask_paste import paste_crops_batch

        with torch.inference_mode():
            # a compact (H, W) uint8 image becomes the float (3, H, W) of image_to_tensor on the device
            inputs = [t.to(self.device).float().expand(3, -1, -1) if t.dim() == 2 else t.to(self.device) for t in tensors]
            with autocast_context(self.device, enabled=self.amp):
                outputs = self.model(inputs)
            boxes = [out["boxes"].float() for out in outputs]
            pasted = paste_crops_batch([out["masks"] for out in outputs], boxes, [tuple(t.shape[-2:]) for t in tensors])
            # one copy to the host per field for the whole batch
            counts = [len(b) for b in boxes]
            boxes_host = torch.cat(boxes).cpu().split(counts)
            scores_host = torch.cat([out["scores"].float() for out in outputs]).cpu().split(counts)
            labels_host = torch.cat([out["labels"] for out in outputs]).cpu().split(counts)
        return [
            {"boxes": b, "scores": sc, "labels": lab, "crops": crops, "origins": origins}
            for b, sc, lab, (crops, origins) in zip(boxes_host, scores_host, labels_host, pasted)
        ]

    def _to_instances(self, out: dict, image_size: tuple[int, int]) -> Instances:
        return Instances(
            image_size=image_size,
            boxes=out["boxes"].numpy().astype(np.float32),
            scores=out["scores"].numpy(),
            classes=out["labels"].numpy().astype(np.int64) - 1,
            masks=out["crops"],
            mask_origins=np.asarray(out["origins"], np.int64).reshape(-1, 2),
        )
