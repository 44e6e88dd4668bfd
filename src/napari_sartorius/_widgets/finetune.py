"""The "Fine-tune" dock: train a Mask R-CNN on the image/labels layers the user corrected; the model
then joins the viewer's ensemble (:mod:`.ensemble_store`), which the "Segment cells" dock shows.

Threading and imports:
    * Training runs :func:`._finetune_job.finetune_job` (a generator around
      :func:`napari_sartorius.training.trainer.train`) in a napari worker thread; every yielded
      :class:`TrainProgress` moves the progress bar and the live loss curve, Cancel sets the
      ``threading.Event`` the trainer polls between iterations (the trainer then saves the state
      reached, atomically, and returns normally). The job returns every failure as an outcome with
      ``error`` set, so the dock always ends a run with a message and its buttons back.
    * The settings come from :mod:`napari_sartorius.training.settings`, which imports no torch: the
      dock builds and checks a :class:`TrainSettings` itself. torch is imported inside the worker.
    * Presets: "Quick (CPU)" freezes the backbone body and trains the heads on windows around the
      labelled cells at a small size, for a few dozen iterations (a CPU can run it while the user
      waits); "Full (GPU)" trains whole images at the model's sizes. An estimate of the time is
      shown before starting (:func:`estimate_seconds`).

Input checks (shapes, missing labels, no pair) run in the GUI thread before anything starts and are
shown as notifications; nothing is started then. The pair rows live in :mod:`._finetune_pairs`.
"""

from __future__ import annotations

import threading
from dataclasses import fields
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

from ..models.config import ARCH_NAMES
from ..training.settings import AugmentationSettings, TrainSettings, multiscale_sizes
from ._finetune_job import FineTuneOutcome, finetune_job
from ._finetune_pairs import PairChoice, PairRow, layer_array, planes_of, spatial_shape
from ._loss_plot import LossPlot
from ._model_list import CHECKPOINT_FILTER
from .ensemble_store import store_for

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = [
    "FineTuneWidget",
    "FineTuneOutcome",
    "PairChoice",
    "default_output_path",
    "estimate_seconds",
    "PRESETS",
    "AUG_SWITCHES",
    "AUG_STRENGTHS",
]

DEFAULT_ARCH = "mask_rcnn_R_50_FPN"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
_AUG_DEFAULTS = {f.name: f.default for f in fields(AugmentationSettings)}
#: ``AugmentationSettings`` on/off fields shown as check boxes, with their defaults (from the dataclass).
AUG_SWITCHES: dict[str, bool] = {k: _AUG_DEFAULTS[k] for k in ("crop", "resize", "hflip", "vflip", "rot90")}
#: ``AugmentationSettings`` strength fields (0 = off): default (from the dataclass), maximum, step, label.
AUG_STRENGTHS: dict[str, tuple[float, float, float, str]] = {
    "rotation_degrees": (_AUG_DEFAULTS["rotation_degrees"], 180.0, 1.0, "Rotation (deg)"),
    "brightness": (_AUG_DEFAULTS["brightness"], 0.95, 0.05, "Brightness"),
    "contrast": (_AUG_DEFAULTS["contrast"], 0.95, 0.05, "Contrast"),
    "saturation": (_AUG_DEFAULTS["saturation"], 0.95, 0.05, "Saturation"),
    "lighting": (_AUG_DEFAULTS["lighting"], 1.0, 0.05, "Lighting (PCA)"),
}
#: Control values of each preset (see the module's docstring); "crop_cells" 0 = whole images.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(iterations=40, learning_rate=0.01, batch_size=2, train_size=384, freeze=5, crop_cells=256,
                  resize=False),
    "full": dict(iterations=300, learning_rate=0.0025, batch_size=2, train_size=0, freeze=-1, crop_cells=0,
                 resize=True),
}
PRESET_CHOICES = [("Quick (CPU: heads only, crops around the cells)", "quick"), ("Full (GPU: whole model, whole images)", "full"),
                  ("Custom", "custom")]
#: Seconds per image and megapixel of network input for one R50-FPN training step on one CPU core
#: pair of the development machine (2 cores), body frozen / trainable; see benchmarks/bench_finetune_loop.py.
CPU_SECONDS_PER_MEGAPIXEL = {"frozen": 8.0, "trainable": 20.0}
#: The same on a CUDA GPU (order of magnitude; the first iterations then give the real figure).
GPU_SECONDS_PER_MEGAPIXEL = {"frozen": 0.08, "trainable": 0.2}
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


def estimate_seconds(iterations: int, batch_size: int, short_edge: int, long_edge: int, frozen_body: bool,
                     device: str = "cpu") -> float:
    """Rough wall time (s) of a run: ``iterations x batch x input megapixels x`` seconds per
    megapixel (:data:`CPU_SECONDS_PER_MEGAPIXEL`, or the GPU figures for a CUDA device). The input is
    ``short_edge x long_edge`` pixels after the model's resize."""
    table = GPU_SECONDS_PER_MEGAPIXEL if device.startswith("cuda") else CPU_SECONDS_PER_MEGAPIXEL
    mp = short_edge * long_edge / 1e6
    return float(iterations) * batch_size * mp * table["frozen" if frozen_body else "trainable"]


def default_output_path(folder: str | Path = "~/napari-sartorius", stem: str = "finetuned") -> Path:
    """``<folder>/<stem>.pt``, or ``<stem>_2.pt``, ``_3``, ... : the first name not taken yet."""
    folder = Path(folder).expanduser()
    path = folder / f"{stem}.pt"
    k = 2
    while path.exists():
        path = folder / f"{stem}_{k}.pt"
        k += 1
    return path


def _format_seconds(sec: float | None) -> str:
    if sec is None or not np.isfinite(sec):
        return "?"
    sec = int(round(sec))
    h, rest = divmod(sec, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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
        self.validation = PairRow(self, removable=False)
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
        self.architecture = ComboBox(
            label="Architecture", choices=ARCH_NAMES, value=DEFAULT_ARCH,
            tooltip="architecture of a fresh model (a checkpoint brings its own)",
        )
        self.resume = CheckBox(
            text="Continue the checkpoint's own run (resume)", value=False,
            tooltip="off: a new run from the checkpoint's weights; on: continue its iterations and optimizer state",
        )

        # -- optimisation ------------------------------------------------------------------
        self.preset = ComboBox(
            label="Preset", choices=PRESET_CHOICES, value="quick",
            tooltip="Quick: a CPU run while you wait (frozen body, heads on crops around the cells, small size); "
            "Full: the whole model on whole images (for a GPU); Custom: your own settings below",
        )
        self.estimate = Label(value="")
        self.estimate.native.setWordWrap(True)
        self.crop_cells = SpinBox(
            label="Crop around cells (px)", value=0, min=0, max=4096, step=32,
            tooltip="train on windows of this side around the labelled cells instead of whole images (0: off)",
        )
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
            scrollable=True,  # a 768-px screen: the settings scroll, the run controls come first
            widgets=[
                Label(value="<b>Training pairs</b>", tooltip="image layer, its labels layer, cell type"),
                self.pairs,
                self.add_pair_button,
                self.preset,
                self.estimate,
                Label(value="<b>Run</b>"),
                self.output,
                run_box,
                self.progress,
                self.status,
                self.validation_score,
                plot_box,
                Label(value="<b>Validation pair</b> (optional)"),
                self.validation,
                self.clean_masks,
                Label(value="<b>Model</b>"),
                self.start_checkpoint,
                self.architecture,
                self.resume,
                Label(value="<b>Training</b>"),
                self.iterations,
                self.learning_rate,
                self.batch_size,
                self.train_size,
                self.crop_cells,
                self.freeze,
                self.device,
                self.eval_period,
                Label(value="<b>Augmentation</b>"),
                switch_rows,
                switch_rows2,
                self.crop_fraction,
                *self.aug_strengths.values(),
            ],
        )
        self._applying_preset = False
        self.apply_preset("quick")
        self.preset.changed.connect(lambda v: self.apply_preset(v))
        for w in (self.iterations, self.learning_rate, self.batch_size, self.train_size, self.crop_cells, self.freeze,
                  self.aug_switches["resize"]):
            w.changed.connect(self._on_setting_changed)
        for w in (self.device, self.start_checkpoint, self.architecture):
            w.changed.connect(lambda *_: self._update_estimate())

        self.add_pair_button.changed.connect(lambda *_: self.add_pair())
        self.run_button.changed.connect(lambda *_: self.run())
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        self.add_to_segment_button.changed.connect(lambda *_: self._on_add_to_segment_clicked())
        self.start_checkpoint.changed.connect(self._on_start_changed)
        # closing the dock (or the viewer) mid-run stops the trainer at its next iteration
        stop_holder = self.__dict__  # the current run's Event, read when the Qt widget goes away
        self.native.destroyed.connect(lambda *_: stop_holder["_stop"].set() if "_stop" in stop_holder else None)
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
                # a re-render written after the user's corrections is selected now: pair the corrected one
                corrected = store_for(viewer).edited_labels(img.name, viewer.layers)
                row.set_pair(img, corrected if corrected is not None else active)
        if row.image_layer.value is None:
            images = self._image_choices()
            if images:
                row.image_layer.value = images[-1][1]

    # -- presets and the time estimate ------------------------------------------------------
    def apply_preset(self, name: str) -> None:
        """Set the controls of preset ``name`` ("quick", "full"; "custom" changes nothing)."""
        if name in PRESETS:
            self._applying_preset = True
            try:
                for key, value in PRESETS[name].items():
                    widget = self.aug_switches["resize"] if key == "resize" else getattr(self, key)
                    widget.value = value
            finally:
                self._applying_preset = False
            if self.preset.value != name:
                self.preset.value = name
        self._update_estimate()

    def _on_setting_changed(self, *_) -> None:
        if not self._applying_preset and self.preset.value != "custom":
            self.preset.value = "custom"  # the user left the preset
        self._update_estimate()

    def estimated_seconds(self) -> float:
        """The run's time estimate (s) from the controls (see :func:`estimate_seconds`)."""
        size = int(self.train_size.value) or 800
        crop = int(self.crop_cells.value)
        long_edge = int(round(size * 704 / 520))  # the competition's aspect ratio
        if crop:  # a square window resized to the training size
            long_edge = size
        frozen = int(self.freeze.value) == 5
        device = str(self.device.value)
        if device == "auto":
            device = "cpu"  # the estimate is for the worst case; a GPU is far faster
        return estimate_seconds(int(self.iterations.value), int(self.batch_size.value), size, long_edge, frozen, device)

    def _update_estimate(self) -> None:
        sec = self.estimated_seconds()
        dev = "a GPU" if str(self.device.value).startswith("cuda") else "this kind of CPU"
        self.estimate.value = f"Estimated time: about {_format_seconds(sec)} on {dev} ({int(self.iterations.value)} iterations)"

    # -- layer pickers ----------------------------------------------------------------------
    def _image_choices(self, *_):
        import napari.layers

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Image)]

    def _labels_choices(self, *_):
        import napari.layers

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Labels)]

    def matching_labels(self, image_layer):
        """The Labels layer that most likely holds ``image_layer``'s cells, or None.

        Among the Labels layers of the same (spatial) shape, prefer the one the user corrected on this
        image (the Segment dock records it in the viewer's store), then one whose ``metadata["image"]``
        names the image (the Segment dock writes that), then one whose name starts with the image's,
        then the top-most one.
        """
        shape = spatial_shape(image_layer)
        same = [lay for _, lay in self._labels_choices() if tuple(lay.data.shape) == shape]
        if not same:
            return None
        corrected = store_for(self._viewer).edited_labels(image_layer.name, self._viewer.layers)
        if corrected is not None and corrected in same:
            return corrected
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
            if spatial_shape(lay) == shape:
                return lay
        return None

    def _refresh_choices(self, *_):
        for row in self.pair_rows:
            row.reset_choices()
        self.validation.reset_choices()

    # -- pairs ------------------------------------------------------------------------------
    @property
    def pair_rows(self) -> list[PairRow]:
        return list(self.pairs)

    def add_pair(self, image_layer=None, labels_layer=None, cell_type: str | None = None) -> PairRow:
        """Add a training row (optionally filled in) and return it."""
        row = PairRow(self)
        self.pairs.append(row)
        if image_layer is not None:
            row.set_pair(image_layer, labels_layer, cell_type)
        return row

    def remove_pair(self, row: PairRow) -> None:
        self.pairs.remove(row)

    def set_validation(self, image_layer, labels_layer=None, cell_type: str | None = None) -> None:
        """Choose the validation pair (``None`` image: no validation)."""
        if image_layer is None:
            self.validation.image_layer.value = None
            self.validation.labels_layer.value = None
            return
        self.validation.set_pair(image_layer, labels_layer, cell_type)

    def _check_row(self, row: PairRow, what: str) -> PairChoice:
        image, labels = row.image_layer.value, row.labels_layer.value
        if labels is None:
            if not self._labels_choices():
                raise ValueError(
                    "no Labels layer is open: segment the image (Segment cells) or paint labels first"
                )
            raise ValueError(f"{what}: choose the labels layer drawn on image '{image.name}'")
        ishape, lshape = spatial_shape(image), tuple(labels.data.shape)
        if ishape != lshape:
            raise ValueError(
                f"{what}: labels '{labels.name}' are {'x'.join(map(str, lshape))} but image '{image.name}' is "
                f"{'x'.join(map(str, ishape))}: pick the labels drawn on this image"
            )
        if len(ishape) < 2:
            raise ValueError(f"{what}: image '{image.name}' has shape {ishape}: need height and width")
        lab = layer_array(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{what}: labels '{labels.name}' must hold integer cell ids, not {lab.dtype}")
        n_cells = int(np.count_nonzero(np.unique(lab)))
        planes = planes_of(layer_array(image), lab, bool(getattr(image, "rgb", False)))
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
    def train_settings(self, out: Path, validating: bool) -> TrainSettings:
        """The :class:`TrainSettings` of the controls (checked: a bad value raises ``ValueError``)."""
        iters = int(self.iterations.value)
        kw: dict[str, Any] = dict(
            iters=iters,
            lr=float(self.learning_rate.value),
            batch_size=int(self.batch_size.value),
            warmup_iters=100,  # the trainer caps it at a fifth of the run
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
            # multi-scale: short edges 0.8..1.2 x the size (multiples of 32); off: exactly the size
            edges = (size,) if not aug["resize"] else multiscale_sizes(size)
            aug.update(resize=True, short_edges=edges, max_size=2 * max(edges))
        f = float(self.crop_fraction.value)
        aug["crop_relative_range"] = (f, f)
        return TrainSettings(**kw, augment=AugmentationSettings(**aug))

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
            out = self.output.value
            if out is None or str(out) in ("", "."):
                raise ValueError("choose where to save the fine-tuned model (Save as)")
            out = Path(out).expanduser()
            if out.is_dir():
                raise ValueError(f"'Save as' {out} is a folder: give a file name, e.g. {out / 'finetuned.pt'}")
            if out.suffix == "":
                out = out.with_suffix(".pt")
            settings = self.train_settings(out, validating=val is not None)
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
            finetune_job,
            flat(train),
            flat([val]) if val is not None else [],
            start,
            str(self.architecture.value),
            settings,
            bool(self.clean_masks.value),
            self._stop,
            int(self.crop_cells.value) or None,
            _start_thread=False,
            _ignore_errors=True,  # the job returns its failures; anything else lands in _on_errored
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.add_to_segment_button.enabled = False
        self.progress.max = settings.iters
        self.progress.value = 0
        self.validation_score.value = ""
        self.loss_plot.clear(settings.iters)
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

        if outcome.error is not None:
            self._show_failure(outcome.error)
            return
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
        """An error the job did not turn into an outcome (it returns its own): shown the same way."""
        self._show_failure(f"{type(exc).__name__}: {exc}")

    def _show_failure(self, reason: str) -> None:
        from napari.utils.notifications import show_error

        self.last_error = reason
        text = f"Fine-tune failed: {reason}"
        out = Path(self.output.value).expanduser() if self.output.value is not None else None
        if out is not None and out.is_file():
            text += f" (the last good checkpoint {out} is kept)"
        self.status.value = text
        show_error(text)

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    # -- the ensemble -----------------------------------------------------------------------
    def add_to_segment(self, path: str | Path) -> list:
        """Add checkpoint ``path`` to the viewer's ensemble (the store the Segment cells dock shows,
        now or when it is opened). A member with the same file is replaced, keeping its weight, so
        the new weights load on the next run. Returns the new entries."""
        return [store_for(self._viewer).put_checkpoint(path)]

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
