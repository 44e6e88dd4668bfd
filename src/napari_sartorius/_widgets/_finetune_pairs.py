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
from .ensemble_store import store_for

if TYPE_CHECKING:  # pragma: no cover
    from .finetune import FineTuneWidget

__all__ = ["PairChoice", "PairRow", "PairPickerMixin", "layer_array", "spatial_shape", "planes_of"]


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


class PairPickerMixin:
    """The Fine-tune dock's layer pickers and pair rows (the dock provides ``_viewer``, ``pairs``, a
    container of :class:`PairRow`, and ``validation``, a :class:`PairRow`)."""

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

    def order_pairs_by_uncertainty(self) -> list[str]:
        """Reorder the training pairs most uncertain first (the labels' ``uncertainty`` feature,
        :func:`._review_panel.order_pairs_by_uncertainty`); pairs without uncertainty keep their order
        at the end. Returns the labels layers' names in the new order."""
        from ._review_panel import order_pairs_by_uncertainty

        rows = self.pair_rows
        values = [(r.image_layer.value, r.labels_layer.value, r.cell_type.value) for r in rows]
        ordered = order_pairs_by_uncertainty(values, labels_of=lambda v: v[1])
        for row, (image, labels, cell_type) in zip(rows, ordered):
            row.set_pair(image, labels, cell_type)
        return [getattr(v[1], "name", "") for v in ordered]

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
