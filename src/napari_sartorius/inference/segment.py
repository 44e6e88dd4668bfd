"""The segmentation job: engines x TTA variants (x tiles), fused into one set of raw instances.

:func:`segment_image` is a *generator*: it yields a :class:`SegmentProgress` after every
``predict_batch`` call (one per engine x tile x TTA shape group) and once more after fusion, and
*returns* the fused raw :class:`~napari_sartorius.instances.Instances` (``StopIteration.value``). The
raw result is the cache: thresholds, overlap removal and mask cleaning are applied afterwards by
:func:`napari_sartorius.postprocess.postprocess`, without running the models again.

In napari, run it with ``napari.qt.threading.thread_worker`` / ``create_worker`` and connect
``yielded`` (progress), ``returned`` (the Instances) and ``errored``; in a script or the CLI use
:func:`run_to_completion`. It takes plain callables, never Qt objects.

Stopping: pass ``stop`` (a ``threading.Event`` or a callable returning True when the user asked to
stop). It is checked before every engine call and before fusion; when set, the generator raises
:class:`SegmentationCancelled` and returns nothing (no partial result). A worker's ``errored`` handler
can tell a cancel from a failure with ``isinstance(exc, SegmentationCancelled)``.

A single engine without TTA is passed through: its raw output (tiles merged) is returned unfused.
Every other case is fused with :func:`~napari_sartorius.inference.ensemble.fuse_instances`; each TTA
variant of each engine is one source carrying that engine's weight.

A failing member never costs the others' result: when one engine of several raises, it is left out,
the next progress carries a ``warning`` naming it and its error (and ``failed`` lists it), and the
others are fused as if it had not been asked. Only when every engine fails does the first error
propagate (as it does for a single engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Iterator, Sequence, TypeVar

import numpy as np

from ..instances import Instances
from ..jobs import relay, run_job
from ..stopping import stop_requested
from .engine import MovableEngine, check_engine, engine_name
from .ensemble import CONF_TYPES, METHODS, fuse_instances
from .tiling import (
    DEFAULT_MAX_TILE,
    DEFAULT_OVERLAP,
    Tile,
    merge_tiles,
    needs_tiling,
    shift_instances,
    tile_windows,
)
from .tta import check_image, invert_batch, predict_checked, tta_batches, tta_transforms

__all__ = [
    "SegmentProgress",
    "SegmentationCancelled",
    "segment_image",
    "segment_stack",
    "count_steps",
    "run_to_completion",
]

T = TypeVar("T")


@dataclass(frozen=True)
class SegmentProgress:
    """Progress of a segmentation job.

    Attributes:
        step: steps done so far (1..total).
        total: steps of the whole job (engine calls, plus one for fusion when there is one).
        message: what was just done, e.g. ``"model 2/3 (R50), flips"``.
        plane: 0-based plane index for :func:`segment_stack`, else None.
        warning: a message for the user when something changed on the way (e.g. the GPU ran out of
            memory and the job continues on the CPU, or a model failed and was left out), else None.
        failed: names of the models that failed so far and were left out of the result.
    """

    step: int
    total: int
    message: str
    plane: int | None = None
    warning: str | None = None
    failed: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0


class SegmentationCancelled(Exception):
    """The user asked to stop; no result is returned."""


def _check_stop(stop, step: int, total: int) -> None:
    if stop_requested(stop):
        raise SegmentationCancelled(f"segmentation stopped after {step} of {total} steps")


def _class_maps(engines: Sequence) -> list[np.ndarray | None]:
    """Per engine, the map from its class indices to the first engine's (None when identical)."""
    names0 = tuple(engines[0].class_names)
    maps: list[np.ndarray | None] = []
    for e in engines:
        names = tuple(e.class_names)
        if names == names0:
            maps.append(None)
            continue
        if sorted(names) != sorted(names0) or len(set(names)) != len(names):
            raise ValueError(
                f"the models disagree on their classes: {engine_name(engines[0])!r} has "
                f"{list(names0)}, {engine_name(e)!r} has {list(names)}; ensemble only models "
                "trained on the same cell types"
            )
        maps.append(np.array([names0.index(n) for n in names], np.int64))
    return maps


def _remap(inst: Instances, mapping: np.ndarray | None) -> Instances:
    if mapping is None or not len(inst):
        return inst
    return Instances(inst.image_size, inst.boxes, inst.scores, mapping[inst.classes], inst.masks, inst.mask_origins)


def _predict(engine, images, notes: list[str], what: str) -> list[Instances]:
    """``predict_batch``, with the CPU fallback on GPU out-of-memory for engines that can move
    (a ``device`` attribute and a ``to(device)`` method)."""
    if not isinstance(engine, MovableEngine) or engine.device is None:
        return predict_checked(engine, images)
    device = engine.device
    import torch

    from ..device import run_with_oom_fallback

    if torch.device(device).type == "cpu":
        return predict_checked(engine, images)

    def call(dev):
        if torch.device(engine.device) != dev:
            engine.to(dev)
        return predict_checked(engine, images)

    return run_with_oom_fallback(call, device, on_fallback=notes.append, what=what)


def _tiles(size: tuple[int, int], max_tile: int | None, overlap: int) -> list[Tile]:
    if needs_tiling(size, max_tile):
        return tile_windows(size, max_tile, overlap)
    h, w = size
    return [Tile(0, 0, h, w, 0.0, 0.0, float(h), float(w))]


def _n_groups(shape: tuple[int, int], transforms) -> int:
    return len({t.output_size(shape) for t in transforms})


def count_steps(
    image_shape: tuple[int, ...],
    n_engines: int,
    *,
    tta: str = "none",
    scales: Sequence[float] | None = None,
    max_tile: int | None = DEFAULT_MAX_TILE,
    tile_overlap: int = DEFAULT_OVERLAP,
) -> int:
    """The ``total`` that :func:`segment_image` reports for an image of ``image_shape``."""
    size = (int(image_shape[0]), int(image_shape[1]))
    transforms = tta_transforms(tta, scales)
    calls = n_engines * sum(_n_groups(t.shape, transforms) for t in _tiles(size, max_tile, tile_overlap))
    fuses = not (n_engines == 1 and len(transforms) == 1)
    return calls + int(fuses)


def segment_image(
    image: np.ndarray,
    engines: Sequence,
    *,
    weights: Sequence[float] | None = None,
    tta: str = "none",
    ensemble: str = "wbf",
    iou_thr: float = 0.5,
    skip_box_thr: float = 0.0,
    conf_type: str = "avg",
    scales: Sequence[float] | None = None,
    max_tile: int | None = DEFAULT_MAX_TILE,
    tile_overlap: int = DEFAULT_OVERLAP,
    average_masks: bool = True,
    stop=None,
    plane: int | None = None,
) -> Generator[SegmentProgress, None, Instances]:
    """Segment one image with an ensemble of engines and TTA; a generator (see the module docstring).

    Every argument after ``engines`` is keyword-only.

    Args:
        image: (H, W) grayscale or (H, W, 3) RGB, uint8 or float in 0..255.
        engines: objects following the engine contract (``class_names``, ``name``, ``predict_batch``);
            all must know the same class names (the first engine's order is used).
        weights: one positive weight per engine (default 1 each).
        tta: TTA mode, one of :data:`~napari_sartorius.inference.tta.TTA_MODES`; ``scales`` for
            ``"multiscale"``.
        ensemble, iou_thr, skip_box_thr, conf_type, average_masks: fusion settings
            (:func:`~napari_sartorius.inference.ensemble.fuse_instances`).
        max_tile, tile_overlap: images longer than ``max_tile`` pixels on a side are processed in
            tiles overlapping by ``tile_overlap`` pixels (None: never tile).
        stop: None, a ``threading.Event`` or a callable returning True to stop.
        plane: reported in the progress (used by :func:`segment_stack`).

    Yields:
        :class:`SegmentProgress` after every engine call and after fusion.

    Returns:
        The fused raw Instances (``image_size == image.shape[:2]``; classes index the first engine's
        ``class_names``).

    Raises:
        SegmentationCancelled: ``stop`` was set.
        ValueError: bad image, engines, weights or settings (checked before any engine runs).
    """
    image = check_image(image)
    size = image.shape[:2]
    engines = list(engines)
    if not engines:
        raise ValueError("segment_image needs at least one engine (model)")
    for e in engines:
        check_engine(e)
    w = np.ones(len(engines)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if len(w) != len(engines) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"need one positive weight per model: {len(engines)} models, weights {list(w)}")
    if ensemble not in METHODS:
        raise ValueError(f"unknown ensemble method {ensemble!r}: use one of {', '.join(METHODS)}")
    if conf_type not in CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}: use one of {', '.join(CONF_TYPES)}")
    transforms = tta_transforms(tta, scales)
    maps = _class_maps(engines)
    tiles = _tiles(size, max_tile, tile_overlap)
    total = count_steps(size, len(engines), tta=tta, scales=scales, max_tile=max_tile, tile_overlap=tile_overlap)
    fuse = not (len(engines) == 1 and len(transforms) == 1)

    sources: list[Instances] = []
    source_weights: list[float] = []
    notes: list[str] = []
    failed: list[str] = []
    first_error: Exception | None = None
    calls_per_engine = (total - int(fuse)) // len(engines)
    step = 0
    for e_idx, engine in enumerate(engines):
        name = engine_name(engine)
        per_variant: list[list[Instances | None]] = [[None] * len(tiles) for _ in transforms]
        start = step
        try:
            for t_idx, tile in enumerate(tiles):
                batches = tta_batches(image[tile.slices], tta, scales)
                for b_idx, batch in enumerate(batches):
                    _check_stop(stop, step, total)
                    where = f"model {e_idx + 1}/{len(engines)} ({name}), {tta}"
                    if len(tiles) > 1:
                        where += f", tile {t_idx + 1}/{len(tiles)}"
                    if len(batches) > 1:
                        where += f", batch {b_idx + 1}/{len(batches)}"
                    preds = _predict(engine, batch.images, notes, f"while running {where}")
                    for v, inst in zip(batch.indices, invert_batch(batch, preds, tile.shape)):
                        inst = _remap(inst, maps[e_idx])
                        if len(tiles) > 1:
                            inst = shift_instances(inst, tile.y0, tile.x0, size)
                        per_variant[v][t_idx] = inst
                    step += 1
                    yield SegmentProgress(step, total, where, plane, notes.pop(0) if notes else None, tuple(failed))
        except SegmentationCancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - one member's failure is reported, the others go on
            if len(engines) == 1:
                raise
            first_error = first_error or exc
            failed.append(name)
            step = start + calls_per_engine
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = f"model {e_idx + 1}/{len(engines)} ({name}) failed and was left out: {reason}"
            yield SegmentProgress(step, total, message, plane, message, tuple(failed))
            continue
        for parts in per_variant:
            sources.append(merge_tiles(parts, tiles, size) if len(tiles) > 1 else parts[0])
            source_weights.append(float(w[e_idx]))

    if not sources:  # every member failed
        raise first_error
    if len(sources) == 1:  # a single source left (one engine, no TTA): passed through as it is
        if fuse:
            message = f"one model left ({', '.join(failed)} failed): its result is used unfused"
            yield SegmentProgress(total, total, message, plane, notes.pop(0) if notes else None, tuple(failed))
        return sources[0]
    _check_stop(stop, step, total)
    n_cand = sum(len(s) for s in sources)
    fused = fuse_instances(
        sources,
        source_weights,
        ensemble,
        iou_thr=iou_thr,
        skip_box_thr=skip_box_thr,
        conf_type=conf_type,
        average_masks=average_masks,
    )
    step += 1
    message = f"fused {n_cand} candidates from {len(sources)} sources into {len(fused)} instances ({ensemble})"
    yield SegmentProgress(step, total, message, plane, notes.pop(0) if notes else None, tuple(failed))
    return fused


def segment_stack(
    images: np.ndarray,
    engines: Sequence,
    **kwargs,
) -> Generator[SegmentProgress, None, list[Instances]]:
    """Segment a stack plane by plane: ``images`` (Z, H, W) or (Z, H, W, 3).

    Takes the keyword arguments of :func:`segment_image` (``stop`` included). Progress counts the steps
    of the whole stack and carries the plane index. Returns one Instances per plane.
    """
    images = np.asarray(images)
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise ValueError(
            f"expected a stack of shape (planes, height, width) or (planes, height, width, 3), got {images.shape}"
        )
    engines = list(engines)
    count_keys = ("tta", "scales", "max_tile", "tile_overlap")
    per_plane = count_steps(images.shape[1:3], len(engines), **{k: kwargs[k] for k in count_keys if k in kwargs})
    total = per_plane * len(images)
    results: list[Instances] = []
    for z, plane_image in enumerate(images):

        def in_stack(p: SegmentProgress, z: int = z) -> SegmentProgress:
            message = f"plane {z + 1}/{len(images)}: {p.message}"
            return SegmentProgress(z * per_plane + p.step, total, message, z, p.warning, p.failed)

        results.append((yield from relay(segment_image(plane_image, engines, plane=z, **kwargs), in_stack)))
    return results


def run_to_completion(
    gen: Generator[SegmentProgress, None, T] | Iterator,
    on_progress: Callable[[SegmentProgress], None] | None = None,
) -> T:
    """Drive a job generator to its end, passing every progress to ``on_progress``; return its value.

    :func:`napari_sartorius.jobs.run_job` under the name scripts already use. Exceptions of the job
    (``SegmentationCancelled`` included) propagate.
    """
    return run_job(gen, on_progress)
