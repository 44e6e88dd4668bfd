"""A weight-free segmentation engine for phase-contrast cells (NumPy / SciPy / scikit-image only).

Why over 500 lines: one algorithm (detection, polar contours, calibrated scores) whose steps share
private helpers; splitting it would scatter a single pipeline.

It lets the whole loop (segment, correct, export, evaluate) run before any trained model exists.
It implements the engine contract (``name``, ``class_names``, ``predict_batch``) and returns the same
:class:`~napari_sartorius.instances.Instances` as the Mask R-CNN predictor.

Pipeline (lengths scale with the expected cell diameter ``d`` in px):

1. gray, float: RGB is reduced with the ITU-R 601 luma weights. Any dtype (uint8, uint16, float) gives
   the same result, because the image is normalised robustly: only contrast relative to the background
   noise matters;
2. background flattening: subtract a Gaussian of sigma ``background_sigma * d`` (uneven illumination)
   and divide by the noise level, estimated (MAD) on pixels whose neighbourhood is quiet (in dense
   images the whole-image MAD would include the cells);
3. detection: in phase contrast a cell body is a dark, granular disc inside a bright halo; debris is a
   tiny, much darker dot. Clipping the image at ``clip`` noise units caps what debris contributes; a
   difference of Gaussians of the clipped *darkness* (sigmas ``detect_sigma * d`` and
   ``surround_sigma * d``) peaks at the centres of cell-sized dark regions. Its local maxima at least
   ``min_distance * d`` apart and above ``detect_threshold`` are the candidates;
4. extent: ``rays`` rays are cast from each candidate up to ``ray_max * d``. The cell's edge is the
   dark-to-bright step into the halo: along each ray the outward derivative of the lightly smoothed
   image (``edge_sigma * d``), minus ``size_prior`` times the distance (in diameters) from the
   expected radius ``d / 2``. The contour is the closed path through the rays that maximises the
   summed score while moving at most ``max_step * d`` between neighbouring rays (dynamic programming
   in polar coordinates, robust to granules inside the cell and to neurites leaving it), pushed out by
   ``edge_offset * d`` (the step lies inside the annotated outline) and median-filtered over 5 rays.
   The centre then moves to the contour's centroid and the rays are cast again (``refine`` times):
   a detection peak often sits on a dark granule off the cell's centre;
5. touching cells and duplicates: two candidates whose centres each lie inside the other's contour
   are one cell (the stronger peak is kept). Candidates are painted from the most probable down, each
   onto the pixels still free; one that finds more than ``max_overlap`` of its contour taken is left
   out. Objects outside ``[min_area, max_area]`` times the expected area ``pi d^2 / 4`` are dropped;
6. per object: a confidence and a class (below).

**Confidence.** A logistic of the evidence measured per candidate:
``x = detection peak (noise units) | mean brightness of the halo ring 1-3 px outside the contour |
RMS of the clipped image 0.15-0.35 d beyond the contour (texture outside: high when the contour hugs
a granule inside a bigger cell) | ln(area / expected area) | its square``;
``p = sigmoid(SCORE_WEIGHTS . (1, x))``. The six weights were fitted (logistic regression, groups
weighted equally) on the candidates of 2 synthetic images of each style plus the three annotated real
cort images, labelled "IoU > 0.5 with a true cell" (ranking AUC: real cort 0.90, synthetic cort 0.98,
shsy5y 0.91, astro 0.74). ``p`` is then shifted in logit space so that the operating point
``p = SCORE_OPERATING_POINT`` (0.4: the best fixed threshold on ``p`` for the real images and near
the best for synthetic cort when measured) lands exactly on the default post-processing threshold of
the image's cell type (0.15 shsy5y, 0.35 astro, 0.55 cort,
:data:`~napari_sartorius.cell_types.SCORE_THRESHOLDS`):
``score = sigmoid(logit(p) - logit(p_op) + logit(threshold[type]))``. The mapping is monotone, so the
ranking is unchanged; it makes ``segment -> postprocess`` keep what the engine believes in. It is a
calibration of a handful of physical measurements, not a trained model, and only three real images
took part: treat it as a starting point.

**Class.** ``settings.cell_type`` when given. Otherwise a *density heuristic*: the image is segmented
at the small diameter (17 px) and read as shsy5y when it holds more than ``dense_count`` confident
objects (raw probability > 0.5) per 520 x 704 image, else as cort (measured: real and synthetic cort
10-22, synthetic shsy5y ~115-120, synthetic astro ~120-135). Astrocytes are **never** guessed: neither
a segmentation at the astro diameter (its objects never scored confidently) nor scale-space DoG
energy ratios separated them from the other types on the synthetic and real images tried. All
objects of an image get the same class (one cell type per image). Give the type when you know it.

Measured figures (``benchmarks/bench_classical.py``) are in the benchmark's output; this engine is a
baseline that makes the plugin usable without weights, far below a trained Mask R-CNN.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy import ndimage

from .cell_types import DEFAULT_CLASSES, SCORE_THRESHOLDS, check_cell_type
from .instances import Instances

__all__ = [
    "ClassicalSettings",
    "ClassicalEngine",
    "TYPICAL_DIAMETERS",
    "TYPICAL_RAY_MAX",
    "SCORE_WEIGHTS",
    "SCORE_OPERATING_POINT",
    "calibrate",
]

#: Typical cell diameter (px, in 520 x 704 images) per type: from the competition's mean areas
#: (~225 px for shsy5y and cort, ~900 px for astro; d = 2 sqrt(area / pi)).
TYPICAL_DIAMETERS: dict[str, float] = {"shsy5y": 17.0, "astro": 34.0, "cort": 17.0}

#: How far (in diameters) rays search for a cell's edge: SH-SY5Y cells are elongated and astrocytes
#: have arms that belong to their masks; cortical neuron bodies are round-ish.
TYPICAL_RAY_MAX: dict[str, float] = {"shsy5y": 1.2, "astro": 1.5, "cort": 1.0}

#: Logistic weights of the confidence: bias, detection peak, halo, texture outside, ln area ratio,
#: (ln area ratio)^2. See the module docstring for how they were obtained.
SCORE_WEIGHTS: tuple[float, ...] = (-1.60, 2.33, 0.41, -0.33, -0.15, -8.07)

#: The raw probability that is mapped onto each type's default score threshold.
SCORE_OPERATING_POINT: float = 0.4


@dataclass(frozen=True)
class ClassicalSettings:
    """Every parameter of :class:`ClassicalEngine`. Lengths are in units of the cell diameter.

    Attributes:
        cell_type: the image's cell type (one of ``DEFAULT_CLASSES``) or None to guess it.
        cell_diameter: expected cell diameter in px; None: ``TYPICAL_DIAMETERS[cell_type]``, or 17 px
            when the type is unknown.
        background_sigma: Gaussian sigma of the illumination estimate, in diameters.
        clip: the flattened image is clipped at +-clip noise units before detection.
        detect_sigma: inner Gaussian of the darkness difference of Gaussians, in diameters.
        surround_sigma: outer Gaussian of the darkness difference of Gaussians, in diameters.
        detect_threshold: smallest detection peak (noise units) that becomes a candidate.
        min_distance: smallest distance between two candidates, in diameters.
        rays: number of rays cast from each candidate.
        ray_min: the edge is searched from this radius on, in diameters.
        ray_max: ... up to this radius, in diameters; None: ``TYPICAL_RAY_MAX[cell_type]`` (1.2 when
            the type is unknown).
        edge_sigma: Gaussian sigma of the image whose radial derivative marks edges, in diameters.
        edge_offset: the contour is pushed out by this much past the steepest step, in diameters.
        max_step: largest change of radius between neighbouring rays, in diameters.
        size_prior: penalty per diameter of distance from the expected radius, in the edge score
            (noise units per px).
        refine: how many times the centre moves to the contour's centroid and rays are cast again.
        min_area: smallest object kept, as a fraction of the expected area ``pi d^2 / 4``.
        max_area: largest object kept, as a multiple of the expected area.
        max_overlap: an object is left out when more than this fraction of its contour is already
            taken by more probable objects.
        dense_count: confident objects per 520 x 704 image above which a guess says shsy5y.
    """

    cell_type: str | None = None
    cell_diameter: float | None = None
    background_sigma: float = 2.0
    clip: float = 5.0
    detect_sigma: float = 0.2
    surround_sigma: float = 0.5
    detect_threshold: float = 0.3
    min_distance: float = 0.5
    rays: int = 48
    ray_min: float = 0.2
    ray_max: float | None = None
    edge_sigma: float = 0.06
    edge_offset: float = 0.09
    max_step: float = 0.06
    size_prior: float = 1.0
    refine: int = 2
    min_area: float = 0.3
    max_area: float = 8.0
    max_overlap: float = 0.5
    dense_count: float = 60.0

    def __post_init__(self) -> None:
        check_cell_type(self.cell_type)
        if self.cell_diameter is not None and not self.cell_diameter > 2:
            raise ValueError(f"cell_diameter must be > 2 px, got {self.cell_diameter}")
        if self.rays < 8:
            raise ValueError(f"rays must be >= 8, got {self.rays}")
        if not 0 < self.ray_min < self.max_radius:
            raise ValueError(f"need 0 < ray_min < ray_max, got {self.ray_min}, {self.max_radius}")

    @property
    def diameter(self) -> float:
        """The expected cell diameter in px."""
        if self.cell_diameter is not None:
            return float(self.cell_diameter)
        return TYPICAL_DIAMETERS.get(self.cell_type or "", 17.0)

    @property
    def max_radius(self) -> float:
        """How far rays search, in diameters."""
        if self.ray_max is not None:
            return float(self.ray_max)
        return TYPICAL_RAY_MAX.get(self.cell_type or "", 1.2)


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


def _mad_scale(x: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 MAD) of a 1-D array; falls back to the std when the MAD is 0."""
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    if mad <= 1e-6:
        mad = float(x.std())
    return med, mad


@dataclass
class _Candidates:
    """Per-candidate arrays (N = number of candidates, K = rays)."""

    centres: np.ndarray  # float64 (N, 2) (y, x)
    peak: np.ndarray  # float64 (N,) detection value at the centre, noise units
    radii: np.ndarray  # float64 (N, K) contour radius along each ray, px
    halo: np.ndarray  # float64 (N,) mean brightness just outside the contour, noise units
    outside: np.ndarray  # float64 (N,) RMS of the clipped image beyond the halo, noise units
    theta: np.ndarray  # float64 (K,) ray angles


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
        gray = _gray(image)
        st = self.settings
        if st.cell_type is None:
            cell_type, labels, probs = self._guess(gray)
            return self._to_instances(labels, probs, cell_type)
        labels, probs = self._segment(gray, st)
        return self._to_instances(labels, probs, st.cell_type)

    def label_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Non-overlapping objects as an int32 label image ``(H, W)`` (0 = background) and their raw
        probabilities float32 ``(N,)`` (index ``i`` for label ``i + 1``), before any type calibration."""
        gray = _gray(image)
        if self.settings.cell_type is None:
            _, labels, probs = self._guess(gray)
            return labels, probs
        return self._segment(gray, self.settings)

    def guess_cell_type(self, image: np.ndarray) -> str:
        """The cell type the engine reads in ``image`` when none is given: shsy5y when it finds more
        than ``dense_count`` confident objects (probability > 0.5) per 520 x 704 image at the small
        diameter, else cort. It never says astro (see the module docstring)."""
        return self._guess(_gray(image))[0]

    # -- steps ------------------------------------------------------------------------------------
    def _guess(self, gray: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
        st = self.settings
        labels, probs = self._segment(gray, replace(st, cell_type="cort"))
        per_image = int(np.count_nonzero(probs > 0.5)) * (520 * 704) / gray.size
        if per_image <= st.dense_count:
            return "cort", labels, probs
        labels, probs = self._segment(gray, replace(st, cell_type="shsy5y"))
        return "shsy5y", labels, probs

    def _to_instances(self, labels: np.ndarray, probs: np.ndarray, cell_type: str) -> Instances:
        n = int(labels.max())
        if n == 0:
            return Instances.empty(labels.shape)
        scores = calibrate(probs, cell_type)
        cls = self.class_names.index(cell_type) if cell_type in self.class_names else 0
        return Instances.from_label_image(
            labels, classes=cls, scores={i + 1: float(s) for i, s in enumerate(scores)}
        )

    def _segment(self, gray: np.ndarray, st: ClassicalSettings) -> tuple[np.ndarray, np.ndarray]:
        """Label image int32 ``(H, W)`` and raw probabilities float32 ``(N,)`` for settings ``st``."""
        d = st.diameter
        zf = normalise(gray, st)
        if zf is None:
            return np.zeros(gray.shape, np.int32), np.zeros(0, np.float32)
        centres, peak = _detect(zf, st)
        if len(centres) == 0:
            return np.zeros(gray.shape, np.int32), np.zeros(0, np.float32)
        cands = _cast_rays(zf, centres, peak, st)
        for _ in range(st.refine):
            moved = _centroids(cands)
            ok = np.isfinite(moved).all(axis=1)
            centres = np.clip(np.where(ok[:, None], moved, centres), 0, np.array(gray.shape) - 1.0)
            cands = _cast_rays(zf, centres, peak, st)
        cands = _merge_duplicates(cands)
        expected = np.pi * d * d / 4
        probs = _probabilities(cands, _polygon_areas(cands), expected)
        labels = _paint(cands, probs, gray.shape, st.max_overlap)
        areas = np.bincount(labels.ravel(), minlength=len(cands.peak) + 1)[1:]
        keep = (areas >= st.min_area * expected) & (areas <= st.max_area * expected)
        # renumber the kept objects 1..N
        lut = np.zeros(len(keep) + 1, np.int32)
        lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        return lut[labels], probs[keep].astype(np.float32)


def normalise(gray: np.ndarray, settings: ClassicalSettings) -> np.ndarray | None:
    """Flattened image float32 ``(H, W)`` in units of the background noise (0 = background), or None
    for a flat image (nothing to find)."""
    d = settings.diameter
    med, scale = _mad_scale(gray.ravel())
    if scale <= 1e-6:
        return None
    z = (gray - med) / scale
    flat = z - ndimage.gaussian_filter(z, settings.background_sigma * d, mode="reflect")
    centre, scale = _mad_scale(flat.ravel())
    if scale <= 1e-6:
        return None
    flat = (flat - centre) / scale
    # Re-estimate the noise on quiet pixels: where cells cover much of the image (dense SH-SY5Y,
    # astrocytes) the whole-image MAD includes them and overestimates it.
    local_rms = np.sqrt(ndimage.gaussian_filter(np.minimum(flat * flat, 100.0), 0.2 * d))
    quiet = local_rms < 2.0
    if quiet.sum() >= 0.05 * flat.size:
        centre, scale = _mad_scale(flat[quiet])
        if scale > 1e-6:
            flat = (flat - centre) / scale
    return flat.astype(np.float32)


def detection_map(zf: np.ndarray, settings: ClassicalSettings) -> np.ndarray:
    """Darkness difference of Gaussians float32 ``(H, W)`` (noise units): positive over cell-sized
    dark regions, largest at their centres."""
    d = settings.diameter
    c = np.clip(zf, -settings.clip, settings.clip)
    return (
        ndimage.gaussian_filter(c, settings.surround_sigma * d)
        - ndimage.gaussian_filter(c, max(settings.detect_sigma * d, 0.7))
    )


def _detect(zf: np.ndarray, st: ClassicalSettings) -> tuple[np.ndarray, np.ndarray]:
    from skimage.feature import peak_local_max

    dog = detection_map(zf, st)
    peaks = peak_local_max(
        dog,
        min_distance=max(int(round(st.min_distance * st.diameter)), 1),
        threshold_abs=st.detect_threshold,
        exclude_border=False,
    )
    return peaks.astype(np.float64), dog[tuple(peaks.T)].astype(np.float64)


def _sample(img: np.ndarray, centres: np.ndarray, theta: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``img`` along rays: float ``(N, K, R)`` for centres ``(N, 2)``,
    angles ``(K,)`` and radii ``(R,)`` (or per-ray radii ``(N, K, R)``)."""
    r = radii if radii.ndim == 3 else radii[None, None, :]
    yy = centres[:, 0, None, None] + np.sin(theta)[None, :, None] * r
    xx = centres[:, 1, None, None] + np.cos(theta)[None, :, None] * r
    shape = np.broadcast_shapes(yy.shape, xx.shape)
    out = ndimage.map_coordinates(
        img, [np.broadcast_to(yy, shape).ravel(), np.broadcast_to(xx, shape).ravel()], order=1, mode="nearest"
    )
    return out.reshape(shape)


def _closed_path(score: np.ndarray, max_jump: int) -> np.ndarray:
    """Per candidate, the radius index per ray ``(N, K)`` of the closed-ish path through ``score``
    ``(N, K, R)`` with the largest sum, moving at most ``max_jump`` indices between neighbouring rays.

    Dynamic programming over the rays unrolled 2.5 times; the middle turn is taken, which is
    (near-)closed because its start and end lie far from the ends of the unrolled path."""
    n, k, r = score.shape
    unrolled = np.concatenate([score, score, score[:, : k // 2]], axis=1)
    length = unrolled.shape[1]
    acc = unrolled[:, 0].copy()
    back = np.zeros((n, length, r), np.int16)
    idx = np.arange(r)
    for step in range(1, length):
        best = np.full((n, r), -np.inf)
        arg = np.zeros((n, r), np.int16)
        for dj in range(-max_jump, max_jump + 1):
            src = np.clip(idx + dj, 0, r - 1)
            v = acc[:, src]
            better = v > best
            best = np.where(better, v, best)
            arg = np.where(better, src[None, :], arg)
        acc = best + unrolled[:, step]
        back[:, step] = arg
    j = np.argmax(acc, axis=1)
    path = np.zeros((n, length), np.int64)
    path[:, -1] = j
    rows = np.arange(n)
    for step in range(length - 1, 0, -1):
        j = back[rows, step, j]
        path[:, step - 1] = j
    out = np.empty((n, k), np.int64)
    out[:, np.arange(k)] = path[:, k : 2 * k]
    return out


def _cast_rays(zf: np.ndarray, centres: np.ndarray, peak: np.ndarray, st: ClassicalSettings) -> _Candidates:
    d = st.diameter
    step = 0.5
    theta = np.linspace(0, 2 * np.pi, st.rays, endpoint=False)
    radii = np.arange(1.0, st.max_radius * d + 1e-6, step)
    smooth = ndimage.gaussian_filter(zf, max(st.edge_sigma * d, 0.5))
    prof = _sample(smooth, centres, theta, radii)
    der = np.gradient(prof, step, axis=2)
    score = np.maximum(der, 0.0)
    if st.size_prior:
        score -= st.size_prior * np.abs(radii - 0.5 * d) / d
    score[:, :, radii < st.ray_min * d] = -1e3
    j = _closed_path(score, max(int(round(st.max_step * d / step)), 1))
    r = radii[j] + st.edge_offset * d
    r = ndimage.median_filter(r, size=(1, 5), mode="wrap")
    ring = r[..., None] + np.array([1.0, 2.0, 3.0]) * max(d / 17.0, 0.5)
    halo = _sample(smooth, centres, theta, ring).mean(axis=(1, 2))
    beyond = r[..., None] + np.array([0.15, 0.25, 0.35]) * d
    outside = np.sqrt((_sample(np.clip(zf, -st.clip, st.clip), centres, theta, beyond) ** 2).mean(axis=(1, 2)))
    return _Candidates(centres, peak, r, halo, outside, theta)


def _polygon(c: _Candidates, i: int, shape) -> tuple[np.ndarray, np.ndarray]:
    from skimage.draw import polygon

    y, x = c.centres[i]
    return polygon(y + np.sin(c.theta) * c.radii[i], x + np.cos(c.theta) * c.radii[i], shape)


def _inside(c: _Candidates, i: int, point: np.ndarray) -> bool:
    """Whether ``point`` (y, x) lies inside candidate ``i``'s contour (radius at its angle)."""
    dy, dx = point - c.centres[i]
    k = len(c.theta)
    angle = np.arctan2(dy, dx) % (2 * np.pi)
    t = angle / (2 * np.pi) * k
    a = int(np.floor(t)) % k
    f = t - np.floor(t)
    r = (1 - f) * c.radii[i, a] + f * c.radii[i, (a + 1) % k]
    return float(np.hypot(dy, dx)) < r


def _merge_duplicates(c: _Candidates) -> _Candidates:
    """Drop the weaker of two candidates whose centres each lie inside the other's contour."""
    n = len(c.peak)
    if n < 2:
        return c
    from scipy.spatial import cKDTree

    reach = c.radii.max(axis=1)
    tree = cKDTree(c.centres)
    pairs = tree.query_pairs(float(reach.max()), output_type="ndarray")
    drop = np.zeros(n, bool)
    order = np.argsort(-c.peak[pairs].max(axis=1), kind="stable") if len(pairs) else []
    for a, b in pairs[order] if len(pairs) else []:
        if drop[a] or drop[b]:
            continue
        if _inside(c, a, c.centres[b]) and _inside(c, b, c.centres[a]):
            drop[b if c.peak[a] >= c.peak[b] else a] = True
    keep = ~drop
    return _Candidates(
        c.centres[keep], c.peak[keep], c.radii[keep], c.halo[keep], c.outside[keep], c.theta
    )


def _centroids(c: _Candidates) -> np.ndarray:
    """Centroid (y, x) of each candidate's contour polygon, float64 ``(N, 2)``."""
    y = c.centres[:, 0, None] + np.sin(c.theta) * c.radii
    x = c.centres[:, 1, None] + np.cos(c.theta) * c.radii
    y2, x2 = np.roll(y, -1, axis=1), np.roll(x, -1, axis=1)
    cross = x * y2 - x2 * y
    area = cross.sum(axis=1) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.column_stack([((y + y2) * cross).sum(1) / (6 * area), ((x + x2) * cross).sum(1) / (6 * area)])


def _polygon_areas(c: _Candidates) -> np.ndarray:
    """Area (px) of each candidate's contour polygon, float64 ``(N,)`` (shoelace formula)."""
    y = c.centres[:, 0, None] + np.sin(c.theta) * c.radii
    x = c.centres[:, 1, None] + np.cos(c.theta) * c.radii
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y, axis=1))


def _paint(c: _Candidates, probs: np.ndarray, shape, max_overlap: float) -> np.ndarray:
    """int32 label image ``(H, W)``: candidate ``i`` is label ``i + 1``. Candidates are painted from
    the most probable down, each onto the pixels still free; one that finds more than
    ``max_overlap`` of its contour taken is a duplicate or a piece of a better object and is left out."""
    labels = np.zeros(shape, np.int32)
    for i in np.argsort(-probs, kind="stable"):
        a, b = _polygon(c, i, shape)
        if a.size == 0:
            continue
        free = labels[a, b] == 0
        if free.sum() < (1.0 - max_overlap) * a.size:
            continue
        labels[a[free], b[free]] = i + 1
    return _largest_pieces(labels)


def _largest_pieces(labels: np.ndarray) -> np.ndarray:
    """Keep each label's largest 4-connected piece (nearest-centre splits can leave slivers)."""
    out = labels.copy()
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        pieces, k = ndimage.label(m)
        if k > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            out[sl][m & (pieces != int(np.argmax(sizes)))] = 0
    return out


def _probabilities(c: _Candidates, areas: np.ndarray, expected: float) -> np.ndarray:
    """Raw probability float64 ``(N,)`` that each candidate is a cell (see the module docstring)."""
    w = np.asarray(SCORE_WEIGHTS, np.float64)
    log_area = np.log(np.maximum(areas, 1) / expected)
    x = np.column_stack([
        np.ones(len(areas)),
        c.peak,
        c.halo,
        c.outside,
        log_area,
        log_area**2,
    ])
    return 1.0 / (1.0 + np.exp(-(x @ w)))


def calibrate(probs: np.ndarray, cell_type: str | None) -> np.ndarray:
    """Map raw probabilities onto scores for ``cell_type``: ``SCORE_OPERATING_POINT`` lands on the
    type's default score threshold (monotone; float32 ``(N,)`` in [0, 1])."""
    p = np.clip(np.asarray(probs, np.float64), 1e-6, 1 - 1e-6)
    target = SCORE_THRESHOLDS.get(cell_type or "", 0.5)
    shift = np.log(target / (1 - target)) - np.log(SCORE_OPERATING_POINT / (1 - SCORE_OPERATING_POINT))
    return (1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + shift)))).astype(np.float32)
