"""The review panel of the Segment dock: visit the cells most likely wrong first, accept, delete or edit.

A Labels layer is reviewable when its features table has an ``uncertainty`` column (fusion of two
sources or more: several models, or one model with TTA; see
:mod:`napari_sartorius.inference.uncertainty`). Its cells are ranked by their *review priority*, the
estimated probability that the cell is wrong, from its score, its uncertainty and its area relative to
the image's median (:func:`napari_sartorius.inference.review_rank.review_priority`; the uncertainty
alone ranked wrong cells worse than the score on real images). Areas are counted on the layer's pixels,
so they follow edits.

Which cells are *flagged* (the "Flag" choice, said in words under it):

- **top %** (the default): the ``Top %`` share of the cells present (20 %, rounded up), at least
  :data:`~napari_sartorius.inference.review_rank.MIN_FLAGGED` (5) or all when fewer. It always flags a
  useful handful, whatever the engine's level of disagreement (with flips TTA a weight-free engine
  often agrees with itself on every cell, and an absolute threshold on the uncertainty flagged nothing);
- **P(wrong) at least**: cells whose priority is at least ``Flag at`` (an absolute threshold).

"Next cell to review" (key ``Alt-N``) centres and zooms the viewer on the flagged cell of highest
priority not yet reviewed (ties: the lower label id) and selects its label, so napari's paint / erase /
fill tools edit it at once; a line under the buttons gives its priority, score, uncertainty and area.
"Accept" (``Alt-A``) marks it reviewed, "Delete" (``Alt-D``) removes it; both go on to the next one.
The counter says "reviewed 12 of 40 flagged". The share is of the cells present, reviewed or not, so
accepting a cell changes no flag; a deleted cell leaves the layer, and when the share (or the minimum
of 5) then reaches further down, the next most likely wrong cell joins the queue: after deleting
false cells the queue goes on until that many cells are confirmed.

Where the state lives: the ``reviewed`` column of the layer's features (exported with COCO JSON).
For the dock's own, unedited result layer the dock also records the review against its raw
predictions (:class:`RenderedReview`), so a slider re-render keeps every reviewed mark and every
deleted cell. Layers edited by hand, opened from a file or made by other plugins are reviewed in
place: the panel changes only their features and, on Delete, the deleted cell's pixels. Cells without
a features row (painted by hand) have no uncertainty and are never flagged. A layer without an
uncertainty column (one model without TTA, other plugins' labels) says "uncertainty undefined".

"Mark flagged cells" adds (or updates) a Points layer ``"<labels> uncertain"`` with one point per
flagged cell not yet reviewed, coloured by its priority; once there, it follows every step of the queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container, FloatSpinBox, Label, PushButton

from ..inference.review_rank import DEFAULT_TOP_PERCENT, MIN_FLAGGED, flag_at, flag_top, priority_of_table

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = [
    "ReviewPanel",
    "RenderedReview",
    "FLAG_MODES",
    "DEFAULT_FLAG_MODE",
    "DEFAULT_FLAG_THRESHOLD",
    "SHORTCUTS",
    "order_pairs_by_uncertainty",
]

#: The "Flag" choices: (text shown, value).
FLAG_MODES = (("top % of the cells", "top"), ("P(wrong) at least", "at"))
DEFAULT_FLAG_MODE = "top"
#: The absolute threshold's default: cells estimated more likely wrong than right.
DEFAULT_FLAG_THRESHOLD = 0.5
#: Keyboard shortcuts bound on the viewer.
SHORTCUTS = {"next": "Alt-N", "accept": "Alt-A", "delete": "Alt-D"}
UNDEFINED = (
    "uncertainty undefined for this layer (one model without TTA, or labels made by hand or by "
    "another plugin): use several models or TTA to get a review queue"
)


class RenderedReview:
    """The dock's review record against its raw predictions (one Instances per plane).

    ``reviewed`` is kept in each raw Instances' ``columns["reviewed"]`` (so post-processing copies it
    into the features of every render); deleted cells are an ``exclude`` mask per plane. The label ->
    (plane, instance) map is refreshed by :meth:`rendered` after each render.
    """

    def __init__(self) -> None:
        self.reset([])

    def reset(self, raw: list) -> None:
        self._raw = list(raw)
        self._deleted = [np.zeros(len(r), bool) for r in self._raw]
        self._where: dict[int, tuple[int, int]] = {}
        for r in self._raw:
            if "uncertainty" in r.columns and "reviewed" not in r.columns:
                r.columns["reviewed"] = np.zeros(len(r), bool)

    def deleted_of(self, plane: int) -> np.ndarray | None:
        return self._deleted[plane] if plane < len(self._deleted) else None

    def rendered(self, results: list) -> None:
        """Record which raw instance each label id of a render shows (ids offset per plane)."""
        self._where = {}
        offset = 0
        for z, res in enumerate(results):
            for k, i in enumerate(res.kept.tolist()):
                self._where[offset + k + 1] = (z, i)
            offset += len(res)

    def mark_reviewed(self, label: int, value: bool = True) -> bool:
        hit = self._where.get(int(label))
        if hit is None or "reviewed" not in self._raw[hit[0]].columns:
            return False
        self._raw[hit[0]].columns["reviewed"][hit[1]] = bool(value)
        return True

    def delete(self, label: int) -> bool:
        hit = self._where.get(int(label))
        if hit is None:
            return False
        self._deleted[hit[0]][hit[1]] = True
        return True


def _camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _frame(features) -> "object":
    import pandas as pd

    return features if isinstance(features, pd.DataFrame) else pd.DataFrame(features)


class ReviewPanel(Container):
    """Review queue widget (see the module docstring); embedded in the Segment dock.

    Args:
        viewer: the napari viewer.
        dock: the Segment dock (optional): its result layer is reviewed through its record, so that
            re-renders keep the review; without it every layer is reviewed in place.
    """

    def __init__(self, viewer: napari.viewer.Viewer, dock=None):
        from magicgui.widgets import ComboBox

        self._viewer = viewer
        self._dock = dock
        self.current: int | None = None
        self.layer = ComboBox(label="Review", choices=self._labels_choices, nullable=True)
        self.flag_mode = ComboBox(
            label="Flag", choices=list(FLAG_MODES), value=DEFAULT_FLAG_MODE,
            tooltip="which cells to review: a share of the cells most likely wrong, or those above a threshold",
        )
        self.top_percent = FloatSpinBox(
            label="Top %", value=DEFAULT_TOP_PERCENT, min=1.0, max=100.0, step=5.0,
            tooltip=f"flag this share of the cells, those most likely wrong (at least {MIN_FLAGGED})",
        )
        self.threshold = FloatSpinBox(
            label="Flag at", value=DEFAULT_FLAG_THRESHOLD, min=0.0, max=1.0, step=0.05,
            tooltip="flag the cells whose estimated probability of being wrong is at least this",
        )
        self.flag_info = Label(value="")
        self.cell_info = Label(value="")
        self.counter = Label(value="")
        for lab in (self.flag_info, self.cell_info):  # long lines wrap instead of widening the dock
            lab.native.setWordWrap(True)
        self.next_button = PushButton(text=f"Next cell to review ({SHORTCUTS['next']})")
        self.accept_button = PushButton(text=f"Accept ({SHORTCUTS['accept']})")
        self.delete_button = PushButton(text=f"Delete ({SHORTCUTS['delete']})")
        self.mark_button = PushButton(text="Mark flagged cells")
        buttons = Container(layout="horizontal", labels=False, widgets=[self.accept_button, self.delete_button])
        buttons.margins = (0, 0, 0, 0)
        super().__init__(
            widgets=[
                self.layer, self.flag_mode, self.top_percent, self.threshold, self.flag_info,
                self.next_button, buttons, self.cell_info, self.mark_button, self.counter,
            ]
        )
        self.margins = (0, 0, 0, 0)
        self.next_button.changed.connect(lambda *_: self.next_cell())
        self.accept_button.changed.connect(lambda *_: self.accept())
        self.delete_button.changed.connect(lambda *_: self.delete())
        self.mark_button.changed.connect(lambda *_: self.mark_uncertain())
        self.layer.changed.connect(self._on_layer_changed)
        self.flag_mode.changed.connect(lambda *_: self.refresh())
        self.top_percent.changed.connect(lambda *_: self.refresh())
        self.threshold.changed.connect(lambda *_: self.refresh())
        ev = viewer.layers.events
        for e in (ev.inserted, ev.removed):
            e.connect(self._on_layers_changed)
        self._bind_keys()
        self.refresh()

    # -- layers -------------------------------------------------------------------------------
    def _labels_choices(self, *_):
        import napari.layers

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Labels)]

    def _on_layers_changed(self, *_):
        self.layer.reset_choices()
        self.refresh()

    def _on_layer_changed(self, *_):
        self.current = None
        self.refresh()

    def follow(self, layer) -> None:
        """Review ``layer`` (the dock calls this after writing a result)."""
        self.layer.reset_choices()
        if layer is not self.layer.value:
            self.layer.value = layer
        else:
            self.refresh()

    def _bind_keys(self) -> None:
        actions = {"next": self.next_cell, "accept": self.accept, "delete": self.delete}
        for name, key in SHORTCUTS.items():
            fn = actions[name]

            def handler(_viewer, _fn=fn):
                try:
                    _fn()
                except RuntimeError:  # the panel's Qt widgets were deleted (dock closed)
                    pass

            self._viewer.bind_key(key, handler, overwrite=True)

    # -- the queue ----------------------------------------------------------------------------
    def _table(self):
        """(features DataFrame, has uncertainty) of the reviewed layer, or (None, False)."""
        layer = self.layer.value
        if layer is None or layer not in self._viewer.layers:
            return None, False
        df = _frame(layer.features)
        return df, "uncertainty" in df.columns and "label" in df.columns

    def ranking(self) -> dict | None:
        """The reviewable cells of the layer (those with a features row whose label is in its data), or
        None when the uncertainty is undefined: a dict of ``(n,)`` arrays ``label``, ``priority``,
        ``score`` (NaN when absent), ``uncertainty``, ``area`` (px, counted on the layer), ``reviewed``,
        ``flagged``, plus ``median_area``."""
        df, ok = self._table()
        if not ok:
            return None
        labels = df["label"].to_numpy(np.int64)
        ids, counts = np.unique(np.asarray(self.layer.value.data), return_counts=True)
        pos = np.clip(np.searchsorted(ids, labels), 0, max(len(ids) - 1, 0))
        present = (ids[pos] == labels) & (labels != 0) if len(ids) else np.zeros(len(labels), bool)
        rows = df[present].reset_index(drop=True)
        area = counts[pos[present]].astype(np.float64)
        priority = priority_of_table(rows, area=area) if len(rows) else np.zeros(0)
        reviewed = rows["reviewed"].to_numpy(bool) if "reviewed" in rows.columns else np.zeros(len(rows), bool)
        if self.flag_mode.value == "at":
            flagged = flag_at(priority, float(self.threshold.value))
        else:
            flagged = flag_top(priority, float(self.top_percent.value))
        return {
            "label": rows["label"].to_numpy(np.int64),
            "priority": priority,
            "score": rows["score"].to_numpy(np.float64) if "score" in rows.columns else np.full(len(rows), np.nan),
            "uncertainty": rows["uncertainty"].to_numpy(np.float64),
            "area": area,
            "reviewed": reviewed,
            "flagged": flagged,
            "median_area": float(np.median(area)) if len(area) else 0.0,
        }

    def queue(self, ranking: dict | None = None) -> tuple[list[int], int, int]:
        """``(unreviewed flagged labels, highest priority first; reviewed count; flagged count)``.

        Only cells still present in the layer's data count. ``ranking``: a fresh :meth:`ranking` to reuse."""
        r = ranking if ranking is not None else self.ranking()
        if r is None or not len(r["label"]):
            return [], 0, 0
        flagged, reviewed, labels, p = r["flagged"], r["reviewed"], r["label"], r["priority"]
        todo = flagged & ~reviewed
        order = np.lexsort((labels[todo], -p[todo]))
        return labels[todo][order].tolist(), int(np.count_nonzero(flagged & reviewed)), int(np.count_nonzero(flagged))

    def _flag_text(self, r: dict) -> str:
        n, k = len(r["label"]), int(np.count_nonzero(r["flagged"]))
        if self.flag_mode.value == "at":
            return f"{k} of {n} cells flagged: P(wrong) >= {float(self.threshold.value):.2f}"
        return f"{k} of {n} cells flagged: the {float(self.top_percent.value):g} % most likely wrong (at least {MIN_FLAGGED})"

    def _cell_text(self, r: dict, label: int) -> str:
        hit = np.flatnonzero(r["label"] == label)
        if not hit.size:
            return ""
        i = int(hit[0])
        score = "" if not np.isfinite(r["score"][i]) else f", score {r['score'][i]:.2f}"
        return (f"cell {label}: P(wrong) {r['priority'][i]:.2f}{score}, uncertainty {r['uncertainty'][i]:.2f}, "
                f"area {r['area'][i]:.0f} px (median {r['median_area']:.0f})")

    def refresh(self) -> None:
        """Update the flag line, the counter, the current cell's line and the buttons."""
        at = self.flag_mode.value == "at"
        self.top_percent.visible, self.threshold.visible = not at, at
        df, ok = self._table()
        r = self.ranking() if ok else None
        if df is None:
            self.counter.value = "no Labels layer to review"
        elif r is None:
            self.counter.value = UNDEFINED
        else:
            todo, done, flagged = self.queue(r)
            where = f"; at cell {self.current}" if self.current is not None else ""
            self.counter.value = f"reviewed {done} of {flagged} flagged{where}"
        self.flag_info.value = self._flag_text(r) if r is not None else ""
        self.cell_info.value = self._cell_text(r, self.current) if r is not None and self.current is not None else ""
        self.next_button.enabled = bool(ok)
        has_cell = bool(ok) and self.current is not None
        self.accept_button.enabled = has_cell
        self.delete_button.enabled = has_cell

    # -- actions ------------------------------------------------------------------------------
    def next_cell(self) -> int | None:
        """Go to the flagged cell of highest priority not yet reviewed; returns its label (None: all done)."""
        todo, _, _ = self.queue()
        self._update_marks()
        if not todo:
            self.current = None
            self.refresh()
            if self._table()[1]:
                self.counter.value += " - nothing left to review"
            return None
        self.current = int(todo[0])
        self._go_to(self.current)
        self.refresh()
        return self.current

    def _marks_name(self) -> str:
        layer = self.layer.value
        return f"{layer.name} uncertain" if layer is not None else "uncertain cells"

    def _update_marks(self) -> None:
        """Keep the Points layer of "Mark flagged cells" (when there is one) in step with the queue."""
        if self.layer.value is not None and self._marks_name() in self._viewer.layers:
            self.mark_uncertain()

    def _go_to(self, label: int) -> None:
        layer = self.layer.value
        data = np.asarray(layer.data)
        idx = np.nonzero(data == label)
        if not idx[0].size:
            return
        lo = np.array([i.min() for i in idx], np.float64)
        hi = np.array([i.max() for i in idx], np.float64) + 1
        centre = layer.data_to_world((lo + hi - 1) / 2)
        viewer = self._viewer
        nd = data.ndim
        if nd > 2:  # move the sliders to the cell's plane
            for ax in range(nd - 2):
                viewer.dims.set_point(viewer.dims.ndim - nd + ax, centre[ax])
        camera = _camera(viewer)
        camera.center = tuple(centre[-2:])
        extent = float(max(hi[-1] - lo[-1], hi[-2] - lo[-2], 8.0)) * float(max(abs(layer.scale[-1]), 1e-9))
        camera.zoom = float(np.clip(60.0 / extent, 0.5, 20.0))
        layer.selected_label = int(label)
        viewer.layers.selection.active = layer

    def accept(self) -> int | None:
        """Mark the current cell reviewed and go to the next; returns the next label."""
        if self.current is None:
            return None
        self._set_reviewed(self.current)
        return self.next_cell()

    def delete(self) -> int | None:
        """Remove the current cell from the layer (and from later renders) and go to the next."""
        if self.current is None:
            return None
        label = self.current
        layer = self.layer.value
        dock = self._dock
        if dock is not None and dock.owns_unedited(layer):
            dock.review_delete(label)
        else:
            data = layer.data
            data[np.asarray(data) == label] = 0
            layer.refresh()
        df = _frame(layer.features)
        if "label" in df.columns:
            layer.features = df[df["label"] != label].reset_index(drop=True)
        return self.next_cell()

    def _set_reviewed(self, label: int) -> None:
        layer = self.layer.value
        dock = self._dock
        if dock is not None and dock.owns_unedited(layer):
            dock.review_mark(label)
        df = _frame(layer.features).copy()
        if "reviewed" not in df.columns:
            df["reviewed"] = False
        df.loc[df["label"] == label, "reviewed"] = True
        layer.features = df

    def mark_uncertain(self):
        """Add or update the Points layer of flagged, unreviewed cells, coloured by priority; returns it
        (None: nothing flagged)."""
        from scipy import ndimage

        todo, _, _ = self.queue()
        layer = self.layer.value
        name = self._marks_name()
        if not todo:
            if name in self._viewer.layers:
                self._viewer.layers[name].data = np.zeros((0, np.asarray(layer.data).ndim))
            return None
        data = np.asarray(layer.data)
        centres = np.asarray(ndimage.center_of_mass(data > 0, data, todo), np.float64).reshape(len(todo), -1)
        r = self.ranking()
        row = {int(lab): i for i, lab in enumerate(r["label"])}
        idx = np.array([row[int(t)] for t in todo], np.int64)
        features = {
            "label": np.asarray(todo, np.int64),
            "priority": r["priority"][idx],
            "uncertainty": r["uncertainty"][idx],
        }
        kwargs = dict(scale=layer.scale, translate=layer.translate)
        if name in self._viewer.layers:
            pts = self._viewer.layers[name]
            pts.data = centres
            pts.features = features
        else:
            pts = self._viewer.add_points(
                centres, name=name, features=features, size=6, face_color="priority",
                face_colormap="plasma", border_width=0, **kwargs,
            )
            self._viewer.layers.selection.active = layer
        pts.face_contrast_limits = (0.0, 1.0)
        return pts


def order_pairs_by_uncertainty(pairs: list, labels_of=lambda pair: pair[1]) -> list:
    """The Fine-tune dock's hook: image/labels pairs ordered most uncertain first.

    ``labels_of(pair)`` gives the pair's Labels layer; its features' ``uncertainty`` column is summarised
    (:func:`~napari_sartorius.inference.uncertainty.summary_from_features`: 90th percentile, then mean);
    pairs whose labels have no uncertainty keep their order at the end.
    """
    from ..inference.uncertainty import order_by_uncertainty, summary_from_features

    keys = {id(p): f"{k}" for k, p in enumerate(pairs)}
    summaries = {keys[id(p)]: summary_from_features(keys[id(p)], getattr(labels_of(p), "features", None)) for p in pairs}
    return order_by_uncertainty(pairs, key_of=lambda p: keys[id(p)], summaries=summaries)
