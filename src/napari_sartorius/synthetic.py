"""Deterministic synthetic phase-contrast images of neuronal cells with exact ground truth.

Three styles imitate the Sartorius cell types (numbers for 520 x 704 images, from the competition's
training set, see DESIGN.md):

- ``shsy5y``: small (area ~150-300 px), elongated cells with short neurite-like arms, many per image
  (~150-300), clustered and touching;
- ``astro``: large (~600-1500 px), irregular cells with long arms, ~40-90 per image;
- ``cort``: round-ish (~150-300 px), sparse (~20-40) cells with long thin processes that are *not*
  part of the masks (as in the competition's annotations), on a background of small debris.

The image model is physical in spirit: every cell, neurite and debris particle adds to an optical
thickness map ``t`` (arbitrary units, ~1 for a cell body); a phase-contrast microscope behaves like a
high-pass filter of the phase delay, which we model as ``t - gaussian(t, halo_sigma)``. That makes
cell interiors dark with a darker rim inside the edge and a bright halo outside it, the look of real
phase-contrast images. Low-frequency illumination, texture and noise complete the picture; the image
is scaled like the competition's (mean ~128).

Everything is drawn from ``np.random.default_rng(seed)``: the same arguments give the same image,
labels and class, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .annotations import AnnotationSet, ImageAnnotations
from .cell_types import DEFAULT_CLASSES
from .instances import Instances

__all__ = ["STYLES", "SyntheticSample", "make_sample", "make_dataset"]

STYLES: tuple[str, ...] = ("shsy5y", "astro", "cort")

#: The reference image size (height, width) of the competition; counts scale with image area.
REFERENCE_SHAPE = (520, 704)


@dataclass(frozen=True)
class _Style:
    """How one cell type looks. Areas in px at ``scale=1``, counts per 520 x 704 image."""

    area_range: tuple[float, float]
    count_range: tuple[int, int]
    aspect_range: tuple[float, float]  # major / minor axis of the body
    arms: tuple[int, int]  # arms that belong to the mask (inclusive range)
    arm_length: tuple[float, float]  # arm length added to the radius, in body radii
    arm_width: float  # angular half-width of an arm (radians, Gaussian sigma)
    wobble: float  # amplitude of the boundary's low harmonics, relative to the radius
    clustered: float  # fraction of cells placed around cluster centres
    cluster_spread: float  # std of a cluster, in typical cell radii
    max_overlap: float  # a new cell may lose at most this fraction of its pixels to earlier cells
    gap: int  # minimum free margin (px) around a cell; 0 allows touching
    neurites: tuple[int, int]  # image-only thin processes per cell (inclusive range)
    neurite_length: tuple[float, float]  # px
    debris: int  # small dark particles per 520 x 704 image (image only)
    bright_fraction: float  # fraction of phase-bright (rounded) cells
    thickness: tuple[float, float]  # optical thickness of a cell body (arbitrary units)
    grain: tuple[float, float]  # amplitude of the granular texture inside cells


_STYLES: dict[str, _Style] = {
    "shsy5y": _Style(
        area_range=(150, 300), count_range=(150, 300), aspect_range=(1.4, 3.0), arms=(0, 2),
        arm_length=(0.6, 1.6), arm_width=0.10, wobble=0.10, clustered=0.7, cluster_spread=2.5,
        max_overlap=0.25, gap=0, neurites=(0, 2), neurite_length=(8, 40), debris=30,
        bright_fraction=0.15, thickness=(0.5, 1.0), grain=(1.0, 2.5),
    ),
    "astro": _Style(
        area_range=(600, 1500), count_range=(40, 90), aspect_range=(1.0, 2.2), arms=(2, 6),
        arm_length=(0.8, 2.2), arm_width=0.16, wobble=0.22, clustered=0.4, cluster_spread=2.0,
        max_overlap=0.15, gap=0, neurites=(0, 2), neurite_length=(20, 80), debris=20,
        bright_fraction=0.0, thickness=(0.8, 1.4), grain=(1.2, 2.5),
    ),
    "cort": _Style(
        area_range=(150, 300), count_range=(20, 40), aspect_range=(1.0, 1.5), arms=(0, 1),
        arm_length=(0.3, 0.8), arm_width=0.12, wobble=0.08, clustered=0.3, cluster_spread=2.5,
        max_overlap=0.0, gap=2, neurites=(2, 5), neurite_length=(40, 220), debris=220,
        bright_fraction=0.05, thickness=(0.4, 0.9), grain=(1.5, 3.5),
    ),
}

_TABLE = 360  # samples of the boundary radius function r(theta)


@dataclass
class SyntheticSample:
    """One synthetic image with its exact ground truth.

    Attributes:
        image: uint8 ``(H, W)`` phase-contrast-like image (background ~128).
        labels: uint16 ``(H, W)`` label image, 0 = background, cells 1..N, non-overlapping, no gaps.
        cell_type: the style, one of ``STYLES`` (also a name in ``DEFAULT_CLASSES``).
        seed: the seed it was drawn with.
    """

    image: np.ndarray
    labels: np.ndarray
    cell_type: str
    seed: int = 0

    @property
    def n_cells(self) -> int:
        return int(self.labels.max())

    @property
    def class_index(self) -> int:
        return DEFAULT_CLASSES.index(self.cell_type)

    @property
    def instances(self) -> Instances:
        """The cells as Instances (0/1 crops, score 1, class index into ``DEFAULT_CLASSES``)."""
        return Instances.from_label_image(self.labels, classes=self.class_index)

    def to_annotations(self, image_id: str) -> ImageAnnotations:
        return ImageAnnotations(
            image_id=image_id,
            instances=self.instances,
            cell_type=self.cell_type,
            file_name=f"{image_id}.png",
        )


def _check_style(style: str) -> _Style:
    if style not in _STYLES:
        raise ValueError(f"unknown synthetic style {style!r}: use one of {', '.join(STYLES)}")
    return _STYLES[style]


def _check_shape(shape) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (height, width), got {shape!r}") from None
    if h < 16 or w < 16:
        raise ValueError(f"shape must be at least 16 x 16 pixels, got {(h, w)}")
    return h, w


def _radius_table(rng: np.random.Generator, st: _Style) -> np.ndarray:
    """Boundary radius r(theta) of a star-shaped body with arms, ``(_TABLE,)`` float64, unit scale."""
    theta = np.linspace(-np.pi, np.pi, _TABLE, endpoint=False)
    r = np.ones(_TABLE)
    for k in range(2, 6):
        r += st.wobble * rng.normal() / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for _ in range(int(rng.integers(st.arms[0], st.arms[1] + 1))):
        centre = rng.uniform(-np.pi, np.pi)
        d = np.angle(np.exp(1j * (theta - centre)))
        width = st.arm_width * rng.uniform(0.6, 1.4)
        r += rng.uniform(*st.arm_length) * np.exp(-0.5 * (d / width) ** 2)
    return np.clip(r, 0.45, None)


def _draw_cell(rng, st: _Style, centre, area: float, shape):
    """Rasterise one cell. Returns ``(mask crop bool, (y0, x0))`` or None when it misses the image."""
    r = _radius_table(rng, st)
    # Area of the star-shaped region {rho < s * r(theta)} is s^2 * 1/2 * integral r^2 dtheta; the
    # stretch below preserves area, so s follows from the target area.
    unit_area = 0.5 * np.mean(r**2) * 2 * np.pi
    s = np.sqrt(area / unit_area)
    aspect = rng.uniform(*st.aspect_range)
    stretch = np.sqrt(aspect)
    angle = rng.uniform(0, np.pi)
    reach = s * r.max() * stretch + 1.5
    cy, cx = centre
    h, w = shape
    y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, h)
    x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, w)
    if y1 <= y0 or x1 <= x0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    c, sn = np.cos(angle), np.sin(angle)
    u = (c * dx + sn * dy) / stretch
    v = (-sn * dx + c * dy) * stretch
    rho = np.hypot(u, v)
    idx = ((np.arctan2(v, u) + np.pi) * (_TABLE / (2 * np.pi))).astype(np.int64) % _TABLE
    mask = rho < s * r[idx]
    return mask, (y0, x0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _place_cells(rng, st: _Style, n_cells: int, shape, scale: float) -> np.ndarray:
    """Place up to ``n_cells`` non-overlapping cells; returns the uint16 label image."""
    h, w = shape
    labels = np.zeros(shape, np.uint16)
    lo, hi = st.area_range[0] * scale**2, st.area_range[1] * scale**2
    typical_radius = np.sqrt((lo + hi) / 2 / np.pi)
    n_clusters = max(1, n_cells // 12)
    clusters = np.column_stack([rng.uniform(0, h, n_clusters), rng.uniform(0, w, n_clusters)])
    placed = 0
    for _ in range(n_cells * 30):
        if placed >= n_cells:
            break
        if rng.random() < st.clustered:
            c = clusters[rng.integers(n_clusters)]
            centre = c + rng.normal(0, st.cluster_spread * typical_radius, 2)
            if not (0 <= centre[0] < h and 0 <= centre[1] < w):
                continue
        else:
            centre = np.array([rng.uniform(0, h), rng.uniform(0, w)])
        area = rng.uniform(lo, hi)
        drawn = _draw_cell(rng, st, centre, area, shape)
        if drawn is None:
            continue
        mask, (y0, x0) = drawn
        window = labels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        taken = window > 0
        if st.gap > 0:
            taken = ndimage.binary_dilation(taken, iterations=st.gap)
        full = int(mask.sum())
        if full == 0:
            continue
        free = mask & ~taken
        if free.sum() < (1.0 - st.max_overlap) * full - 1e-9:
            continue
        free = _largest_component(free)
        # Clipping by the image border or by neighbours must keep the area in the style's range.
        if not 0.8 * lo <= free.sum() <= 1.1 * hi:
            continue
        placed += 1
        window[free] = placed
    return labels


def _random_walks(rng, starts, directions, lengths, step=1.0, curl=0.06):
    """Points ``(M, 2)`` (y, x) of smooth random walks, one per start: thin processes."""
    pts = []
    for (y, x), a, length in zip(starts, directions, lengths):
        n = max(int(length / step), 1)
        turns = np.cumsum(rng.normal(0, curl, n)) + a
        ys = y + np.cumsum(step * np.sin(turns))
        xs = x + np.cumsum(step * np.cos(turns))
        pts.append(np.column_stack([ys, xs]))
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def _splat(t: np.ndarray, pts: np.ndarray, value: float) -> None:
    """Add ``value`` at the integer pixels of ``pts`` (y, x) that fall inside ``t`` (in place)."""
    if len(pts) == 0:
        return
    iy, ix = np.round(pts[:, 0]).astype(np.int64), np.round(pts[:, 1]).astype(np.int64)
    ok = (iy >= 0) & (iy < t.shape[0]) & (ix >= 0) & (ix < t.shape[1])
    flat = np.unique(iy[ok] * t.shape[1] + ix[ok])
    t.ravel()[flat] += value


def _low_frequency_field(rng, shape, cells=(4, 5)) -> np.ndarray:
    """A smooth random field ``(H, W)`` float32 with unit-ish amplitude (cubic upsampling)."""
    coarse = rng.normal(size=cells)
    zoom = (shape[0] / cells[0], shape[1] / cells[1])
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    out = np.zeros(shape, np.float32)
    hh, ww = min(field.shape[0], shape[0]), min(field.shape[1], shape[1])
    out[:hh, :ww] = field[:hh, :ww]
    if hh < shape[0]:
        out[hh:] = out[hh - 1]
    if ww < shape[1]:
        out[:, ww:] = out[:, ww - 1 : ww]
    return out


def _render(rng, st: _Style, labels: np.ndarray, scale: float) -> np.ndarray:
    """Phase-contrast-like uint8 image ``(H, W)`` of the cells in ``labels`` plus image-only debris."""
    h, w = labels.shape
    n = int(labels.max())
    inside = labels > 0
    # Optical thickness: a soft dome per cell (thicker in the middle) with granular texture.
    amp = np.concatenate([[0.0], rng.uniform(*st.thickness, n)]).astype(np.float32)
    grain = np.concatenate([[0.0], rng.uniform(*st.grain, n)]).astype(np.float32)
    dist = ndimage.distance_transform_edt(inside).astype(np.float32)
    dome = np.minimum(dist / (2.5 * scale), 1.0) * 0.6 + 0.4 * inside
    t = amp[labels] * dome
    texture = ndimage.gaussian_filter(rng.normal(size=(h, w)).astype(np.float32), 1.0)
    t += grain[labels] * texture

    area_factor = h * w / (REFERENCE_SHAPE[0] * REFERENCE_SHAPE[1])
    if n:
        # Thin processes leaving each cell (image only: annotations exclude them).
        ids = np.arange(1, n + 1)
        counts = rng.integers(st.neurites[0], st.neurites[1] + 1, n)
        owners = np.repeat(ids, counts)
        if owners.size:
            yy, xx = np.indices(labels.shape)
            counts_px = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            com = np.column_stack([
                np.bincount(labels.ravel(), yy.ravel(), n + 1)[1:] / counts_px,
                np.bincount(labels.ravel(), xx.ravel(), n + 1)[1:] / counts_px,
            ])
            radius = np.sqrt(counts_px / np.pi)
            dirs = rng.uniform(0, 2 * np.pi, owners.size)
            starts = com[owners - 1] + radius[owners - 1, None] * 0.8 * np.column_stack(
                [np.sin(dirs), np.cos(dirs)]
            )
            lengths = rng.uniform(*st.neurite_length, owners.size) * scale
            pts = _random_walks(rng, starts, dirs, lengths)
            _splat(t, pts, 0.55)
    # Debris: small dense particles (dark core, bright halo once filtered).
    n_debris = int(rng.poisson(st.debris * area_factor))
    if n_debris:
        dy = rng.uniform(0, h, n_debris)
        dx = rng.uniform(0, w, n_debris)
        pts = np.column_stack([dy, dx])
        pts = np.concatenate([pts + rng.normal(0, 0.8, pts.shape) for _ in range(4)])
        _splat(t, pts, 3.5)
    t = ndimage.gaussian_filter(t, 0.7 * max(scale, 0.5))

    # Phase contrast ~ high-pass of the phase delay: dark interior, bright halo outside the edge.
    phase = t - ndimage.gaussian_filter(t, 3.0 * scale)
    contrast = rng.uniform(45, 65)
    img = 128.0 - contrast * phase
    # Phase-bright (rounded) cells: a bright core inside a dark rim.
    if n:
        bright = np.concatenate([[0.0], (rng.random(n) < st.bright_fraction) * rng.uniform(30, 60, n)])
        core = np.clip(dist / (3.0 * scale) - 0.5, 0, 1)
        img += bright[labels].astype(np.float32) * core
    img += 5.0 * _low_frequency_field(rng, (h, w))
    img += rng.normal(0, 4.0, size=(h, w)).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_sample(
    style: str,
    seed: int = 0,
    shape: tuple[int, int] = REFERENCE_SHAPE,
    n_cells: int | None = None,
    scale: float = 1.0,
) -> SyntheticSample:
    """Draw one synthetic phase-contrast image with its exact labels.

    Args:
        style: ``"shsy5y"``, ``"astro"`` or ``"cort"``.
        seed: seed of ``np.random.default_rng``; equal arguments give identical samples.
        shape: ``(height, width)`` in pixels (at least 16 x 16).
        n_cells: how many cells to try to place; default: the style's count range for a 520 x 704
            image, scaled by the image area (at least 1). Dense requests may place fewer cells.
        scale: linear size of the cells relative to the style (areas scale with ``scale**2``).

    Returns:
        A :class:`SyntheticSample`: uint8 image and uint16 labels, both ``shape``. Every cell's area is
        within ``[0.8 * lo, 1.1 * hi] * scale**2`` of the style's area range ``(lo, hi)``.
    """
    st = _check_style(style)
    shape = _check_shape(shape)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    rng = np.random.default_rng(seed)
    if n_cells is None:
        area_factor = shape[0] * shape[1] / (REFERENCE_SHAPE[0] * REFERENCE_SHAPE[1])
        n_cells = max(1, int(round(rng.integers(st.count_range[0], st.count_range[1] + 1) * area_factor)))
    elif n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")
    labels = _place_cells(rng, st, int(n_cells), shape, scale)
    image = _render(rng, st, labels, scale)
    return SyntheticSample(image=image, labels=labels, cell_type=style, seed=seed)


def make_dataset(
    n_images: int,
    styles: tuple[str, ...] = STYLES,
    seed: int = 0,
    shape: tuple[int, int] = REFERENCE_SHAPE,
    n_cells: int | None = None,
) -> tuple[list[np.ndarray], AnnotationSet]:
    """``n_images`` samples cycling through ``styles``, with their annotations.

    Image ``i`` has style ``styles[i % len(styles)]``, seed ``seed + i`` and id
    ``synthetic_<style>_<i:03d>`` (e.g. ``synthetic_cort_002``).

    Returns:
        ``(images, annotations)``: a list of uint8 ``(H, W)`` arrays and an :class:`AnnotationSet`
        whose ``images`` follow the same order.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if not styles:
        raise ValueError(f"styles must name at least one of {', '.join(STYLES)}")
    for s in styles:
        _check_style(s)
    images, annots = [], []
    for i in range(n_images):
        style = styles[i % len(styles)]
        sample = make_sample(style, seed=seed + i, shape=shape, n_cells=n_cells)
        images.append(sample.image)
        annots.append(sample.to_annotations(f"synthetic_{style}_{i:03d}"))
    return images, AnnotationSet(images=annots, class_names=DEFAULT_CLASSES)
