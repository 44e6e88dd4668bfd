"""The "Segment cells" dock: run the ensemble on an image layer, then tune the result live.

Why over 500 lines: one dock's widgets, its worker and the live re-render that ties them together;
the model list, review panel, layout helpers and all computation live in their own modules.

Threading and imports:
    * Models run in a napari worker thread on a generator (:func:`_segment_planes`) that wraps
      :func:`napari_sartorius.inference.segment.segment_stack`; each yielded progress step moves the
      dock's progress bar, Cancel sets the stop event the core generator polls and quits the worker.
    * This module imports neither torch nor the model code: the inference and engine modules are
      imported inside the worker on the first run (so napari starts without torch).

Live controls:
    The raw instances of the last run are cached (one :class:`~napari_sartorius.instances.Instances`
    per plane). Every live control re-renders them through
    :func:`napari_sartorius.postprocess.postprocess`, never through a model.

Review: with several models or TTA every cell has an uncertainty (a features column); the embedded
:class:`~napari_sartorius._widgets._review_panel.ReviewPanel` visits the cells most likely wrong first.
Its accept / delete marks on the dock's unedited result layer are recorded against the raw predictions
(``reviewed`` column, deleted cells excluded from post-processing), so re-renders keep them.

User edits are never overwritten: the dock keeps a copy of the array it last rendered; when the
layer's data differs from it (painted, erased, filled, replaced) or the layer was deleted, the next
render goes to a new Labels layer and the edited one is left as it is.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from ..cell_types import (
    DEFAULT_CLASSES,
    FALLBACK_MIN_AREA,
    FALLBACK_SCORE_THRESHOLD,
    MIN_AREAS,
    SCORE_THRESHOLDS,
)
from ..device import DEVICE_CHOICES  # one list for the CLI and both docks (mps included)
from ..inference.settings import FUSION_METHODS, TTA_MODES, SegmentSettings
from ._layout import scroll_area, tabify_with_sibling_docks
from ._model_list import ModelList
from ._review_panel import RenderedReview, ReviewPanel
from .ensemble_store import store_for

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SegmentCellsWidget", "TTA_CHOICES", "ENSEMBLE_CHOICES", "DEVICE_CHOICES"]

TTA_CHOICES = TTA_MODES
ENSEMBLE_CHOICES = ("wbf", *(m for m in FUSION_METHODS if m != "wbf"))  # the default first
#: Slider moves are coalesced: a render starts this long after the last change (ms).
RENDER_DELAY_MS = 30
#: Tooltip of the mask controls while they cannot change anything (only the weight-free engine ran).
BINARY_MASKS_TIP = (
    "no effect on this result: the weight-free engine's masks are binary, without holes or overlaps "
    "(they matter for Mask R-CNN models or TTA)"
)


class Cancelled(Exception):
    """Raised inside the worker when the user pressed Cancel."""


class SegmentError(Exception):
    """A RuntimeError from a model, re-raised under another type.

    superqt's generator worker takes any RuntimeError leaving the generator for "the worker object was
    deleted" and ends silently: no ``errored``, no ``finished``. torch reports most failures (CUDA out
    of memory, shape mismatches) as RuntimeError, so they would leave the dock busy forever.
    """


def _segment_planes(planes, entries, device: str, settings: SegmentSettings, stop: threading.Event):
    """Worker generator (see :func:`_segment_planes_impl`); model RuntimeErrors become SegmentError."""
    try:
        return (yield from _segment_planes_impl(planes, entries, device, settings, stop))
    except RuntimeError as e:
        raise SegmentError(str(e) or type(e).__name__) from e


def _spatial_planes(layer) -> tuple[np.ndarray, tuple[int, ...], bool]:
    """The layer's data as ``(planes, lead_shape, rgb)``.

    ``planes`` has shape ``(P, H, W)`` or ``(P, H, W, C)`` (RGB/RGBA); ``lead_shape`` is the shape of
    the axes before the last two spatial ones (``()`` for a 2-D image), so labels come back as
    ``lead_shape + (H, W)``.
    """
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    rgb = bool(getattr(layer, "rgb", False))
    shape = tuple(data.shape)
    spatial_nd = len(shape) - (1 if rgb else 0)
    if spatial_nd < 2:
        raise ValueError(f"image layer {layer.name!r} has shape {shape}: need at least 2 spatial axes")
    lead = shape[: spatial_nd - 2]
    tail = shape[spatial_nd - 2 :]
    planes = data.reshape((-1,) + tail) if lead else data[None]
    return planes, lead, rgb


def _as_engine_input(plane) -> np.ndarray:
    """One plane as the engines want it: uint8 ``(H, W)`` or ``(H, W, 3)``."""
    from ..io.images import to_uint8_gray

    arr = np.asarray(plane)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    return to_uint8_gray(arr, "image layer")


def _segment_planes_impl(planes, entries, device: str, settings: SegmentSettings, stop: threading.Event):
    """Worker generator: load the engines, segment each plane, return the raw instances.

    Yields ``(fraction done in [0, 1], message, warning or None)``; returns ``(list of Instances, class names)``.
    Runs in a worker thread; touches no Qt object.
    """
    from ._torch_import import guard_torch_import

    guard_torch_import()  # the inference and model modules import torch
    from ..inference.segment import segment_stack
    from ..jobs import relay

    engines, weights = [], []
    for k, entry in enumerate(entries):
        if stop.is_set():
            raise Cancelled()
        yield 0.0, f"loading {entry.name} ({k + 1}/{len(entries)})", None
        try:
            engines.append(entry.get_engine(device))
        except Exception as e:  # noqa: BLE001 - a member that cannot load never costs the others' result
            if len(entries) == 1:
                raise
            yield 0.0, f"{entry.name} left out", f"{entry.name} could not be loaded and was left out: {e}"
            continue
        weights.append(entry.weight)
    if not engines:
        raise ValueError("none of the models could be loaded (see the warnings above)")
    # segment_stack checks that the models know the same classes (and maps their order onto the first's)
    class_names = tuple(engines[0].class_names)
    n = len(planes)
    if stop.is_set():
        raise Cancelled()
    stack = np.stack([_as_engine_input(planes[z]) for z in range(n)])
    def as_dock_step(p):
        total = max(int(getattr(p, "total", 1)), 1)
        msg = str(getattr(p, "message", ""))
        if n == 1 and msg.startswith("plane 1/1: "):
            msg = msg[len("plane 1/1: ") :]
        return min(int(getattr(p, "step", 0)), total) / total, msg, getattr(p, "warning", None)

    job = segment_stack(stack, engines, weights=weights, stop=stop, **settings.as_kwargs())
    results = yield from relay(job, as_dock_step)
    if stop.is_set() or results is None:
        raise Cancelled()
    yield 1.0, "post-processing", None
    return results, class_names


class _ClassRow(Container):
    """Score threshold slider and minimum-area box of one class."""

    def __init__(self, name: str):
        self.class_name = name
        self.score = FloatSlider(
            value=SCORE_THRESHOLDS.get(name, FALLBACK_SCORE_THRESHOLD),
            min=0.0,
            max=1.0,
            step=0.01,
            label=f"{name} score",
            tooltip=f"keep {name} cells scoring at least this (applies when the image's cell type is {name})",
        )
        self.min_area = SpinBox(
            value=MIN_AREAS.get(name, FALLBACK_MIN_AREA),
            min=0,
            max=100000,
            step=5,
            label=f"{name} min area",
            tooltip=f"smallest {name} cell kept, in pixels",
        )
        super().__init__(widgets=[self.score, self.min_area])
        self.margins = (0, 0, 0, 0)


class SegmentCellsWidget(Container):
    """Dock widget: image layer -> ensemble -> live-tuned Labels layer -> COCO JSON / Kaggle CSV.

    Scripted use (what the tests do): pick ``image_layer.value``, add models with
    ``models.add_checkpoint(path)`` / ``models.add_engine(engine)``, call :meth:`run` (or click
    ``segment_button``), wait for :attr:`is_running` to turn False; move live controls or call
    :meth:`rerender`; :meth:`export` writes the result.

    Attributes of interest:
        labels_layer: the Labels layer the last render wrote (None before the first run).
        render_count: how many renders ran (for tests and benchmarks).
        last_render_ms: wall time of the last render (post-processing + layer update).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        import napari.layers

        self._viewer = viewer
        self._worker = None
        self._stop = threading.Event()
        self._raw: list | None = None
        self._crops: list = []  # CleanedCrops per plane, reused while only thresholds move
        self._class_names: tuple[str, ...] = DEFAULT_CLASSES
        self._lead_shape: tuple[int, ...] = ()
        self._source_image = None
        self._rendered: np.ndarray | None = None
        self.labels_layer = None
        self.render_count = 0
        self.last_render_ms = float("nan")
        self.last_cell_type: str | None = None
        self.last_error: str | None = None
        self._review = RenderedReview()
        self.last_warnings: list[str] = []  # warnings of the run whose result is shown

        # -- input and models ---------------------------------------------------------------
        self.image_layer = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self.models = ModelList(store_for(viewer))  # the viewer's ensemble, shared with Fine-tune
        self.tta = ComboBox(label="TTA", choices=TTA_CHOICES, value="none", tooltip="test-time augmentation")
        self.ensemble = ComboBox(
            label="Ensemble", choices=ENSEMBLE_CHOICES, value="wbf", tooltip="how models and TTA variants are fused"
        )
        self.iou = FloatSpinBox(label="Fusion IoU", value=0.55, min=0.05, max=0.95, step=0.05)
        self.device = ComboBox(label="Device", choices=DEVICE_CHOICES, value="auto")
        self.cell_type = ComboBox(
            label="Cell type",
            choices=("auto",) + DEFAULT_CLASSES,
            value="auto",
            tooltip="auto: the majority predicted class decides the thresholds",
        )
        self.segment_button = PushButton(text="Segment cells")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1000, label="Progress")
        self.status = Label(value="")
        run_box = Container(layout="horizontal", labels=False, widgets=[self.segment_button, self.cancel_button])
        run_box.margins = (0, 0, 0, 0)

        # -- live controls ------------------------------------------------------------------
        self.class_rows = Container(labels=True)
        self.class_rows.margins = (0, 0, 0, 0)
        self.mask_threshold = FloatSlider(label="Mask threshold", value=0.5, min=0.05, max=1.0, step=0.01)
        self.max_overlap = FloatSlider(
            label="Max overlap", value=_default_max_overlap(), min=0.0, max=1.0, step=0.01,
            tooltip="drop a cell when more than this fraction of it lies under higher-scored cells",
        )
        self.fill_holes = CheckBox(text="Fill holes", value=True)
        self.keep_largest = CheckBox(text="Keep largest component", value=True)
        self.mask_threshold.tooltip = "a pixel belongs to a cell where its mask probability is at least this"
        self.fill_holes.tooltip = "fill holes inside each cell's mask"
        self._mask_tips = {w: w.tooltip for w in (self.mask_threshold, self.max_overlap, self.fill_holes)}
        self._build_class_rows(DEFAULT_CLASSES)

        # -- export -------------------------------------------------------------------------
        self.export_layer = ComboBox(label="Labels", choices=self._labels_choices, nullable=True)
        self.export_button = PushButton(text="Export COCO JSON / Kaggle CSV...")
        self.review = ReviewPanel(viewer, dock=self)
        self.lower_box = Container(
            widgets=[
                Label(value="<b>Live controls</b> (no model run)"),
                self.class_rows,
                self.mask_threshold,
                self.max_overlap,
                self.fill_holes,
                self.keep_largest,
                Label(value="<b>Review</b> (cells most likely wrong first)"),
                self.review,
                Label(value="<b>Export</b>"),
                self.export_layer,
                self.export_button,
            ]
        )
        self.lower_box.margins = (0, 0, 0, 0)

        super().__init__(
            widgets=[
                self.image_layer,
                Label(value="<b>Models</b> (use, weight)"),
                self.models,
                self.tta,
                self.ensemble,
                self.iou,
                self.device,
                self.cell_type,
                run_box,
                self.progress,
                self.status,
                self.lower_box,
            ]
        )
        # the controls below the run button scroll, so the dock fits a 1366 x 768 screen
        self.lower_scroll = scroll_area(self, self.lower_box)
        tabify_with_sibling_docks(self)  # with the Fine-tune dock: tabs, not a 1,200-px column

        from qtpy.QtCore import QTimer

        self._render_timer = QTimer()
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_DELAY_MS)
        self._render_timer.timeout.connect(self._render_now)

        self.image_layer.changed.connect(self._clear_failure)
        self.segment_button.changed.connect(lambda *_: self.run())
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        self.export_button.changed.connect(self._on_export_clicked)
        for w in (self.mask_threshold, self.max_overlap, self.fill_holes, self.keep_largest, self.cell_type):
            w.changed.connect(self._schedule_render)
        layers_events = viewer.layers.events
        for ev in (layers_events.inserted, layers_events.removed, layers_events.reordered):
            ev.connect(self._refresh_choices)
        self._refresh_choices()
        # Pick the selected image layer, else the top-most one.
        active = viewer.layers.selection.active
        if isinstance(active, napari.layers.Image):
            self.image_layer.value = active

    # -- layer pickers ----------------------------------------------------------------------
    def _image_choices(self, *_):
        import napari.layers

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Image)]

    def _labels_choices(self, *_):
        import napari.layers

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Labels)]

    def _refresh_choices(self, *_):
        self.image_layer.reset_choices()
        self.export_layer.reset_choices()
        if self.image_layer.value is None:
            choices = self._image_choices()
            if choices:
                self.image_layer.value = choices[-1][1]
        if self.labels_layer is not None and self.labels_layer in self._viewer.layers:
            # the layer the user corrected on this image, else the last result
            corrected = store_for(self._viewer).edited_labels(getattr(self._source_image, "name", ""), self._viewer.layers)
            self.export_layer.value = corrected if corrected is not None else self.labels_layer

    # -- live-control rows ------------------------------------------------------------------
    def _build_class_rows(self, class_names) -> None:
        old = {row.class_name: (row.score.value, row.min_area.value) for row in self.class_rows}
        self.class_rows.clear()
        for name in class_names:
            row = _ClassRow(name)
            if name in old:
                row.score.value, row.min_area.value = old[name]
            row.score.changed.connect(self._schedule_render)
            row.min_area.changed.connect(self._schedule_render)
            self.class_rows.append(row)
        ct = self.cell_type.value
        self.cell_type.choices = ("auto",) + tuple(class_names)
        self.cell_type.value = ct if ct in self.cell_type.choices else "auto"

    def class_row(self, name: str) -> _ClassRow:
        """The live-control row (``.score``, ``.min_area``) of class ``name``."""
        for row in self.class_rows:
            if row.class_name == name:
                return row
        raise KeyError(f"no live controls for class {name!r}")

    def settings(self):
        """The current live controls as :class:`~napari_sartorius.postprocess.PostprocessSettings`."""
        from ..postprocess import PostprocessSettings

        rows = list(self.class_rows)
        return PostprocessSettings(
            class_names=tuple(r.class_name for r in rows),
            score_thresholds=tuple(float(r.score.value) for r in rows),
            min_areas=tuple(int(r.min_area.value) for r in rows),
            mask_threshold=float(self.mask_threshold.value),
            max_overlap=float(self.max_overlap.value),
            fill_holes=bool(self.fill_holes.value),
            keep_largest=bool(self.keep_largest.value),
            cell_type=None if self.cell_type.value == "auto" else self.cell_type.value,
        )

    # -- running ----------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def run(self):
        """Start segmenting the selected image layer in a worker thread; returns the worker (or None).

        Problems found before starting (no image, no model) are shown as notifications.
        """
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        if self.is_running:
            return None
        layer = self.image_layer.value
        if layer is None:
            show_error("Segment cells: open or select an image layer first")
            return None
        entries = self.models.selected()
        if not entries:
            show_error("Segment cells: switch on at least one model in the list")
            return None
        try:
            planes, lead, _ = _spatial_planes(layer)
        except ValueError as e:
            show_error(f"Segment cells: {e}")
            return None
        try:
            settings = SegmentSettings(tta=self.tta.value, ensemble=self.ensemble.value, iou_thr=float(self.iou.value))
        except ValueError as e:
            show_error(f"Segment cells: {e}")
            return None
        # the weight-free engine alone, unfused, gives binary masks without holes or overlaps
        binary = all(e.is_classical for e in entries) and settings.tta == "none"
        self._stop = threading.Event()
        self.last_error = None
        self.last_warnings = []
        worker = create_worker(
            _segment_planes,
            planes,
            entries,
            self.device.value,
            settings,
            self._stop,
            _start_thread=False,
            _ignore_errors=True,  # errors become notifications in _on_errored
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(
            lambda res, _layer=layer, _lead=lead, _bin=binary: self._on_returned(res, _layer, _lead, _bin)
        )
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.segment_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.value = 0
        self.status.value = f"segmenting {layer.name}..."
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running segmentation to stop (at its next progress step)."""
        if self._worker is None:
            return
        self._stop.set()
        self._worker.quit()
        self.status.value = "cancelling..."

    def _on_progress(self, item) -> None:
        frac, message, warning = item
        self.progress.value = int(round(1000 * max(0.0, min(1.0, float(frac)))))
        self.status.value = message
        if warning:
            from napari.utils.notifications import show_warning

            self.last_warnings.append(str(warning))
            show_warning(f"Segment cells: {warning}")

    def _on_returned(self, result, image_layer, lead, binary_masks: bool = False) -> None:
        if self._stop.is_set():
            return
        raw, class_names = result
        self.set_predictions(raw, class_names, image_layer, lead_shape=lead, binary_masks=binary_masks)

    def _on_errored(self, exc) -> None:
        from napari.utils.notifications import show_error

        if isinstance(exc, Cancelled) or self._stop.is_set():
            self.status.value = "cancelled"
            return
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.status.value = f"failed: {exc}"
        show_error(f"Segment cells failed: {exc}")

    def _clear_failure(self, *_) -> None:
        """A failure line belongs to the run that failed: gone once the input changes."""
        if not self.is_running and self.status.value.startswith("failed"):
            self.status.value = ""

    def _on_aborted(self) -> None:
        self.status.value = "cancelled"

    def _on_finished(self) -> None:
        self._worker = None
        self.segment_button.enabled = True
        self.cancel_button.enabled = False
        if self._stop.is_set():
            self.progress.value = 0
            self.status.value = "cancelled"

    # -- rendering --------------------------------------------------------------------------
    def set_predictions(
        self, raw, class_names, image_layer=None, lead_shape: tuple[int, ...] = (), binary_masks: bool = False
    ) -> None:
        """Cache raw predictions (one Instances per plane) and render them into a Labels layer.

        A new set of predictions goes to the previous result layer only when that layer shows the
        same image and was not edited; otherwise a new ``"<image> labels"`` layer is added.
        ``binary_masks``: the masks are binary, without holes or overlaps (the weight-free engine
        alone): mask threshold, max overlap and fill holes are disabled, their tooltip says why.
        """
        for w, tip in self._mask_tips.items():
            w.enabled = not binary_masks
            w.tooltip = BINARY_MASKS_TIP if binary_masks else tip
        class_names = tuple(class_names)
        if class_names != tuple(r.class_name for r in self.class_rows):
            self._build_class_rows(class_names)
        if image_layer is not self._source_image:
            self.labels_layer = None  # a different image never reuses the previous result layer
        from ..postprocess import CleanedCrops

        self._raw = list(raw)
        self._review.reset(self._raw)
        self._crops = [CleanedCrops(inst) for inst in self._raw]
        self._class_names = class_names
        self._lead_shape = tuple(lead_shape)
        self._source_image = image_layer
        self._render_now()

    def _schedule_render(self, *_) -> None:
        if self._raw is not None:
            self._render_timer.start()

    def rerender(self) -> None:
        """Re-render the cached predictions with the current live controls now (no model call)."""
        self._render_timer.stop()
        self._render_now()

    def _render_now(self) -> None:
        from napari.utils.notifications import show_error

        if self._raw is None:
            return
        t0 = time.perf_counter()
        try:
            labels, features, cell_type = self._postprocess_all(self.settings())
        except ValueError as e:
            self.status.value = f"failed: {e}"  # never leave the previous result's line standing
            show_error(f"Segment cells: {e}")
            return
        self._write_layer(labels, features, cell_type)
        self.last_render_ms = 1000.0 * (time.perf_counter() - t0)
        self.render_count += 1
        n = len(features["label"])
        ct = cell_type or "none"
        how = "auto" if self.cell_type.value == "auto" else "fixed"
        self.status.value = f"{n} cells, cell type {ct} ({how}); rendered in {self.last_render_ms:.0f} ms"
        if self.last_warnings:  # e.g. a member left out: said with the result it shaped
            self.status.value += f" - {'; '.join(self.last_warnings)}"
        self.progress.value = 1000

    def _postprocess_all(self, settings):
        from ..postprocess import postprocess, stitch_planes

        results = [
            postprocess(inst, settings, cache=c, exclude=self._review.deleted_of(z))
            for z, (inst, c) in enumerate(zip(self._raw, self._crops))
        ]
        types = Counter(r.cell_type for r in results if r.cell_type is not None)
        cell_type = types.most_common(1)[0][0] if types else None
        self.last_cell_type = cell_type
        self._review.rendered(results)
        labels, feats = stitch_planes(results, self._lead_shape)
        return labels, feats, cell_type

    def layer_was_edited(self) -> bool:
        """True when the result layer's data differs from what the dock last rendered into it."""
        layer = self.labels_layer
        if layer is None or self._rendered is None:
            return False
        data = np.asarray(layer.data)
        return data.shape != self._rendered.shape or not np.array_equal(data, self._rendered)

    def _write_layer(self, labels: np.ndarray, features: dict, cell_type: str | None) -> None:
        from napari.utils.notifications import show_info

        layer = self.labels_layer
        metadata = {
            "cell_type": cell_type,
            "class_names": list(self._class_names),
            "image": getattr(self._source_image, "name", None),
        }
        reuse = layer is not None and layer in self._viewer.layers
        edited = reuse and self.layer_was_edited()
        if edited:
            reuse = False
            # the Fine-tune and Export pickers prefer the corrected layer over the new uncorrected one
            store_for(self._viewer).mark_edited(layer, getattr(self._source_image, "name", None))
            show_info(f"'{layer.name}' was edited: kept your edits and wrote the new result to a new layer")
        if reuse:
            layer.data = labels.copy()
            layer.features = features
            layer.metadata.update(metadata)
        else:
            src = self._source_image
            name = f"{src.name} labels" if src is not None else "cells labels"
            if edited:
                name += " (uncorrected)"
            kwargs = {}
            if src is not None and src in self._viewer.layers:
                kwargs = {"scale": src.scale, "translate": src.translate}
            layer = self._viewer.add_labels(
                labels.copy(), name=name, features=features, metadata=metadata, opacity=0.6, **kwargs
            )
            corrected = self.export_layer.value if edited else None
            self.labels_layer = layer
            self.export_layer.reset_choices()
            self.export_layer.value = corrected if corrected is not None else layer
        self._rendered = labels
        self.review.follow(layer)

    # -- review hooks (the review panel calls these for the dock's unedited result layer) -------
    def owns_unedited(self, layer) -> bool:
        """True when ``layer`` is this dock's result layer and was not edited since the last render."""
        return layer is not None and layer is self.labels_layer and not self.layer_was_edited()

    def review_mark(self, label: int) -> None:
        """Record cell ``label`` of the result layer as reviewed, for this and later renders."""
        self._review.mark_reviewed(label)

    def review_delete(self, label: int) -> None:
        """Delete cell ``label`` from the result layer and from later renders (not counted as an edit)."""
        self._review.delete(label)
        layer = self.labels_layer
        data = layer.data
        data[np.asarray(data) == label] = 0
        layer.refresh()
        self._rendered = np.asarray(data).copy()

    # -- export -----------------------------------------------------------------------------
    def export(self, path: str | Path, labels_layer=None, image_layer=None) -> list[str]:
        """Write a Labels layer with its image as COCO JSON (``.json``) or Kaggle CSV (``.csv``).

        Args:
            path: destination; the suffix picks the format.
            labels_layer: default the dock's export choice (the last result).
            image_layer: its image (gives the image id / COCO ``file_name``); default the image the
                labels were computed from, else the dock's image choice. An image without a file is
                written as ``<image id>.png`` beside ``path``.

        Returns:
            The files written, annotation file first.

        Raises:
            ValueError: unknown suffix, no labels layer, labels and image of different sizes.
        """
        from .._writer import write_layers

        path = Path(path)
        layer = labels_layer or self.export_layer.value or self.labels_layer
        if layer is None:
            raise ValueError("nothing to export: segment an image or pick a Labels layer")
        md = layer.metadata or {}
        image = image_layer
        if image is None:
            if layer is self.labels_layer and self._source_image in self._viewer.layers:
                image = self._source_image
            elif md.get("image") and md["image"] in self._viewer.layers:
                image = self._viewer.layers[md["image"]]
            else:
                image = self.image_layer.value
        lmeta = {"name": layer.name, "features": layer.features, "metadata": dict(md)}
        if image is None:
            return write_layers(path, layer.data, lmeta)
        imd = dict(image.metadata or {})
        if getattr(image.source, "path", None):
            imd.setdefault("path", image.source.path)
        imeta = {"name": image.name, "rgb": bool(image.rgb), "metadata": imd}
        return write_layers(path, layer.data, lmeta, image.data, imeta)

    def _on_export_clicked(self, *_):
        from napari.utils.notifications import show_error, show_info
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(
            self.native, "Export annotations", "", "COCO JSON (*.json);;Kaggle CSV (*.csv)"
        )
        if not path:
            return
        try:
            written = self.export(path)
        except (OSError, ValueError) as e:
            show_error(f"Export failed: {e}")
            return
        show_info(f"exported {', '.join(written)}")


def _default_max_overlap() -> float:
    # postprocess is numpy/scipy only (no torch): importing its default is cheap.
    from ..postprocess import DEFAULT_MAX_OVERLAP

    return float(DEFAULT_MAX_OVERLAP)
