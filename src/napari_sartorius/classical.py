"""A weight-free segmentation engine for phase-contrast cells (scikit-image / SciPy only).

It lets the whole loop (segment, correct, export, evaluate) run before any trained model exists.
It implements the engine contract (``name``, ``class_names``, ``predict_batch``) and returns the same
:class:`~napari_sartorius.instances.Instances` as the Mask R-CNN predictor.

Pipeline (lengths scale with the expected cell diameter ``d`` in px):

1. gray, float: RGB is reduced with the ITU-R 601 luma weights. Any dtype (uint8, uint16, float) gives
   the same result, because the image is then normalised robustly (median and MAD): only contrast
   relative to the background noise matters;
2. background flattening: subtract a Gaussian of sigma ``background_sigma * d`` (uneven illumination),
   then divide by the noise level, re-estimated on pixels away from the first detections (in dense
   images the whole-image MAD would include the cells);
3. detection: phase-contrast cells show texture, a dark interior and a halo against a flat
   background. The cell-scale *local contrast* is the RMS of the image clipped at ``clip`` noise units
   (clipping caps what tiny, very dark debris contributes) in a Gaussian window of
   ``detect_sigma * d``, plus ``darkness_weight`` times the local darkness. Pixels more than
   ``detect_threshold`` noise units above the image's 25th percentile of that map are cells;
4. extent: the same contrast in a small window (``edge_sigma * d``) above ``edge_threshold``, minus
   bright halo pixels (above ``halo_threshold``), closed, hole-filled and opened with a disk of radius
   ``opening_radius * d`` (which removes thin neurites), kept where it lies within ``grow * d`` of a
   detection;
5. splitting of touching cells: watershed of the cell-scale contrast from its local maxima (at least
   ``split_distance * d`` apart); each object keeps its largest piece, objects outside
   ``[min_area, max_area]`` times the expected area ``pi d^2 / 4`` are dropped;
6. per object: a confidence in [0, 1] and a class.

Confidence (see :func:`_object_scores`): the product of a size term
``exp(-(ln(area / expected area) / 0.6)^2 / 2)`` (merged cells and fragments score low: they were
most of the false positives when measured), a contrast term ``(1 + tanh(peak / 0.5)) / 2`` of the
object's peak contrast above the threshold, and a solidity term ``clip((solidity - 0.6) / 0.3, 0, 1)``.
It ranks objects for the per-type score thresholds of post-processing (a typical isolated cell scores
0.7-0.9); it is not a calibrated probability.

Class: ``settings.cell_type`` when given. Otherwise a *heuristic* from size statistics: a median object
area above ``astro_area`` px means astro; otherwise shsy5y when there are more than ``dense_count``
objects per 520 x 704 image, else cort. All objects of an image get the same class (one cell type per
image). The heuristic is crude (astro cells segmented with the default diameter come out too small to
be recognised); give the cell type when you know it.

Measured figures (benchmarks/bench_classical.py) are in the benchmark's output; this engine is a
baseline that makes the plugin usable without weights, far below a trained Mask R-CNN.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy import ndimage

from .cell_types import DEFAULT_CLASSES, check_cell_type
from .instances import Instances

__all__ = ["ClassicalSettings", "ClassicalEngine", "TYPICAL_DIAMETERS", "TYPICAL_DETECT_THRESHOLDS"]

#: Typical cell diameter (px, in 520 x 704 images) per type: from the competition's mean areas
#: (~225 px for shsy5y and cort, ~900 px for astro; d = 2 sqrt(area / pi)).
TYPICAL_DIAMETERS: dict[str, float] = {"shsy5y": 17.0, "astro": 34.0, "cort": 17.0}

#: Detection threshold per type (noise units above the background level): astrocytes are flat and
#: faint in phase contrast (their local contrast is about half that of neurons), so they need a lower one.
TYPICAL_DETECT_THRESHOLDS: dict[str, float] = {"shsy5y": 2.0, "astro": 1.2, "cort": 2.0}


@dataclass(frozen=True)
class ClassicalSettings:
    """Every parameter of :class:`ClassicalEngine`. Lengths are in units of the cell diameter.

    Attributes:
        cell_type: the image's cell type (one of ``DEFAULT_CLASSES``) or None for the size heuristic.
        cell_diameter: expected cell diameter in px; None: ``TYPICAL_DIAMETERS[cell_type]``, or 17 px
            when the type is unknown.
        background_sigma: Gaussian sigma of the illumination estimate, in diameters.
        clip: the flattened image is clipped at +-clip noise units before local statistics.
        detect_sigma: Gaussian window of the cell-scale local contrast, in diameters.
        detect_threshold: detection threshold in noise units above the background level; None:
            ``TYPICAL_DETECT_THRESHOLDS[cell_type]`` (2.0 when the type is unknown).
        background_percentile: percentile of the contrast map taken as the background level.
        edge_sigma: Gaussian window of the pixel-scale contrast that sets the mask extent, in diameters.
        edge_threshold: pixel-scale contrast (noise units) above which a pixel can belong to a cell.
        darkness_weight: weight of the local darkness (negative local mean) added to the local RMS.
        halo_threshold: pixels brighter than this (noise units, lightly smoothed) are halo, not cell.
        opening_radius: radius of the closing/opening disk, in diameters.
        grow: how far (in diameters) the mask extent may reach beyond the detection.
        min_area: smallest object kept, as a fraction of the expected area ``pi d^2 / 4``.
        max_area: largest object kept, as a multiple of the expected area.
        split_distance: smallest distance between two cells' centres when splitting, in diameters.
        astro_area: median object area (px) above which the heuristic says astro.
        dense_count: objects per 520 x 704 image above which the heuristic says shsy5y.
    """

    cell_type: str | None = None
    cell_diameter: float | None = None
    background_sigma: float = 2.0
    clip: float = 5.0
    detect_sigma: float = 0.3
    detect_threshold: float | None = None
    background_percentile: float = 25.0
    edge_sigma: float = 0.05
    edge_threshold: float = 1.8
    darkness_weight: float = 0.5
    halo_threshold: float = 2.0
    opening_radius: float = 0.12
    grow: float = 0.1
    min_area: float = 0.3
    max_area: float = 8.0
    split_distance: float = 0.5
    astro_area: float = 550.0
    dense_count: float = 120.0

    def __post_init__(self) -> None:
        check_cell_type(self.cell_type)
        if self.cell_diameter is not None and not self.cell_diameter > 2:
            raise ValueError(f"cell_diameter must be > 2 px, got {self.cell_diameter}")

    @property
    def detection_margin(self) -> float:
        """The detection threshold in noise units above the background level."""
        if self.detect_threshold is not None:
            return float(self.detect_threshold)
        return TYPICAL_DETECT_THRESHOLDS.get(self.cell_type or "", 2.0)

    @property
    def diameter(self) -> float:
        """The expected cell diameter in px."""
        if self.cell_diameter is not None:
            return float(self.cell_diameter)
        return TYPICAL_DIAMETERS.get(self.cell_type or "", 17.0)


def _gray(image: np.ndarray) -> np.ndarray:
    """Any (H, W) or (H, W, 3|4) image of any real dtype -> float32 (H, W)."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"an image must be (H, W) or (H, W, 3), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"an image must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError("the image contains NaN or infinite values")
    return arr


def _robust_z(x: np.ndarray) -> np.ndarray | None:
    """``(x - median) / (1.4826 MAD)``; None for a flat image (nothing to find)."""
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med))) * 1.4826
    if mad <= 1e-6:
        std = float(x.std())
        if std <= 1e-6:
            return None
        mad = std
    return (x - med) / mad


def _disk(radius: float) -> np.ndarray:
    r = max(int(round(radius)), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= r * r + r * 0.5


class ClassicalEngine:
    """Weight-free segmentation of phase-contrast cells (see the module docstring)."""

    name = "classical"
    class_names: tuple[str, ...] = DEFAULT_CLASSES

    def __init__(self, settings: ClassicalSettings | None = None) -> None:
        self.settings = settings if settings is not None else ClassicalSettings()

    def __repr__(self) -> str:
        return f"ClassicalEngine({self.settings!r})"

    def with_settings(self, **changes) -> ClassicalEngine:
        return ClassicalEngine(replace(self.settings, **changes))

    # -- the engine contract ----------------------------------------------------------------------
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Segment each image ``(H, W)`` or ``(H, W, 3)``; one Instances per image, in its pixels."""
        return [self.predict(im) for im in images]

    def predict(self, image: np.ndarray) -> Instances:
        """Segment one image. Masks are 0/1 crops; scores in [0, 1]; classes index ``class_names``."""
        labels, cue = self.label_image(image)
        n = int(labels.max())
        if n == 0:
            return Instances.empty(labels.shape)
        d = self.settings.diameter
        scores = _object_scores(labels, cue, n, np.pi * d * d / 4)
        cls = self._classify(labels, n)
        return Instances.from_label_image(
            labels, classes=cls, scores={i + 1: float(s) for i, s in enumerate(scores)}
        )

    # -- steps ------------------------------------------------------------------------------------
    def normalise(self, image: np.ndarray) -> np.ndarray | None:
        """Flattened image float32 ``(H, W)`` in units of the background noise (0 = background);
        None for a flat image."""
        st = self.settings
        d = st.diameter
        z = _robust_z(_gray(image))
        if z is None:
            return None
        flat = z - ndimage.gaussian_filter(z, st.background_sigma * d, mode="reflect")
        # The MAD of the whole image overestimates the noise when cells cover much of it (dense
        # shsy5y, astro): re-estimate it on pixels away from the first detections.
        background = np.ones(flat.shape, bool)
        zf = flat
        for _ in range(3):
            vals = flat[background]
            if vals.size < 0.05 * flat.size:
                break
            centre = float(np.median(vals))
            scale = 1.4826 * float(np.median(np.abs(vals - centre)))
            if scale <= 1e-6:
                return None
            zf = (flat - centre) / scale
            detect = self._detection(zf) > 0
            background = ~ndimage.binary_dilation(detect, iterations=max(int(st.detect_sigma * d), 1))
        return zf.astype(np.float32)

    def _energy(self, zf: np.ndarray, sigma: float) -> np.ndarray:
        """Local contrast float ``(H, W)``: RMS of the clipped image in a Gaussian window of ``sigma``
        px, plus ``darkness_weight`` times the local darkness. Clipping at ``clip`` noise units caps
        what tiny, very dark debris adds, so that mainly cell-sized regions of texture reach the
        detection threshold."""
        st = self.settings
        sigma = max(sigma, 0.7)
        c = np.clip(zf, -st.clip, st.clip)
        out = np.sqrt(np.maximum(ndimage.gaussian_filter(c * c, sigma), 0))
        if st.darkness_weight:
            out += st.darkness_weight * np.maximum(-ndimage.gaussian_filter(c, sigma), 0)
        return out

    def _detection(self, zf: np.ndarray) -> np.ndarray:
        """Cell-scale contrast minus the threshold: ``detection_margin`` noise units above the level
        of the ``background_percentile``-th percentile. Most of an image is background: percentile 25
        stays on background even where cells cover half of it, and follows the busy background of
        real cultures (neurites, debris) up."""
        st = self.settings
        e = self._energy(zf, st.detect_sigma * st.diameter)
        return e - (float(np.percentile(e, st.background_percentile)) + st.detection_margin)

    def label_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Non-overlapping cells as an int32 label image ``(H, W)`` plus the detection map float32
        ``(H, W)`` (local contrast at cell scale minus ``detect_threshold``; > 0 inside detections)."""
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        st = self.settings
        d = st.diameter
        zf = self.normalise(image)
        if zf is None:
            shape = _gray(image).shape
            return np.zeros(shape, np.int32), np.zeros(shape, np.float32)
        coarse = self._detection(zf)
        detected = coarse > 0
        # Pixel-accurate extent: contrast in a small window, minus bright halo, cleaned.
        fine = self._energy(zf, st.edge_sigma * d) > st.edge_threshold
        fine &= ~(ndimage.gaussian_filter(zf, 1.0) > st.halo_threshold)
        r = st.opening_radius * d
        if r >= 0.5:
            fine = ndimage.binary_closing(fine, structure=_disk(r))
        fine = ndimage.binary_fill_holes(fine)
        if r >= 0.5:
            fine = ndimage.binary_opening(fine, structure=_disk(r))
        grow = int(round(st.grow * d))
        region = fine & (ndimage.binary_dilation(detected, iterations=grow) if grow > 0 else detected)
        if not region.any():
            return np.zeros(zf.shape, np.int32), coarse.astype(np.float32)
        # One marker per cell: maxima of the cell-scale contrast, at least split_distance * d apart.
        peaks = peak_local_max(
            coarse,
            min_distance=max(int(round(st.split_distance * d)), 1),
            threshold_abs=0.0,
            labels=ndimage.label(region)[0],
            exclude_border=False,
        )
        markers = np.zeros(zf.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        ws = watershed(-coarse, markers, mask=region)
        labels = _clean_labels(ws, st.min_area * np.pi * d * d / 4, st.max_area * np.pi * d * d / 4)
        return labels, coarse.astype(np.float32)

    def _classify(self, labels: np.ndarray, n: int) -> int:
        st = self.settings
        if st.cell_type is not None:
            return self.class_names.index(st.cell_type)
        areas = np.bincount(labels.ravel())[1:]
        if np.median(areas) > st.astro_area:
            return self.class_names.index("astro")
        per_image = n * (520 * 704) / labels.size
        return self.class_names.index("shsy5y" if per_image > st.dense_count else "cort")


def _clean_labels(labels: np.ndarray, min_px: float, max_px: float) -> np.ndarray:
    """Keep each label's largest 4-connected piece, drop labels outside ``[min_px, max_px]`` pixels,
    renumber 1..N. Returns int32 ``(H, W)``."""
    out = np.zeros(labels.shape, np.int32)
    n = 0
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        pieces, k = ndimage.label(m)
        if k > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            m = pieces == int(np.argmax(sizes))
        area = int(m.sum())
        if min_px <= area <= max_px:
            n += 1
            out[sl][m] = n
    return out


def _object_scores(labels: np.ndarray, detection: np.ndarray, n: int, expected_area: float) -> np.ndarray:
    """Confidence in [0, 1] per object (float32 ``(n,)``), see the module docstring."""
    from skimage.measure import regionprops

    ids = np.arange(1, n + 1)
    peak = np.asarray(ndimage.maximum(detection, labels, ids), np.float64)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    solidity = np.array([p.solidity for p in regionprops(labels)], np.float64)
    size_term = np.exp(-0.5 * (np.log(area / expected_area) / 0.6) ** 2)
    contrast_term = 0.5 + 0.5 * np.tanh(peak / 0.5)
    solidity_term = np.clip((solidity - 0.6) / 0.3, 0.0, 1.0)
    return np.clip(size_term * contrast_term * solidity_term, 0.0, 1.0).astype(np.float32)
