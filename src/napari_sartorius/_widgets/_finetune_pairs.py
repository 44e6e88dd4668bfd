"""The Fine-tune dock's image/labels pair rows and the layer helpers behind them (GUI thread, numpy).

A row picks an image layer, its labels layer and the cell type. Layer names are shown in full:
the two layer boxes take a line each, a name too long for the box is elided in the middle (so
``cells labels`` and ``cells labels [1]`` stay apart) and the full name is the box's tooltip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, PushButton

from ..cell_types import DEFAULT_CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from .finetune import FineTuneWidget

__all__ = ["PairChoice", "PairRow", "layer_array", "spatial_shape", "planes_of"]


def layer_array(layer) -> np.ndarray:
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return np.asarray(data)


def spatial_shape(layer) -> tuple[int, ...]:
    """The layer's shape without a trailing colour axis (RGB/RGBA images)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def planes_of(image: np.ndarray, labels: np.ndarray, rgb: bool) -> list[tuple[np.ndarray, np.ndarray]]:
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


def _elide_middle(combo: ComboBox, chars: int) -> None:
    """Let a layer box shrink to about ``chars`` characters (a long layer name must not widen the
    dock), fill its line otherwise, and elide names in the middle in its list, so that the ends
    (``labels`` vs ``labels [1]``) stay visible."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QComboBox, QSizePolicy

    native = combo.native
    native.setMinimumContentsLength(chars)
    native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    native.view().setTextElideMode(Qt.TextElideMode.ElideMiddle)


def _show_full_name(combo: ComboBox, what: str) -> None:
    layer = combo.value
    combo.tooltip = f"{what}: {layer.name}" if layer is not None else what


class PairRow(Container):
    """One pair: the image layer on one line, its labels layer, cell type (and for training pairs a
    remove button) on the next; layer names elided in the middle, the full name as the tooltip."""

    def __init__(self, dock: FineTuneWidget, removable: bool = True):
        self._dock = dock
        self.image_layer = ComboBox(choices=dock._image_choices, nullable=True, tooltip="image layer")
        self.labels_layer = ComboBox(choices=dock._labels_choices, nullable=True, tooltip="its labels (one id per cell)")
        self.cell_type = ComboBox(choices=DEFAULT_CLASSES, value=DEFAULT_CLASSES[0], tooltip="cell type of this image")
        second = [self.labels_layer, self.cell_type]
        self.remove_button = None
        if removable:
            self.remove_button = PushButton(text="\u2715", tooltip="remove this pair")
            self.remove_button.native.setFixedWidth(28)
            second.append(self.remove_button)
        labels_line = Container(layout="horizontal", labels=False, widgets=second)
        labels_line.margins = (0, 0, 0, 0)
        super().__init__(layout="vertical", labels=False, widgets=[self.image_layer, labels_line])
        self.margins = (0, 0, 0, 4)
        _elide_middle(self.image_layer, 10)
        _elide_middle(self.labels_layer, 10)
        self.cell_type.native.setMinimumContentsLength(5)
        self.image_layer.changed.connect(self._on_image_changed)
        self.labels_layer.changed.connect(self._on_labels_changed)
        self.image_layer.changed.connect(lambda *_: _show_full_name(self.image_layer, "image layer"))
        self.labels_layer.changed.connect(lambda *_: _show_full_name(self.labels_layer, "labels layer"))
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


