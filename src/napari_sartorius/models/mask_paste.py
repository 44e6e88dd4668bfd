"""Mask crops of all detections of an image pasted at once, on the device that ran the model.

:func:`~.predictor.paste_mask_crop` resamples one detection's ``M x M`` mask onto its pixel window with
NumPy; an engine pasting 1000 detections that way copies every mask to the host and loops in Python,
which costs more than a GPU forward. :func:`paste_crops` does the same resampling for every detection in
a few batched matrix products on the masks' device: each crop is ``Wy @ mask @ Wx.T`` where ``Wy``
``(h, M)`` and ``Wx`` ``(w, M)`` hold the bilinear weights of the window's pixel centres (at most two
non-zeros a row). Detections are sorted by window size and processed in chunks padded to the chunk's
largest window (at most ``max_elements`` floats per chunk), never a full-image mask per detection;
the valid pixels of all crops are gathered into one flat tensor and copied to the host once.
:func:`paste_crops_batch` does it for the detections of a whole batch of images in one go (each
detection's window clipped to its own image), so a batch waits for the device once per chunk, not
once per chunk of every image.

The windows, sample positions (float64) and weights (float32) are computed exactly as
:func:`~.predictor.paste_mask_crop` does; only the float32 matrix products may round differently
(the test bounds the difference at 1e-6).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["paste_crops", "paste_crops_batch", "crop_windows", "DEFAULT_MAX_ELEMENTS"]

#: Floats of one padded chunk of crops (2**24: 64 MB in float32).
DEFAULT_MAX_ELEMENTS = 2**24


def crop_windows(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """int64 ``(N, 4)`` pixel windows ``(y0, x0, y1, x1)`` (end exclusive) of float ``(N, 4)`` xyxy boxes:
    one pixel beyond the box each side, clipped to the image, at least one pixel (detectron2's window,
    as :func:`~.predictor.paste_mask_crop`)."""
    h_img, w_img = int(image_size[0]), int(image_size[1])
    b = boxes.double()
    x0 = (torch.floor(b[:, 0]).long() - 1).clamp(0, w_img - 1)
    y0 = (torch.floor(b[:, 1]).long() - 1).clamp(0, h_img - 1)
    x1 = torch.minimum(torch.maximum(torch.ceil(b[:, 2]).long() + 1, x0 + 1), torch.tensor(w_img, device=b.device))
    y1 = torch.minimum(torch.maximum(torch.ceil(b[:, 3]).long() + 1, y0 + 1), torch.tensor(h_img, device=b.device))
    return torch.stack([y0, x0, y1, x1], dim=1)


def _weights(start: Tensor, length: Tensor, lo: Tensor, hi: Tensor, size: int, m: int) -> Tensor:
    """float32 ``(n, size, m)`` bilinear weights of pixels ``start .. start + length - 1`` of boxes spanning
    ``lo .. hi`` on an ``m``-cell grid; rows past ``length`` are zero."""
    j = torch.arange(size, device=start.device, dtype=torch.float64)
    pix = start.double()[:, None] + j[None]
    coords = (pix + 0.5 - lo.double()[:, None]) / torch.clamp(hi.double() - lo.double(), min=1e-6)[:, None] * m - 0.5
    base = torch.floor(coords)
    frac = (coords - base).float()
    base = base.long()
    cells = torch.arange(m, device=start.device)
    w = (cells == base[..., None]).float() * (1.0 - frac)[..., None] + (cells == base[..., None] + 1).float() * frac[..., None]
    valid = j[None] < length[:, None]
    return w * valid[..., None]


def paste_crops(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Resample each ``(M, M)`` mask over its float box onto its pixel window, all on the masks' device.

    Args:
        masks: float ``(N, M, M)`` or ``(N, 1, M, M)`` probabilities (any float dtype; computed in float32).
        boxes: float ``(N, 4)`` xyxy boxes in image pixels.
        image_size: ``(height, width)`` of the image, in pixels.
        max_elements: floats per padded chunk of crops (bounds device memory).

    Returns:
        ``(crops, origins)``: per detection a float32 ``(h, w)`` NumPy crop in [0, 1], and int64
        ``(N, 2)`` origins ``(y0, x0)``, equal (to 1e-6) to :func:`~.predictor.paste_mask_crop`'s.
    """
    return paste_crops_batch([masks], [boxes], [image_size], max_elements)[0]


def paste_crops_batch(
    masks: list[Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """:func:`paste_crops` of each image of a batch, computed together on the masks' device.

    Args:
        masks: per image, float ``(N_i, M, M)`` or ``(N_i, 1, M, M)`` probabilities (same M for all).
        boxes: per image, float ``(N_i, 4)`` xyxy boxes in that image's pixels.
        image_sizes: per image, ``(height, width)`` in pixels.

    Returns:
        Per image, ``(crops, origins)`` as :func:`paste_crops` gives for that image alone.
    """
    if not (len(masks) == len(boxes) == len(image_sizes)):
        raise ValueError(f"got {len(masks)} mask sets, {len(boxes)} box sets and {len(image_sizes)} image sizes")
    masks = [m[:, 0] if m.dim() == 4 else m for m in masks]
    counts = [int(m.shape[0]) for m in masks]
    if sum(counts) == 0:
        return [([], np.zeros((0, 2), np.int64)) for _ in masks]
    device = masks[0].device
    boxes = [b.to(device) for b in boxes]
    win = torch.cat([crop_windows(b, size) for b, size in zip(boxes, image_sizes)])
    crops, origins = _paste(torch.cat(masks), torch.cat(boxes), win, max_elements)
    ends = np.cumsum(counts).tolist()
    return [(crops[e - c : e], origins[e - c : e]) for e, c in zip(ends, counts)]


def _paste(masks: Tensor, boxes: Tensor, win: Tensor, max_elements: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Crops of float ``(N, M, M)`` masks over ``(N, 4)`` boxes onto their int64 ``(N, 4)`` windows
    ``(y0, x0, y1, x1)`` (:func:`crop_windows`), ``N >= 1``; returns ``(crops, origins)``."""
    n = int(masks.shape[0])
    m_h, m_w = int(masks.shape[-2]), int(masks.shape[-1])
    masks = masks.float()
    hs, ws = win[:, 2] - win[:, 0], win[:, 3] - win[:, 1]
    order = torch.argsort(hs * ws, stable=True)
    hs_host, ws_host = hs.cpu().numpy(), ws.cpu().numpy()
    order_host = order.cpu().numpy()
    flats: list[Tensor] = []
    chunk_order: list[np.ndarray] = []
    hs_sorted, ws_sorted = hs_host[order_host], ws_host[order_host]
    start = 0
    while start < n:
        # grow the chunk while its padded size fits (sorted by area, so the last is about the largest):
        # the padded size of the first k crops, k x running max height x running max width, only grows
        hm = np.maximum.accumulate(hs_sorted[start:].astype(np.int64))
        wm = np.maximum.accumulate(ws_sorted[start:].astype(np.int64))
        padded = np.arange(1, n - start + 1, dtype=np.int64) * hm * wm
        count = max(int(np.searchsorted(padded, max_elements, side="right")), 1)
        stop = start + count
        hmax, wmax = int(hm[count - 1]), int(wm[count - 1])
        idx = order[start:stop]
        b, w_ = boxes[idx], win[idx]
        wy = _weights(w_[:, 0], hs[idx], b[:, 1], b[:, 3], hmax, m_h)
        wx = _weights(w_[:, 1], ws[idx], b[:, 0], b[:, 2], wmax, m_w)
        crops = torch.bmm(torch.bmm(wy, masks[idx]), wx.transpose(1, 2)).clamp_(0.0, 1.0)
        valid = (torch.arange(hmax, device=crops.device)[None, :, None] < hs[idx][:, None, None]) & (
            torch.arange(wmax, device=crops.device)[None, None, :] < ws[idx][:, None, None]
        )
        flats.append(crops[valid])  # row-major per detection: each crop's pixels, contiguous
        chunk_order.append(order_host[start:stop])
        start = stop
    flat = torch.cat(flats).cpu().numpy()  # the one copy to the host: the crops' own pixels only
    in_order = np.concatenate(chunk_order)
    h_o, w_o = hs_host[in_order].astype(np.int64), ws_host[in_order].astype(np.int64)
    ends = np.cumsum(h_o * w_o)
    out: list[np.ndarray | None] = [None] * n
    for k, e, h, w in zip(in_order.tolist(), ends.tolist(), h_o.tolist(), w_o.tolist()):
        out[k] = flat[e - h * w : e].reshape(h, w)
    origins = win[:, :2].cpu().numpy().astype(np.int64)
    return out, origins  # type: ignore[return-value]
