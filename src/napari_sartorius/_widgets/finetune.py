"""The "Fine-tune" dock: train a Mask R-CNN on the image/labels layers the user corrected, then add it
to the "Segment cells" dock's ensemble.

Threading and imports:
    * Training runs :func:`napari_sartorius.training.trainer.train` (a generator) in a napari worker
      thread (:func:`_finetune_job`); every yielded :class:`TrainProgress` moves the progress bar and
      the live loss curve, Cancel sets the ``threading.Event`` the trainer polls between iterations
      (the trainer then saves the state reached, atomically, and returns normally).
    * This module imports neither torch nor the training code at import time (napari must start
      without torch): they are imported inside the worker. The augmentation switches therefore
      mirror :class:`~napari_sartorius.training.augment.AugmentationSettings` by name and default
      here (:data:`AUG_SWITCHES`, :data:`AUG_STRENGTHS`); a test keeps them in step.

Input checks (shapes, missing labels, no pair) run in the GUI thread before anything starts and are
shown as notifications; nothing is started then.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from ..cell_types import DEFAULT_CLASSES
from ..models.config import ARCH_NAMES
from ._loss_plot import LossPlot
from ._model_list import CHECKPOINT_FILTER
from ._pretrained import fetch_start, pretrained_choice

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = [
    "FineTuneWidget",
    "FineTuneOutcome",
    "PairChoice",
    "find_segment_docks",
    "default_output_path",
    "AUG_SWITCHES",
    "AUG_STRENGTHS",
]

DEFAULT_ARCH = "mask_rcnn_R_50_FPN"
from ..device import DEVICE_CHOICES  # noqa: E402 - one list for the CLI and both docks (mps included)
#: ``AugmentationSettings`` on/off fields shown as check boxes, with their defaults.
AUG_SWITCHES: dict[str, bool] = {"crop": True, "resize": True, "hflip": True, "vflip": True, "rot90": True}
#: ``AugmentationSettings`` strength fields (0 = off): default, maximum, step, label.
AUG_STRENGTHS: dict[str, tuple[float, float, float, str]] = {
    "rotation_degrees": (0.0, 180.0, 1.0, "Rotation (deg)"),
    "brightness": (0.1, 0.95, 0.05, "Brightness"),
    "contrast": (0.1, 0.95, 0.05, "Contrast"),
    "saturation": (0.0, 0.95, 0.05, "Saturation"),
    "lighting": (0.0, 1.0, 0.05, "Lighting (PCA)"),
}
#: Short-edge factors of multi-scale training around a chosen training size.
MULTISCALE = (0.8, 0.9, 1.0, 1.1, 1.2)
_AUG_LABELS = {"crop": "Crop", "resize": "Multi-scale", "hflip": "Flip LR", "vflip": "Flip UD", "rot90": "Rot 90"}
_AUG_TIPS = {
    "crop": "random crop of each image (sides at least 'Crop at least' of the image's)",
    "resize": "multi-scale training: a random short edge per image (see 'Training size')",
    "hflip": "flip left-right with probability 0.5",
    "vflip": "flip up-down with probability 0.5",
    "rot90": "rotate by a random multiple of 90 degrees",
}
#: Frozen stages offered (detectron2's FREEZE_AT); -1 keeps the starting model's setting.
FREEZE_CHOICES = [
    ("as in the model", -1),
    ("0: train everything", 0),
    ("1: freeze the stem", 1),
    ("2: stem + res2", 2),
    ("3: stem + res2-3", 3),
    ("4: stem + res2-4", 4),
    ("5: whole backbone body", 5),
]


def default_output_path(folder: str | Path = "~/napari-sartorius", stem: str = "finetuned") -> Path:
    """``<folder>/<stem>.pt``, or ``<stem>_2.pt``, ``_3``, ... : the first name not taken yet."""
    folder = Path(folder).expanduser()
    path = folder / f"{stem}.pt"
    k = 2
    while path.exists():
        path = folder / f"{stem}_{k}.pt"
        k += 1
    return path


def find_segment_docks(viewer) -> list:
    """The "Segment cells" docks (:class:`SegmentCellsWidget`) open in ``viewer``'s window, in dock order.

    Reads ``viewer.window.dock_widgets`` (napari >= 0.6.2: name -> inner widget, magicgui containers
    as themselves); older napari keeps the ``QDockWidget`` wrappers in ``window._dock_widgets``.
    A Qt widget made by magicgui is mapped back to its magicgui object through ``_magic_widget``.
    """
    from .segment import SegmentCellsWidget

    window = getattr(viewer, "window", None)
    if window is None:
        return []
    try:
        widgets = list(window.dock_widgets.values())
    except AttributeError:  # napari < 0.6.2
        wrapped = getattr(window, "_wrapped_dock_widgets", None) or getattr(window, "_dock_widgets", {})
        widgets = [dw.widget() for dw in wrapped.values()]
    out = []
    for w in widgets:
        w = getattr(w, "_magic_widget", w)
        if isinstance(w, SegmentCellsWidget) and all(w is not o for o in out):
            out.append(w)
    return out


# -- layer data helpers (GUI thread, numpy only) -------------------------------------------------


def _layer_array(layer) -> np.ndarray:
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return np.asarray(data)


def _spatial_shape(layer) -> tuple[int, ...]:
    """The layer's shape without a trailing colour axis (RGB/RGBA images)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def _planes(image: np.ndarray, labels: np.ndarray, rgb: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split ``(..., H, W[, C])`` image / ``(..., H, W)`` labels into 2-D pairs (copies).

    Each plane is converted to uint8 on its own, with the rules of
    :func:`napari_sartorius.io.images.to_uint8_gray`, as the Segment cells dock converts the planes it
    segments: a model is trained on the pixel values it will later be given.
    """
    from ..io.images import to_uint8_gray

    if rgb:
        image = image[..., :3]
    tail = image.shape[-3:] if rgb else image.shape[-2:]
    ims = image.reshape((-1,) + tail)
    labs = labels.reshape((-1,) + labels.shape[-2:])
    out = []
    for i in range(ims.shape[0]):
        im = ims[i]
        im = np.array(im) if im.dtype == np.uint8 else to_uint8_gray(im, "image layer")
        out.append((im, np.array(labs[i])))
    return out


@dataclass
class PairChoice:
    """One chosen image/labels pair, checked: layers, cell type, and the 2-D planes it yields."""

    image_name: str
    labels_name: str
    cell_type: str
    planes: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    n_cells: int = 0


@dataclass
class FineTuneOutcome:
    """What a finished worker hands back to the GUI thread (the model itself stays behind).

    Attributes:
        cancelled: the run was stopped by Cancel.
        iterations: optimizer steps done.
        total: iterations asked for.
        checkpoint_path: the last checkpoint written (None when nothing was saved).
        best_path: the best checkpoint by validation score (None without validation).
        best_score: its competition score.
        final_loss: the last iteration's total loss (None when no iteration ran).
        messages: every message of the run, in order.
    """

    cancelled: bool
    iterations: int
    total: int
    checkpoint_path: Path | None
    best_path: Path | None = None
    best_score: float | None = None
    final_loss: float | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def model_path(self) -> Path | None:
        """The checkpoint to use: the best by validation score when there is one, else the last."""
        return self.best_path or self.checkpoint_path


def _finetune_job(train_pairs, val_pairs, start, arch: str, settings_kw: dict, aug_kw: dict, clean: bool,
                  stop: threading.Event):
    """Worker generator: build the datasets, run the trainer, return a :class:`FineTuneOutcome`.

    Args:
        train_pairs, val_pairs: lists of ``(name, cell type, image uint8 (H, W[, 3]), labels (H, W))``
            (``val_pairs`` may be empty).
        start: the starting checkpoint file, or None for a fresh model of ``arch``.
        settings_kw, aug_kw: keyword arguments of ``TrainSettings`` / ``AugmentationSettings``.
        stop: set by Cancel; the trainer stops between iterations and saves what it reached.

    Yields :class:`~napari_sartorius.training.trainer.TrainProgress`. Touches no Qt object.
    """
    from ._torch_import import guard_torch_import

    guard_torch_import()  # the training modules import torch; see _torch_import
    from ..models.config import ModelConfig
    from ..training.augment import AugmentationSettings
    from ..training.data import dataset_from_pairs
    from ..training.trainer import TrainProgress, TrainSettings, train

    settings = TrainSettings(**settings_kw, augment=AugmentationSettings(**aug_kw))
    # a registry name (the "or pretrained" choice) becomes its cached checkpoint, downloaded once
    start = yield from fetch_start(start, stop, lambda text: TrainProgress(0, settings.iters, message=text))
    yield TrainProgress(0, settings.iters, message="preparing the training data...")

    def dataset(pairs):
        return dataset_from_pairs(
            [(im, lab) for _, _, im, lab in pairs],
            [ct for _, ct, _, _ in pairs],
            names=[name for name, _, _, _ in pairs],
            clean=clean,
        )

    data = dataset(train_pairs)
    val_data = dataset(val_pairs) if val_pairs else None
    where = f"from {start}" if start is not None else f"from a fresh {arch} (random weights)"
    yield TrainProgress(0, settings.iters, message=f"training on {data.describe()} {where}")
    begin = str(start) if start is not None else ModelConfig(arch)
    gen = train(begin, data, settings, val_data, stop)
    result = yield from gen
    outcome = FineTuneOutcome(
        cancelled=bool(result.cancelled),
        iterations=int(result.iterations),
        total=settings.iters,
        checkpoint_path=Path(result.checkpoint_path) if result.checkpoint_path else None,
        best_path=Path(result.best_path) if result.best_path else None,
        best_score=result.best_score,
        final_loss=float(result.history[-1]["total"]) if result.history else None,
        messages=list(result.messages),
    )
    del result  # the trained network is not needed in the GUI thread: it is in the checkpoint
    return outcome


def _format_seconds(sec: float | None) -> str:
    if sec is None or not np.isfinite(sec):
        return "?"
    sec = int(round(sec))
    h, rest = divmod(sec, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _narrow(combo: ComboBox, chars: int) -> None:
    """Let a combo box shrink to about ``chars`` characters (long layer names would widen the dock)."""
    from qtpy.QtWidgets import QComboBox

    native = combo.native
    native.setMinimumContentsLength(chars)
    native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)


class _PairRow(Container):
    """One row: image layer, labels layer, cell type (and a remove button for training rows)."""

    def __init__(self, dock: FineTuneWidget, removable: bool = True):
        self._dock = dock
        self.image_layer = ComboBox(choices=dock._image_choices, nullable=True, tooltip="image layer")
        self.labels_layer = ComboBox(choices=dock._labels_choices, nullable=True, tooltip="its labels (one id per cell)")
        self.cell_type = ComboBox(choices=DEFAULT_CLASSES, value=DEFAULT_CLASSES[0], tooltip="cell type of this image")
        widgets = [self.image_layer, self.labels_layer, self.cell_type]
        self.remove_button = None
        if removable:
            self.remove_button = PushButton(text="\u2715", tooltip="remove this pair")
            self.remove_button.native.setFixedWidth(28)
            widgets.append(self.remove_button)
        super().__init__(layout="horizontal", labels=False, widgets=widgets)
        self.margins = (0, 0, 0, 0)
        _narrow(self.image_layer, 8)
        _narrow(self.labels_layer, 8)
        _narrow(self.cell_type, 5)
        self.image_layer.changed.connect(self._on_image_changed)
        self.labels_layer.changed.connect(self._on_labels_changed)
        if self.remove_button is not None:
            self.remove_button.changed.connect(lambda *_: dock.remove_pair(self))

    def set_pair(self, image_layer, labels_layer=None, cell_type: str | None = None) -> None:
        """Choose the layers (labels: the best match when None) and the cell type (guessed when None)."""
        self.image_layer.value = image_layer
        if labels_layer is not None:
            self.labels_layer.value = labels_layer
        if cell_type is not None:
            self.cell_type.value = cell_type

    def reset_choices(self, *_):
        image, labels = self.image_layer.value, self.labels_layer.value
        super().reset_choices()
        layers = self._dock._viewer.layers
        if image is not None and image not in layers:
            self.image_layer.value = None
        if labels is not None and labels not in layers:
            self.labels_layer.value = None

    def _on_image_changed(self, layer) -> None:
        if layer is None:
            return
        match = self._dock.matching_labels(layer)
        if match is not None:
            self.labels_layer.value = match
        self._guess_cell_type()

    def _on_labels_changed(self, layer) -> None:
        self._guess_cell_type()

    def _guess_cell_type(self) -> None:
        for layer in (self.labels_layer.value, self.image_layer.value):
            ct = (getattr(layer, "metadata", None) or {}).get("cell_type")
            if ct in DEFAULT_CLASSES:
                self.cell_type.value = ct
                return


class FineTuneWidget(Container):
    """Dock widget: corrected image/labels layers -> fine-tuned Mask R-CNN -> Segment cells ensemble.

    Scripted use (what the tests do): fill :attr:`pairs` (``add_pair(image, labels, cell_type)``;
    the dock starts with the selected image and its labels), set the controls (``iterations.value``
    etc.), call :meth:`run` (or click ``run_button``) and wait until :attr:`is_running` is False;
    :meth:`cancel` stops early. Afterwards :attr:`last_outcome` (a :class:`FineTuneOutcome`) or
    :attr:`last_error` tell what happened and :attr:`added_entries` holds the Segment-dock entries.

    Attributes of interest:
        loss_plot: the live curve (:class:`~._loss_plot.LossPlot`; ``.losses`` the points).
        messages: every message the last run produced.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        import napari.layers

        self._viewer = viewer
        self._worker = None
        self._stop = threading.Event()
        self.last_outcome: FineTuneOutcome | None = None
        self.last_error: str | None = None
        self.added_entries: list = []
        self.messages: list[str] = []
        self._pending_path: Path | None = None

        # -- data ---------------------------------------------------------------------------
        self.pairs = Container(labels=False)
        self.pairs.margins = (0, 0, 0, 0)
        self.add_pair_button = PushButton(text="Add pair", tooltip="train on one more image/labels pair")
        self.validation = _PairRow(self, removable=False)
        self.validation.tooltip = "optional: an image/labels pair kept out of training and scored with the competition metric"
        self.clean_masks = CheckBox(
            text="Clean masks", value=False,
            tooltip="before training: fill holes, drop stray fragments, give contested pixels to one cell",
        )

        # -- model --------------------------------------------------------------------------
        self.start_checkpoint = FileEdit(
            label="Start from", mode="r", filter=CHECKPOINT_FILTER, nullable=True,
            tooltip="checkpoint to fine-tune (e.g. LIVECell-pretrained weights); empty: a fresh model",
        )
        self.pretrained = pretrained_choice()
        self.architecture = ComboBox(
            label="Architecture", choices=ARCH_NAMES, value=DEFAULT_ARCH,
            tooltip="architecture of a fresh model (a checkpoint brings its own)",
        )
        self.resume = CheckBox(
            text="Continue the checkpoint's own run (resume)", value=False,
            tooltip="off: a new run from the checkpoint's weights; on: continue its iterations and optimizer state",
        )

        # -- optimisation ------------------------------------------------------------------
        self.iterations = SpinBox(label="Iterations", value=300, min=1, max=1_000_000, step=50)
        self.learning_rate = FloatSpinBox(label="Learning rate", value=0.0025, min=1e-6, max=1.0, step=0.0005)
        self.learning_rate.native.setDecimals(6)
        self.batch_size = SpinBox(label="Batch size", value=2, min=1, max=64)
        self.train_size = SpinBox(
            label="Training size (px)", value=0, min=0, max=4096, step=32,
            tooltip="short image edge during training (upscaling helps small cells); with multi-scale resize "
            "on, 0.8-1.2 times this. 0: the model's own training sizes (multi-scale on) or test size (off)",
        )
        self.freeze = ComboBox(label="Freeze backbone", choices=FREEZE_CHOICES, value=-1)
        self.device = ComboBox(label="Device", choices=DEVICE_CHOICES, value="auto")
        self.eval_period = SpinBox(
            label="Validate every", value=100, min=0, max=1_000_000, step=50,
            tooltip="iterations between validation scores (0: only at the end); needs a validation pair",
        )

        # -- augmentation ------------------------------------------------------------------
        self.aug_switches = {
            k: CheckBox(text=_AUG_LABELS[k], value=v, tooltip=_AUG_TIPS[k]) for k, v in AUG_SWITCHES.items()
        }
        self.crop_fraction = FloatSpinBox(
            label="Crop at least", value=0.7, min=0.1, max=1.0, step=0.05,
            tooltip="smallest crop side as a fraction of the image side",
        )
        self.aug_strengths = {
            k: FloatSpinBox(label=lab, value=v, min=0.0, max=mx, step=st, tooltip="0: off")
            for k, (v, mx, st, lab) in AUG_STRENGTHS.items()
        }
        switch_rows = Container(layout="horizontal", labels=False, widgets=list(self.aug_switches.values())[:3])
        switch_rows2 = Container(layout="horizontal", labels=False, widgets=list(self.aug_switches.values())[3:])
        for c in (switch_rows, switch_rows2):
            c.margins = (0, 0, 0, 0)

        # -- output and run -----------------------------------------------------------------
        self._default_output = default_output_path()
        self.output = FileEdit(label="Save as", mode="w", filter="Checkpoints (*.pt)", value=self._default_output)
        self.run_button = PushButton(text="Fine-tune")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.add_to_segment_button = PushButton(
            text="Use in Segment cells", enabled=False,
            tooltip="add the last checkpoint to the Segment cells dock's ensemble",
        )
        run_box = Container(
            layout="horizontal", labels=False, widgets=[self.run_button, self.cancel_button, self.add_to_segment_button]
        )
        run_box.margins = (0, 0, 0, 0)
        self.progress = ProgressBar(value=0, min=0, max=1, label="Progress")
        self.status = Label(value="")
        self.validation_score = Label(value="")
        for lab in (self.status, self.validation_score):
            lab.native.setWordWrap(True)  # long paths must not widen the dock
        self.loss_plot = LossPlot()
        plot_box = Container(labels=False)
        plot_box.margins = (0, 0, 0, 0)
        plot_box.native.layout().addWidget(self.loss_plot)

        super().__init__(
            scrollable=False,
            widgets=[
                Label(value="<b>Training pairs</b>", tooltip="image layer, its labels layer, cell type"),
                self.pairs,
                self.add_pair_button,
                Label(value="<b>Validation pair</b> (optional)"),
                self.validation,
                self.clean_masks,
                Label(value="<b>Model</b>"),
                self.start_checkpoint,
                self.pretrained,
                self.architecture,
                self.resume,
                Label(value="<b>Training</b>"),
                self.iterations,
                self.learning_rate,
                self.batch_size,
                self.train_size,
                self.freeze,
                self.device,
                self.eval_period,
                Label(value="<b>Augmentation</b>"),
                switch_rows,
                switch_rows2,
                self.crop_fraction,
                *self.aug_strengths.values(),
                Label(value="<b>Run</b>"),
                self.output,
                run_box,
                self.progress,
                self.status,
                self.validation_score,
                plot_box,
            ],
        )

        self.add_pair_button.changed.connect(lambda *_: self.add_pair())
        self.run_button.changed.connect(lambda *_: self.run())
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        self.add_to_segment_button.changed.connect(lambda *_: self._on_add_to_segment_clicked())
        self.start_checkpoint.changed.connect(self._on_start_changed)
        self.pretrained.changed.connect(lambda v: self._on_start_changed(v or self.start_checkpoint.value))
        # closing the dock (or the viewer) mid-run stops the trainer at its next iteration
        self.native.destroyed.connect(lambda *_: self._stop.set())
        self.aug_switches["crop"].changed.connect(lambda v: setattr(self.crop_fraction, "enabled", bool(v)))
        layers_events = viewer.layers.events
        for ev in (layers_events.inserted, layers_events.removed, layers_events.reordered):
            ev.connect(self._refresh_choices)

        # start with the selected image (else the top-most) and its labels
        row = self.add_pair()
        active = viewer.layers.selection.active
        if isinstance(active, napari.layers.Image):
            row.image_layer.value = active
        elif isinstance(active, napari.layers.Labels):
            img = self._image_for_labels(active)
            if img is not None:
                row.set_pair(img, active)
        if row.image_layer.value is None:
            images = self._image_choices()
            if images:
                row.image_layer.value = images[-1][1]

    # -- layer pickers ----------------------------------------------------------------------
    def _image_choices(self, *_):
        import napari.layers

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Image)]

    def _labels_choices(self, *_):
        import napari.layers

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Labels)]

    def matching_labels(self, image_layer):
        """The Labels layer that most likely holds ``image_layer``'s cells, or None.

        Among the Labels layers of the same (spatial) shape, prefer one whose ``metadata["image"]``
        names the image (the Segment dock writes that), then one whose name starts with the image's,
        then the top-most one.
        """
        shape = _spatial_shape(image_layer)
        same = [lay for _, lay in self._labels_choices() if tuple(lay.data.shape) == shape]
        if not same:
            return None
        for lay in reversed(same):
            if (lay.metadata or {}).get("image") == image_layer.name:
                return lay
        for lay in reversed(same):
            if lay.name.startswith(image_layer.name):
                return lay
        return same[-1]

    def _image_for_labels(self, labels_layer):
        md = labels_layer.metadata or {}
        for name, lay in reversed(self._image_choices()):
            if md.get("image") == name:
                return lay
        shape = tuple(labels_layer.data.shape)
        for _, lay in reversed(self._image_choices()):
            if _spatial_shape(lay) == shape:
                return lay
        return None

    def _refresh_choices(self, *_):
        for row in self.pair_rows:
            row.reset_choices()
        self.validation.reset_choices()

    # -- pairs ------------------------------------------------------------------------------
    @property
    def pair_rows(self) -> list[_PairRow]:
        return list(self.pairs)

    def add_pair(self, image_layer=None, labels_layer=None, cell_type: str | None = None) -> _PairRow:
        """Add a training row (optionally filled in) and return it."""
        row = _PairRow(self)
        self.pairs.append(row)
        if image_layer is not None:
            row.set_pair(image_layer, labels_layer, cell_type)
        return row

    def remove_pair(self, row: _PairRow) -> None:
        self.pairs.remove(row)

    def set_validation(self, image_layer, labels_layer=None, cell_type: str | None = None) -> None:
        """Choose the validation pair (``None`` image: no validation)."""
        if image_layer is None:
            self.validation.image_layer.value = None
            self.validation.labels_layer.value = None
            return
        self.validation.set_pair(image_layer, labels_layer, cell_type)

    def _check_row(self, row: _PairRow, what: str) -> PairChoice:
        image, labels = row.image_layer.value, row.labels_layer.value
        if labels is None:
            if not self._labels_choices():
                raise ValueError(
                    "no Labels layer is open: segment the image (Segment cells) or paint labels first"
                )
            raise ValueError(f"{what}: choose the labels layer drawn on image '{image.name}'")
        ishape, lshape = _spatial_shape(image), tuple(labels.data.shape)
        if ishape != lshape:
            raise ValueError(
                f"{what}: labels '{labels.name}' are {'x'.join(map(str, lshape))} but image '{image.name}' is "
                f"{'x'.join(map(str, ishape))}: pick the labels drawn on this image"
            )
        if len(ishape) < 2:
            raise ValueError(f"{what}: image '{image.name}' has shape {ishape}: need height and width")
        lab = _layer_array(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{what}: labels '{labels.name}' must hold integer cell ids, not {lab.dtype}")
        n_cells = int(np.count_nonzero(np.unique(lab)))
        planes = _planes(_layer_array(image), lab, bool(getattr(image, "rgb", False)))
        return PairChoice(image.name, labels.name, str(row.cell_type.value), planes, n_cells)

    def checked_pairs(self) -> tuple[list[PairChoice], PairChoice | None]:
        """The training pairs and the validation pair (or None), checked.

        Raises:
            ValueError: no pair, a pair without labels, labels of another shape than their image,
                no labelled cell at all (the message says what to do).
        """
        rows = [r for r in self.pair_rows if r.image_layer.value is not None]
        if not rows:
            if not self._image_choices():
                raise ValueError("no image layer is open: open an image and its labels first")
            raise ValueError("choose at least one image/labels pair to train on (Add pair)")
        train = [self._check_row(r, f"pair {i + 1}") for i, r in enumerate(rows)]
        if sum(p.n_cells for p in train) == 0:
            raise ValueError("the chosen labels hold no cell: paint or segment some cells first")
        seen = set()
        for p in train:
            key = (p.image_name, p.labels_name)
            if key in seen:
                raise ValueError(f"the pair '{p.image_name}' / '{p.labels_name}' is chosen twice")
            seen.add(key)
        val = None
        if self.validation.image_layer.value is not None:
            val = self._check_row(self.validation, "validation pair")
            if val.n_cells == 0:
                raise ValueError(f"the validation labels '{val.labels_name}' hold no cell")
            if (val.image_name, val.labels_name) in seen:
                raise ValueError("the validation pair is also a training pair: pick another one, or none")
        return train, val

    # -- settings ---------------------------------------------------------------------------
    def train_settings(self, out: Path, validating: bool) -> tuple[dict, dict]:
        """``TrainSettings`` and ``AugmentationSettings`` keyword arguments from the controls."""
        iters = int(self.iterations.value)
        kw: dict[str, Any] = dict(
            iters=iters,
            lr=float(self.learning_rate.value),
            batch_size=int(self.batch_size.value),
            warmup_iters=100,
            device=str(self.device.value),
            out=str(out),
            resume=bool(self.resume.value),
            checkpoint_period=min(500, iters),
            eval_period=int(self.eval_period.value) if validating else 0,
        )
        if int(self.freeze.value) >= 0:
            kw["freeze_at"] = int(self.freeze.value)
        aug: dict[str, Any] = {k: bool(w.value) for k, w in self.aug_switches.items()}
        aug.update({k: float(w.value) for k, w in self.aug_strengths.items()})
        size = int(self.train_size.value)
        if size > 0:
            # multi-scale: short edges 0.8..1.2 x the size; off: exactly the size (a single scale)
            edges = (size,) if not aug["resize"] else tuple(sorted({int(round(size * f)) for f in MULTISCALE}))
            aug.update(resize=True, short_edges=edges, max_size=2 * max(edges))
        f = float(self.crop_fraction.value)
        aug["crop_relative_range"] = (f, f)
        return kw, aug

    def _on_start_changed(self, value) -> None:
        has = value is not None and str(value) not in ("", ".")
        self.architecture.enabled = not has
        self.resume.enabled = has

    def _start_path(self) -> Path | None:
        v = self.start_checkpoint.value
        if v is None or str(v) in ("", "."):
            return None
        return Path(v).expanduser()

    # -- running ----------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def run(self):
        """Check the input and start fine-tuning in a worker thread; returns the worker, or None when
        the input is not usable (a notification says why) or a run is already going."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        if self.is_running:
            return None
        try:
            train, val = self.checked_pairs()
            start = self._start_path()
            if start is not None and not start.is_file():
                raise ValueError(f"the starting checkpoint {start} does not exist: pick a file or leave it empty")
            if start is None and self.pretrained.value:
                start = str(self.pretrained.value)  # fetched (downloaded once) in the worker
            out = self.output.value
            if out is None or str(out) in ("", "."):
                raise ValueError("choose where to save the fine-tuned model (Save as)")
            out = Path(out).expanduser()
            if out.is_dir():
                raise ValueError(f"'Save as' {out} is a folder: give a file name, e.g. {out / 'finetuned.pt'}")
            if out.suffix == "":
                out = out.with_suffix(".pt")
            settings_kw, aug_kw = self.train_settings(out, validating=val is not None)
        except (ValueError, OSError) as e:
            self.last_error = str(e)
            self.status.value = f"not started: {e}"
            show_error(f"Fine-tune: {e}")
            return None

        def flat(pairs):
            out_pairs = []
            for p in pairs:
                for z, (im, lab) in enumerate(p.planes):
                    name = p.image_name if len(p.planes) == 1 else f"{p.image_name}[{z}]"
                    out_pairs.append((name, p.cell_type, im, lab))
            return out_pairs

        self._stop = threading.Event()
        self.last_error = None
        self.last_outcome = None
        self.added_entries = []
        self.messages = []
        self._pending_path = None
        worker = create_worker(
            _finetune_job,
            flat(train),
            flat([val]) if val is not None else [],
            start,
            str(self.architecture.value),
            settings_kw,
            aug_kw,
            bool(self.clean_masks.value),
            self._stop,
            _start_thread=False,
            _ignore_errors=True,  # errors become notifications in _on_errored
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.add_to_segment_button.enabled = False
        self.progress.max = int(settings_kw["iters"])
        self.progress.value = 0
        self.validation_score.value = ""
        self.loss_plot.clear(int(settings_kw["iters"]))
        n_img = sum(len(p.planes) for p in train)
        self.status.value = f"starting: {n_img} image(s), {sum(p.n_cells for p in train)} cells..."
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the run to stop after the current iteration; it saves the state reached and returns."""
        if self._worker is None:
            return
        self._stop.set()
        self.cancel_button.enabled = False
        self.status.value = "cancelling after this iteration..."

    def _on_progress(self, p) -> None:
        if p.message:
            self.messages.append(p.message)
        if p.losses:
            total = p.losses.get("total", sum(v for k, v in p.losses.items()))
            self.loss_plot.add_loss(p.iteration, total)
            self.progress.max = max(1, int(p.total))
            self.progress.value = min(int(p.iteration), int(p.total))
            if not self._stop.is_set():
                self.status.value = (
                    f"iteration {p.iteration}/{p.total}, loss {total:.3f}, lr {p.lr:.2g}, "
                    f"{_format_seconds(p.seconds_left)} left"
                )
        elif p.message and not self._stop.is_set():
            self.status.value = p.message
        if p.val_score is not None:
            self.loss_plot.add_score(p.iteration, p.val_score)
            self.validation_score.value = f"validation score {p.val_score:.4f} at iteration {p.iteration}"

    def _on_returned(self, outcome: FineTuneOutcome) -> None:
        from napari.utils.notifications import show_info, show_warning

        self.last_outcome = outcome
        path = outcome.model_path
        if outcome.cancelled:
            if path is not None:
                text = (f"Cancelled at iteration {outcome.iterations} of {outcome.total}; the checkpoint reached is "
                        f"kept at {path} (not added to Segment cells: use the button to add it)")
                self._pending_path = path
                self.add_to_segment_button.enabled = True
            else:
                text = f"Cancelled at iteration {outcome.iterations} of {outcome.total}; no checkpoint was written"
            self.status.value = text
            show_warning(text)
            return
        if path is None:
            self.status.value = "Finished, but no checkpoint was written"
            show_warning(self.status.value)
            return
        which = f" (best validation score {outcome.best_score:.4f})" if outcome.best_path else ""
        try:
            self.added_entries = self.add_to_segment(path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            self._pending_path = path
            self.add_to_segment_button.enabled = True
            text = f"Fine-tuned for {outcome.iterations} iterations; saved to {path}{which}; could not add it to Segment cells: {e}"
            self.status.value = text
            show_warning(text)
        else:
            text = f"Fine-tuned for {outcome.iterations} iterations; saved to {path}{which} and added to Segment cells"
            self.status.value = text
            show_info(text)
        self.progress.value = self.progress.max
        # the next run should not overwrite this model unless the user chose the name
        if self.output.value is not None and Path(self.output.value).expanduser() == self._default_output:
            self._default_output = default_output_path(self._default_output.parent)
            self.output.value = self._default_output

    def _on_errored(self, exc) -> None:
        from napari.utils.notifications import show_error

        self.last_error = f"{type(exc).__name__}: {exc}"
        text = f"Fine-tune failed: {exc}"
        out = Path(self.output.value).expanduser() if self.output.value is not None else None
        if out is not None and out.is_file():
            text += f" (the last good checkpoint {out} is kept)"
        self.status.value = text
        show_error(text)

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    # -- the Segment cells dock -------------------------------------------------------------
    def add_to_segment(self, path: str | Path) -> list:
        """Add checkpoint ``path`` to every open "Segment cells" dock of this viewer (opening one when
        none is open). A path already in a dock's list is replaced (keeping its weight), so the new
        weights are loaded on the next run. Returns the new model entries."""
        path = Path(path).expanduser().resolve()
        docks = find_segment_docks(self._viewer)
        if not docks:
            _, widget = self._viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
            docks = [getattr(widget, "_magic_widget", widget)]
        entries = []
        for dock in docks:
            weight = 1.0
            for e in dock.models.entries:
                if e.path is not None and Path(e.path) == path:
                    weight = e.weight
                    dock.models.remove(e)
            entries.append(dock.models.add_checkpoint(path, weight=weight))
        return entries

    def _on_add_to_segment_clicked(self) -> None:
        from napari.utils.notifications import show_error, show_info

        if self._pending_path is None:
            return
        try:
            self.added_entries = self.add_to_segment(self._pending_path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            show_error(f"Could not add {self._pending_path} to Segment cells: {e}")
            return
        show_info(f"{self._pending_path.name} added to Segment cells")
        self._pending_path = None
        self.add_to_segment_button.enabled = False
