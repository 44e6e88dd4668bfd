"""Drive the review queue as a user would on a real image, then take the review panel's screenshot.

A real cort image (``../shared/data/real`` beside the repository), an ensemble of three weight-free
engines (diameters 0.85, 1 and 1.15 x 17 px, no downloads) with flips TTA (12 sources), the default
flags (top 20 % of the cells, at least 5). The script then works through the queue with the panel's
buttons: for each flagged cell it looks up the annotated truth (``coco.json``) and, like a biologist,
deletes a cell that matches no true cell (IoU < 0.5), corrects the outline of the first one that
matches loosely (IoU < 0.8) by painting the true cell over it (a hand edit: from then on the layer is
reviewed in place), and accepts the others. It prints every step, checks the counter, exports COCO JSON
to a temporary folder and reads the ``reviewed`` flags back, and saves the window on a cell of the queue.

    xvfb-run -a python scripts/screenshot_review.py [--image-id 1bf60e3be6ce] [--out docs/review_panel.png]

Exit status 1 when a check fails. The image is never copied into the repository; only the screenshot is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / ".." / "shared" / "data" / "real"
DIAMETER_FACTORS = (0.85, 1.0, 1.15)


def _truth(image_id: str):
    """(image path, truth label image) of one annotated real image."""
    from napari_sartorius.cleaning import clean_annotations
    from napari_sartorius.io import load_annotations

    for im in load_annotations(REAL / "coco.json"):
        if str(im.image_id) == image_id or (im.file_name or "").startswith(image_id):
            inst, _ = clean_annotations(im.instances, fill_holes=False, min_fragment=0, resolve_overlaps=True, min_area=1)
            return REAL / "images" / (im.file_name or f"{image_id}.png"), inst.to_label_image()
    raise SystemExit(f"review: no image {image_id} in {REAL / 'coco.json'}; pass --image-id")


def _best_truth(data, truth, label):
    """(IoU, true label) of the true cell that best matches cell ``label`` of ``data`` ((0, 0): none)."""
    import numpy as np

    cell = data == label
    ids, counts = np.unique(truth[cell], return_counts=True)
    best = (0.0, 0)
    for g, inter in zip(ids.tolist(), counts.tolist()):
        if g:
            iou = inter / float(np.count_nonzero(cell | (truth == g)))
            best = max(best, (iou, int(g)))
    return best


def _show_panel(panel) -> None:
    """Scroll the dock so that the review panel is in view (the dock's lower part is a scroll area)."""
    from qtpy.QtWidgets import QScrollArea

    w = panel.native.parentWidget()
    while w is not None and not isinstance(w, QScrollArea):
        w = w.parentWidget()
    if w is not None:
        w.ensureWidgetVisible(panel.native, 0, 0)


def _pump(app, n=10):
    for _ in range(n):
        app.processEvents()
        time.sleep(0.02)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-id", default="1bf60e3be6ce", help="id of an annotated image of ../shared/data/real")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "review_panel.png")
    ap.add_argument("--size", default="1500x1000", help="window size WIDTHxHEIGHT in pixels")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the segmentation")
    ap.add_argument("--shot-after", type=int, default=3,
                    help="take the screenshot at this step of the queue or the first later one whose cell is not "
                         "at the image's edge")
    args = ap.parse_args(argv)
    if not (REAL / "coco.json").is_file():
        print(f"review: no annotated images at {REAL}", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.lower().split("x"))

    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend.*")
    warnings.filterwarnings("ignore", message=".*System theme detection.*")

    import napari
    import numpy as np
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from napari_sartorius.classical import TYPICAL_DIAMETERS, ClassicalEngine, ClassicalSettings
    from napari_sartorius.io import load_annotations
    from napari_sartorius.io.images import read_image

    sys.path.insert(0, str(ROOT / "scripts"))
    from screenshot import _close_toasts

    path, truth = _truth(args.image_id)
    viewer = napari.Viewer(title="napari-sartorius", show=True)
    viewer.window._qt_window.resize(width, height)
    viewer.add_image(read_image(path), name=path.stem)
    _, dock = viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    d = TYPICAL_DIAMETERS["cort"]
    dock.models.set_enabled(dock.models.entries[0], False)  # the default engine: replaced by the three below
    for f in DIAMETER_FACTORS:
        dock.models.add_engine(ClassicalEngine(ClassicalSettings(cell_type="cort", cell_diameter=d * f)),
                               name=f"classical d={d * f:.1f}")
    dock.tta.value = "flips"
    dock.cell_type.value = "cort"
    app = QApplication.instance()
    t0 = time.monotonic()
    if dock.run() is None:
        print(f"review: the dock refused to start ({dock.status.value})", file=sys.stderr)
        return 1
    while dock.is_running:
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > args.timeout:
            dock.cancel()
            print("review: segmentation timed out", file=sys.stderr)
            return 1
    layer = dock.labels_layer
    if layer is None:
        print(f"review: no labels ({dock.status.value})", file=sys.stderr)
        return 1
    panel = dock.review
    print(f"segmented {path.name} in {time.monotonic() - t0:.0f} s: {dock.status.value}")
    print(f"panel: {panel.flag_info.value}; {panel.counter.value}")
    failures = []
    todo, _, flagged = panel.queue()
    if flagged < 5:
        failures.append(f"the default flags only {flagged} cells")
    panel.mark_button.native.click()
    panel.next_button.native.click()
    _pump(app)
    step, edited, deleted, accepted, shot, shot_step = 0, None, 0, 0, None, None
    while panel.current is not None:
        step += 1
        label = panel.current
        data = np.asarray(layer.data)
        iou, g = _best_truth(data, truth, label)
        info = panel.cell_info.value
        ys, xs = np.nonzero(data == label)
        inside = ys.size and min(ys.min(), xs.min(), data.shape[0] - ys.max(), data.shape[1] - xs.max()) > 60
        if shot is None and step >= args.shot_after and inside:
            _show_panel(panel)
            _close_toasts(viewer)
            _pump(app, 20)
            shot, shot_step = viewer.screenshot(canvas_only=False, flash=False), step
        if iou < 0.5:
            action = "delete (no true cell at IoU >= 0.5)"
            panel.delete_button.native.click()
            deleted += 1
        elif iou < 0.8 and edited is None:
            action = f"correct the outline (IoU {iou:.2f} with true cell {g}), then accept"
            paint = (truth == g) & ((data == 0) | (data == label))
            layer.data[(data == label) & ~paint] = 0  # erase what lies outside the true cell
            layer.data[paint] = label  # paint the true cell's free pixels
            layer.refresh()
            edited = label
            panel.accept_button.native.click()
            accepted += 1
        else:
            action = f"accept (IoU {iou:.2f})"
            panel.accept_button.native.click()
            accepted += 1
        _pump(app, 3)
        print(f"  step {step}: {info} -> {action}; {panel.counter.value}")
    print(f"queue done: {accepted} accepted ({'one corrected' if edited else 'none corrected'}), {deleted} deleted; "
          f"{panel.counter.value}")
    if not panel.counter.value.startswith(f"reviewed {accepted} of {accepted} flagged"):
        failures.append(f"counter says {panel.counter.value!r} after {accepted} accepts")
    if edited is not None and not dock.layer_was_edited():
        failures.append("the corrected layer does not count as edited")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reviewed.json"
        dock.export(out, labels_layer=layer)
        back = next(iter(load_annotations(out)))
        rev = back.instances.columns.get("reviewed")
        n_rev = int(np.count_nonzero(rev)) if rev is not None else 0
        print(f"exported COCO JSON: {len(back.instances)} cells, {n_rev} reviewed")
        if n_rev != accepted:
            failures.append(f"COCO JSON has {n_rev} reviewed cells, {accepted} were accepted")

    if shot is None:
        _show_panel(panel)
        _close_toasts(viewer)
        _pump(app, 20)
        shot, shot_step = viewer.screenshot(canvas_only=False, flash=False), "end"
    rgb = Image.fromarray(np.asarray(shot)[..., :3])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({rgb.width}x{rgb.height}, {args.out.stat().st_size / 1024:.0f} KB) at step {shot_step}")
    viewer.close()
    for f in failures:
        print(f"review: FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
