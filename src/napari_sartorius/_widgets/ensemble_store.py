"""One store of the ensemble per viewer, observed by both docks.

The "Segment cells" dock shows and edits its members; the "Fine-tune" dock adds the model it trained
and asks which Labels layer the user corrected. Neither dock reaches into the other or into the
window's dock widgets: both call :func:`store_for` with their viewer.

No Qt, magicgui or torch here: listeners are plain callables ``listener(event, payload)`` with
``event`` one of ``"added"`` (payload: the :class:`ModelEntry`), ``"removed"`` (payload:
``(index, entry)``) and ``"edited"`` (payload: the edited Labels layer).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["ModelEntry", "EnsembleStore", "store_for", "CLASSICAL_NAME"]

CLASSICAL_NAME = "classical (weight-free)"


@dataclass(eq=False)
class ModelEntry:
    """One member of the ensemble.

    Attributes:
        name: shown in the list.
        path: the checkpoint file, or None for the classical engine / an engine given as an object.
        engine: an engine object given directly (tests, scripts); None means "build it on demand".
        weight: the member's weight in the ensemble (> 0).
        enabled: whether the next run uses it.
    """

    name: str
    path: Path | None = None
    engine: Any = None
    weight: float = 1.0
    enabled: bool = True
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def is_classical(self) -> bool:
        return self.path is None and self.engine is None

    def get_engine(self, device: str = "auto"):
        """The engine object for ``device`` ("auto", "cpu", "cuda"), loading it on first use.

        Call it from a worker thread: loading a checkpoint imports torch and reads the file.

        Raises:
            ValueError / FileNotFoundError: from the checkpoint loader, naming the file.
        """
        if self.engine is not None:
            return self.engine
        key = "classical" if self.is_classical else device
        with self._lock:
            if key not in self._cache:
                if self.is_classical:
                    from ..classical import ClassicalEngine

                    self._cache[key] = ClassicalEngine()
                else:
                    from ._torch_import import guard_torch_import

                    guard_torch_import()
                    from ..models.predictor import MaskRCNNEngine

                    from ..models.model_files import resolve_model_file  # MMDetection files: imported once

                    self._cache[key] = MaskRCNNEngine.from_checkpoint(resolve_model_file(self.path), device=device)
            return self._cache[key]


class EnsembleStore:
    """The ensemble's members (the weight-free classical engine first) and the Labels layers the user
    corrected, for one viewer. Change it from the GUI thread only."""

    def __init__(self) -> None:
        self.members: list[ModelEntry] = [ModelEntry(CLASSICAL_NAME)]
        self._listeners: list[Callable[[str, Any], None]] = []
        self._edited: dict[str, Any] = {}  # image layer name -> the Labels layer corrected on it

    # -- observers ----------------------------------------------------------------------------
    def connect(self, listener: Callable[[str, Any], None]) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def disconnect(self, listener: Callable[[str, Any], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, event: str, payload) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, payload)
            except RuntimeError:  # its Qt widget was deleted (a closed dock): forget it
                self.disconnect(listener)

    # -- members ------------------------------------------------------------------------------
    def add(self, entry: ModelEntry) -> ModelEntry:
        """Append a member and tell the listeners."""
        self.members.append(entry)
        self._emit("added", entry)
        return entry

    def remove(self, entry: ModelEntry) -> None:
        """Remove a member (not the classical engine) and tell the listeners.

        Raises:
            ValueError: not a member, or the classical engine.
        """
        if entry not in self.members:
            raise ValueError(f"{entry.name!r} is not in the model list")
        if entry.is_classical:
            raise ValueError("the weight-free classical engine cannot be removed; switch it off instead")
        k = self.members.index(entry)
        del self.members[k]
        self._emit("removed", (k, entry))

    def put_checkpoint(self, path: str | Path, weight: float | None = None) -> ModelEntry:
        """Add checkpoint ``path``; a member with the same file is replaced (its weight kept unless
        ``weight`` is given), so new weights written to that file load on the next run.

        Raises:
            FileNotFoundError: the file does not exist.
        """
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path}")
        kept = 1.0
        for old in [e for e in self.members if e.path is not None and Path(e.path) == path]:
            kept = old.weight
            self.remove(old)
        return self.add(ModelEntry(path.name, path=path, weight=kept if weight is None else float(weight)))

    # -- corrected layers ---------------------------------------------------------------------
    def mark_edited(self, labels_layer, image_name: str | None) -> None:
        """Record that the user corrected ``labels_layer`` (drawn on image ``image_name``)."""
        key = image_name if image_name is not None else getattr(labels_layer, "name", "")
        self._edited[key] = _unwrap(labels_layer)
        self._emit("edited", labels_layer)

    def edited_labels(self, image_name: str, layers=None):
        """The Labels layer last corrected on image ``image_name``: the very object of ``layers`` that
        holds it (napari hands each dock its own proxies of the layers), or None when there is none
        or it is no longer among ``layers``. Without ``layers``: the layer as recorded."""
        layer = self._edited.get(image_name)
        if layer is None or layers is None:
            return layer
        return next((lay for lay in layers if _unwrap(lay) is layer), None)

    def is_edited(self, labels_layer) -> bool:
        return any(lay is _unwrap(labels_layer) for lay in self._edited.values())


_STORES: dict[int, EnsembleStore] = {}


def _unwrap(obj):
    """The object behind napari's ``PublicOnlyProxy`` (plugin docks get proxies of the viewer and its
    layers, a new proxy per dock), or ``obj`` itself."""
    return getattr(obj, "__wrapped__", obj)


def store_for(viewer) -> EnsembleStore:
    """The viewer's store (created on first use, dropped when the viewer is garbage-collected); the
    same for every proxy of one viewer."""
    viewer = _unwrap(viewer)
    key = id(viewer)
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = EnsembleStore()
        try:
            weakref.finalize(viewer, _STORES.pop, key, None)
        except TypeError:  # an object without weak references (a test double): kept for the session
            pass
    return store
