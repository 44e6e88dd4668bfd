"""The engine contract as typing Protocols (no torch here).

An *engine* turns images into raw :class:`~napari_sartorius.instances.Instances`. The weight-free
:class:`~napari_sartorius.classical.ClassicalEngine`, the Mask R-CNN
:class:`~napari_sartorius.models.predictor.MaskRCNNEngine` and any object a script or a test brings
follow it structurally (no base class to inherit):

- :class:`Engine`: ``class_names`` (the classes its ``Instances.classes`` index) and
  ``predict_batch(images) -> list[Instances]`` (one per image, ``image_size == image.shape[:2]``);
  ``name`` is optional (:func:`engine_name` falls back to the type's name).
- :class:`ResizingEngine`: it resizes its inputs to a test size that multi-scale TTA may change
  (``config.min_size_test`` and ``set_test_size(min_size, max_size)``).
- :class:`MovableEngine`: it can move to another device (``device`` and ``to(device)``), which the
  CPU fallback on GPU out-of-memory in :mod:`.segment` uses.

``isinstance(obj, Engine)`` checks that the members exist (``runtime_checkable``), not their types.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ..instances import Instances

__all__ = ["Engine", "ResizingEngine", "MovableEngine", "engine_name", "check_engine"]


@runtime_checkable
class Engine(Protocol):
    """What :func:`~napari_sartorius.inference.segment.segment_image` needs of a model."""

    class_names: Sequence[str]

    def predict_batch(self, images: list[np.ndarray]) -> list[Instances]:
        """Raw instances of each image: ``images`` are (H, W) uint8 gray or (H, W, 3) RGB."""
        ...


@runtime_checkable
class ResizingEngine(Protocol):
    """An engine with a changeable test size (``config.min_size_test`` in px)."""

    config: Any

    def set_test_size(self, min_size: int, max_size: int | None = None) -> None: ...


@runtime_checkable
class MovableEngine(Protocol):
    """An engine that can run on another device (a ``torch.device`` or its name)."""

    device: Any

    def to(self, device: Any) -> Any: ...


def engine_name(engine: Engine) -> str:
    """The engine's ``name``, else its type's name (for messages)."""
    return str(getattr(engine, "name", None) or type(engine).__name__)


def check_engine(engine: Any) -> Engine:
    """Return ``engine`` if it follows :class:`Engine`; else raise ValueError saying what it lacks."""
    if not isinstance(engine, Engine) or not callable(engine.predict_batch):
        raise ValueError(f"{engine!r} is not an engine: it needs class_names and predict_batch(images)")
    return engine
