"""The "Fine-tune" dock: train a Mask R-CNN on the image/labels layers the user corrected; the model
then joins the viewer's ensemble (:mod:`.ensemble_store`), which the "Segment cells" dock shows.

Why over 500 lines: one dock's widgets, their wiring and the run/outcome handling; the pair pickers,
presets and the worker job already live in ``_finetune_pairs``, ``_finetune_presets`` and ``_finetune_job``.

Threading and imports:
    * Training runs :func:`._finetune_job.finetune_job` (a generator around
      :func:`napari_sartorius.training.trainer.train`) in a napari worker thread; every yielded
      :class:`TrainProgress` moves the progress bar and the live loss curve, Cancel sets the
      ``threading.Event`` the trainer polls between iterations (the trainer then saves the state
      reached, atomically, and returns normally). The job returns every failure as an outcome with
      ``error`` set, so the dock always ends a run with a message and its buttons back.
    * The settings come from :mod:`napari_sartorius.training.settings`, which imports no torch: the
      dock builds and checks a :class:`TrainSettings` itself. torch is imported inside the worker.
    * Presets: "Quick (CPU)" freezes the backbone (body and FPN) and trains the RPN and heads on
      windows around the labelled cells at a small size, for a few dozen iterations (a CPU can run
      it while the user waits); "Full (GPU)" trains whole images at the model's sizes. An estimate
      of the time (a fresh model's calibration pass included) is shown before starting
      (:func:`estimate_seconds`).

Input checks (shapes, missing labels, no pair) run in the GUI thread before anything starts and are
shown as notifications; nothing is started then. The pair rows and layer pickers live in
:mod:`._finetune_pairs`, the worker job in :mod:`._finetune_job`, the presets and the time estimate in
:mod:`._finetune_presets`; what stays here (~560 lines) is the dock's controls and its run cycle.
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

from ..device import DEVICE_CHOICES  # one list for the CLI and both docks (mps included)
from ..models.config import ARCH_NAMES
from ..training.settings import AugmentationSettings, TrainSettings, multiscale_sizes
from ._finetune_job import FineTuneOutcome, finetune_job
from ._finetune_presets import _AUG_LABELS, _AUG_TIPS, FREEZE_CHOICES, PRESET_CHOICES, PRESETS, estimate_seconds
from ._finetune_pairs import PairChoice, PairPickerMixin, PairRow
from ._layout import scroll_area, tabify_with_sibling_docks
from ._loss_plot import LossPlot
from ._model_list import CHECKPOINT_FILTER
from ._pretrained import pretrained_choice
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


class FineTuneWidget(PairPickerMixin, Container):
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
        self.order_pairs_button = PushButton(
            text="Most uncertain first",
            tooltip="order the pairs by the uncertainty of their labels (90th percentile, then mean; the "
            "Segment dock's review columns): the images most worth correcting come first",
        )
        self.pair_buttons = Container(layout="horizontal", labels=False,
                                      widgets=[self.add_pair_button, self.order_pairs_button])
        self.pair_buttons.margins = (0, 0, 0, 0)
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
        self.preset = ComboBox(
            label="Preset", choices=PRESET_CHOICES, value="quick",
            tooltip="Quick: a CPU run while you wait (frozen backbone, RPN and heads on crops around the cells, small size); "
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
            text="Add to ensemble", enabled=False,
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

        self.settings_box = Container(
            widgets=[
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
        self.settings_box.margins = (0, 0, 0, 0)
        super().__init__(
            widgets=[
                Label(value="<b>Training pairs</b>", tooltip="image layer, its labels layer, cell type"),
                self.pairs,
                self.pair_buttons,
                self.preset,
                self.estimate,
                Label(value="<b>Run</b>"),
                self.output,
                run_box,
                self.progress,
                self.status,
                self.validation_score,
                plot_box,
                Label(value="<b>Settings</b> (scroll)"),
                self.settings_box,
            ],
        )
        self.settings_scroll = scroll_area(self, self.settings_box, min_height=40)
        tabify_with_sibling_docks(self)  # with the Segment dock: tabs, not a 1,200-px column
        self._applying_preset = False
        self.apply_preset("quick")
        self.preset.changed.connect(lambda v: self.apply_preset(v))
        for w in (self.iterations, self.learning_rate, self.batch_size, self.train_size, self.crop_cells, self.freeze,
                  self.aug_switches["resize"]):
            w.changed.connect(self._on_setting_changed)
        for w in (self.device, self.start_checkpoint, self.architecture, self.pretrained):
            w.changed.connect(lambda *_: self._update_estimate())

        self.add_pair_button.changed.connect(lambda *_: self.add_pair())
        self.order_pairs_button.changed.connect(lambda *_: self.order_pairs_by_uncertainty())
        self.run_button.changed.connect(lambda *_: self.run())
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        self.add_to_segment_button.changed.connect(lambda *_: self._on_add_to_segment_clicked())
        self.start_checkpoint.changed.connect(self._on_start_changed)
        self.pretrained.changed.connect(lambda v: self._on_start_changed(v or self.start_checkpoint.value))
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
        device = str(self.device.value)
        if device == "auto":
            device = "cpu"  # the estimate is for the worst case; a GPU is far faster
        fresh = self._start_path() is None and not self.pretrained.value  # calibration pass first
        return estimate_seconds(int(self.iterations.value), int(self.batch_size.value), size, long_edge,
                                int(self.freeze.value), device, windows=bool(crop), fresh=fresh)

    def _update_estimate(self) -> None:
        sec = self.estimated_seconds()
        dev = "a GPU" if str(self.device.value).startswith("cuda") else "this kind of CPU"
        self.estimate.value = f"Estimated time: about {_format_seconds(sec)} on {dev} ({int(self.iterations.value)} iterations)"

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
