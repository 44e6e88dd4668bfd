"""Stop requests of long jobs (segmentation, training): a ``threading.Event`` or a callable.

Core generators take this plain object, never a Qt one, so a script, a CLI and a napari worker can
all ask a job to stop.
"""

from __future__ import annotations

import threading


def stop_requested(stop) -> bool:
    """True when ``stop`` (None, an object with ``is_set()`` such as ``threading.Event``, or a
    callable returning True) asks the job to stop. Raises TypeError for anything else."""
    if stop is None:
        return False
    if isinstance(stop, threading.Event) or hasattr(stop, "is_set"):
        return bool(stop.is_set())
    if callable(stop):
        return bool(stop())
    raise TypeError(f"stop must be None, a threading.Event or a callable, got {type(stop).__name__}")
