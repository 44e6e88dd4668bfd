"""The ensemble's member list of the "Segment cells" dock.

One row per model: an on/off box, its name, its weight in the ensemble and a remove button. The
weight-free classical engine is always the first row and cannot be removed (it can be switched off).
The members live in the viewer's :class:`~.ensemble_store.EnsembleStore` (the list observes it, so a
model the Fine-tune dock adds shows up here). Checkpoint files are only remembered when added; they are loaded (which imports torch) the first time
a run needs them, in the worker thread, and kept per device for later runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from magicgui.widgets import CheckBox, Container, FloatSpinBox, Label, PushButton

from .ensemble_store import CLASSICAL_NAME, EnsembleStore, ModelEntry

__all__ = ["ModelEntry", "ModelList", "CLASSICAL_NAME"]

#: Checkpoint suffixes offered by the file dialog (the project's own, torchvision and detectron2 ones).
CHECKPOINT_FILTER = "Checkpoints (*.pt *.pth *.ckpt *.pkl);;All files (*)"


class _ModelRow(Container):
    def __init__(self, entry: ModelEntry, on_remove: Callable[[ModelEntry], None]):
        self.entry = entry
        self.use = CheckBox(value=entry.enabled, text="", tooltip="use this model in the next run")
        self.title = Label(value=entry.name, tooltip=str(entry.path) if entry.path else entry.name)
        self.weight = FloatSpinBox(
            value=entry.weight, min=0.01, max=100.0, step=0.1, tooltip="weight of this model in the ensemble"
        )
        self.remove = PushButton(text="Remove", enabled=not entry.is_classical)
        super().__init__(layout="horizontal", labels=False, widgets=[self.use, self.title, self.weight, self.remove])
        self.margins = (0, 0, 0, 0)
        self.use.changed.connect(lambda v: setattr(entry, "enabled", bool(v)))
        self.weight.changed.connect(lambda v: setattr(entry, "weight", float(v)))
        self.remove.changed.connect(lambda *_: on_remove(entry))


class ModelList(Container):
    """The ensemble members, with "Add checkpoint..." (file dialog) and per-row remove buttons.

    Scripted use (and tests): :meth:`add_checkpoint`, :meth:`add_engine`, :meth:`remove`,
    :attr:`entries`, :meth:`selected`.
    """

    def __init__(self, store: EnsembleStore | None = None):
        self._store = store if store is not None else EnsembleStore()
        self._rows = Container(labels=False)
        self._rows.margins = (0, 0, 0, 0)
        self.add_button = PushButton(text="Add checkpoint...", tooltip="add a Mask R-CNN checkpoint file")
        self.pretrained_button = PushButton(
            text="Add pretrained...", tooltip="pick a pretrained model (LIVECell, COCO); downloaded once, then cached"
        )
        self._picker = None
        self._dialog = None
        buttons = Container(layout="horizontal", labels=False, widgets=[self.add_button, self.pretrained_button])
        buttons.margins = (0, 0, 0, 0)
        super().__init__(labels=False, widgets=[self._rows, buttons])
        self.margins = (0, 0, 0, 0)
        self.add_button.changed.connect(self._on_add_clicked)
        self.pretrained_button.changed.connect(lambda *_: self.open_pretrained())
        for entry in self._store.members:
            self._rows.append(_ModelRow(entry, self._on_remove))
        self._store.connect(self._on_store_event)

    @property
    def store(self) -> EnsembleStore:
        return self._store

    @property
    def _entries(self) -> list[ModelEntry]:
        return self._store.members

    def _on_store_event(self, event: str, payload) -> None:
        if event == "added":
            self._rows.append(_ModelRow(payload, self._on_remove))
        elif event == "removed":
            self._rows.remove(self._rows[payload[0]])

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def selected(self) -> list[ModelEntry]:
        """The entries switched on, in list order."""
        return [e for e in self._entries if e.enabled]

    def add_checkpoint(self, path: str | Path, weight: float = 1.0) -> ModelEntry:
        """Add a checkpoint file (checked, not loaded yet).

        The file is checked at once (a few bytes, no torch: ``models.checkpoint_file``), so that a text
        file or a detectron2 pickle is refused here, saying what it is, not at the next run.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: it is already in the list, or it is not a checkpoint (the message says why).
        """
        from ..models.checkpoint_file import check_checkpoint_file

        path = Path(path).expanduser().resolve()
        check_checkpoint_file(path)
        if any(e.path == path for e in self._entries):
            raise ValueError(f"{path.name} is already in the model list")
        return self._append(ModelEntry(path.name, path=path, weight=weight))

    def add_engine(self, engine, name: str | None = None, weight: float = 1.0) -> ModelEntry:
        """Add an engine object (anything with ``name``, ``class_names`` and ``predict_batch``)."""
        return self._append(ModelEntry(name or str(getattr(engine, "name", "engine")), engine=engine, weight=weight))

    def remove(self, entry: ModelEntry | str) -> None:
        """Remove an entry (or the entry of that name). The classical engine stays.

        Raises:
            ValueError: no such entry, or it is the classical engine.
        """
        self._store.remove(self._find(entry))  # the store tells this list to drop the row

    def set_enabled(self, entry: ModelEntry | str, enabled: bool) -> None:
        """Switch an entry (or the entry of that name) on or off, as its check box does."""
        entry = self._find(entry)
        self._rows[self._entries.index(entry)].use.value = bool(enabled)

    def set_weight(self, entry: ModelEntry | str, weight: float) -> None:
        """Set an entry's ensemble weight, as its spin box does."""
        entry = self._find(entry)
        self._rows[self._entries.index(entry)].weight.value = float(weight)

    def _find(self, entry: ModelEntry | str) -> ModelEntry:
        if isinstance(entry, ModelEntry):
            if entry not in self._entries:
                raise ValueError(f"{entry.name!r} is not in the model list")
            return entry
        matches = [e for e in self._entries if e.name == entry]
        if not matches:
            raise ValueError(f"no model named {entry!r} in the list")
        return matches[0]

    def _append(self, entry: ModelEntry) -> ModelEntry:
        return self._store.add(entry)  # the store tells this list to add the row

    def _on_remove(self, entry: ModelEntry) -> None:
        self.remove(entry)

    def open_pretrained(self):
        """Show the pretrained-model picker (a small dialog, created once) and return it; a model it
        fetches is added to the list."""
        from qtpy.QtWidgets import QDialog, QVBoxLayout

        from ._pretrained import PretrainedPicker

        if self._picker is None:
            self._picker = PretrainedPicker(self._add_fetched)
            self._dialog = QDialog(self.native)
            self._dialog.setWindowTitle("Add a pretrained model")
            QVBoxLayout(self._dialog).addWidget(self._picker.native)
        self._dialog.show()
        self._dialog.raise_()
        return self._picker

    def _add_fetched(self, path: Path, name: str) -> None:
        if any(e.path == Path(path).resolve() for e in self._entries):
            self._picker.status.value = f"{name} is already in the model list"
            return
        self.add_checkpoint(path)

    def _on_add_clicked(self, *_):
        from napari.utils.notifications import show_error
        from qtpy.QtWidgets import QFileDialog

        paths, _ = QFileDialog.getOpenFileNames(self.native, "Add Mask R-CNN checkpoints", "", CHECKPOINT_FILTER)
        for p in paths:
            try:
                self.add_checkpoint(p)
            except (OSError, ValueError) as e:
                show_error(f"Add checkpoint: {e}")
