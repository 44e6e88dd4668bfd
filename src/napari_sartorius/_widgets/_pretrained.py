"""Pretrained models in napari: the "Add pretrained..." picker of the Segment dock's model list and the
Fine-tune dock's "or pretrained" choice.

The download runs in a napari worker (:func:`fetch_steps`, a generator that yields progress and returns
the checkpoint path); Cancel sets a ``threading.Event`` that the core download checks between chunks.
Nothing here imports torch at import time: :mod:`..models.zoo` is plain data, and the download and
import (:mod:`..models.download`, which imports torch to verify) run inside the worker.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Iterator

from magicgui.widgets import ComboBox, Container, Label, ProgressBar, PushButton

from ..models.zoo import REGISTRY, get_entry, is_registry_name, registry_names

__all__ = ["fetch_steps", "fetch_start", "PretrainedPicker", "pretrained_choice", "NO_PRETRAINED"]

#: The "none" choice of the Fine-tune dock's pretrained list.
NO_PRETRAINED = ""


def fetch_steps(name: str, stop: threading.Event) -> Iterator[tuple[str, int, int | None]]:
    """Worker generator: fetch registry entry ``name`` (download, verify, import, cache).

    Yields ``(message, bytes_done, bytes_total_or_None)``; returns the checkpoint path. Runs the core
    :func:`~..models.download.fetch_pretrained` in a helper thread and relays its callbacks, so the
    worker's ``yielded`` signal carries them to the GUI thread. Touches no Qt object.

    Raises:
        PretrainedError (one line) or ValueError, as the core does; DownloadCancelled after ``stop``.
    """
    from ._torch_import import guard_torch_import

    guard_torch_import()  # the import step loads torch; see _torch_import
    from ..models.download import fetch_pretrained

    events: queue.Queue = queue.Queue()
    outcome: dict = {}
    state = {"message": f"{name}: checking the cache..."}

    def progress(done: int, total: int | None) -> None:
        events.put((state["message"], done, total))

    def message(text: str) -> None:
        state["message"] = text
        events.put((text, 0, None))

    def target() -> None:
        try:
            outcome["path"] = fetch_pretrained(name, progress=progress, stop=stop, message=message)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the worker below
            outcome["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=target, name=f"fetch-{name}", daemon=True)
    thread.start()
    yield (state["message"], 0, None)
    while (item := events.get()) is not None:
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return Path(outcome["path"])


def fetch_start(start, stop: threading.Event, make_progress: Callable[[str], object]):
    """For a training worker: ``start`` unchanged unless it is a registry name, then the fetched path.

    A generator (``start = yield from fetch_start(...)``) that yields ``make_progress(text)`` at each
    step and every 10 % of a download.
    """
    if not (isinstance(start, str) and is_registry_name(start)):
        return start
    shown = -1
    gen = fetch_steps(start, stop)
    while True:
        try:
            text, done, total = next(gen)
        except StopIteration as end:
            return end.value
        if total:
            tenth = int(10 * done / total)
            if tenth == shown:
                continue
            shown = tenth
            text = f"{text} ({done / 1e6:.0f} of {total / 1e6:.0f} MB)"
        yield make_progress(text)


def _detection_names() -> list[str]:
    return registry_names("detectron2")


def pretrained_choice() -> ComboBox:
    """The Fine-tune dock's "or pretrained" list: no choice, or a detection model of the registry."""
    return ComboBox(
        label="or pretrained",
        choices=[NO_PRETRAINED, *_detection_names()],
        value=NO_PRETRAINED,
        tooltip="start from a pretrained model of the registry (downloaded once, then cached), e.g. "
        "livecell-shsy5y; a one-class LIVECell model gives each of your classes its 'cell' class to start from",
    )


def _describe(name: str) -> str:
    from ..models.download import cached_status, download_path

    entry = REGISTRY[name]
    status = cached_status(entry)
    where = {"ready": "in the cache: adds at once", "downloaded": "downloaded, to be imported",
             "-": f"to download ({entry.url}); offline: copy the file to {download_path(entry)}"}[status]
    return f"{entry.description}. {entry.arch}. {where}"


class PretrainedPicker(Container):
    """The registry of pretrained detection models, with Download/Add, Cancel and a progress bar.

    ``on_ready(path, name)`` is called in the GUI thread with the cached checkpoint when a fetch
    finishes. Scripted use (tests): set ``choice.value``, call :meth:`start` (returns the worker),
    :meth:`cancel`; :attr:`last_error` and :attr:`last_path` tell the outcome.
    """

    def __init__(self, on_ready: Callable[[Path, str], None]):
        self._on_ready = on_ready
        self._worker = None
        self._stop = threading.Event()
        self.last_error: str | None = None
        self.last_path: Path | None = None
        names = _detection_names()
        self.choice = ComboBox(label="Model", choices=names, value=names[0])
        self.about = Label(value="")
        self.about.native.setWordWrap(True)
        self.add_button = PushButton(text="Download and add")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1000, label="Progress")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        buttons = Container(layout="horizontal", labels=False, widgets=[self.add_button, self.cancel_button])
        buttons.margins = (0, 0, 0, 0)
        super().__init__(widgets=[self.choice, self.about, buttons, self.progress, self.status])
        self.choice.changed.connect(self._show_about)
        self.add_button.changed.connect(lambda *_: self.start())
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        self._show_about(self.choice.value)

    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def _show_about(self, name) -> None:
        self.about.value = _describe(str(name))

    def start(self, name: str | None = None):
        """Fetch ``name`` (default: the current choice) in a worker; returns it (None when one runs)."""
        from napari.qt.threading import create_worker

        if self.is_running:
            return None
        name = get_entry(name or self.choice.value).name
        self._stop = threading.Event()
        self.last_error, self.last_path = None, None
        worker = create_worker(fetch_steps, name, self._stop, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda path: self._on_returned(path, name))
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.add_button.enabled, self.cancel_button.enabled = False, True
        self.progress.value = 0
        self.status.value = f"{name}: starting..."
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the download at its next chunk; nothing is kept in the cache."""
        if self._worker is not None:
            self._stop.set()
            self.cancel_button.enabled = False
            self.status.value = "cancelling..."

    def _on_progress(self, item) -> None:
        text, done, total = item
        if total:
            self.progress.value = int(1000 * min(done, total) / total)
            text = f"{text} ({done / 1e6:.0f} of {total / 1e6:.0f} MB)"
        self.status.value = text

    def _on_returned(self, path: Path, name: str) -> None:
        self.last_path = Path(path)
        self.progress.value = 1000
        self.status.value = f"{name}: ready ({path})"
        self._show_about(self.choice.value)
        self._on_ready(Path(path), name)

    def _on_errored(self, exc) -> None:
        from napari.utils.notifications import show_error

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.last_error = text
        self.status.value = text
        if not self._stop.is_set():
            show_error(f"Pretrained: {text}")

    def _on_finished(self) -> None:
        self._worker = None
        self.add_button.enabled, self.cancel_button.enabled = True, False
