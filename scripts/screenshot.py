"""Take the README's screenshot: napari with the synthetic cort sample, the "Segment cells" dock, and
the weight-free engine's result.

    xvfb-run -a python scripts/screenshot.py [--out docs/screenshot.png]

It drives the dock as a user would (open the sample, dock the plugin from its manifest, press
Segment cells, wait for the worker) and saves the whole window as a palette PNG (kept < 500 KB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    ap.add_argument("--size", default="1500x950", help="window size WIDTHxHEIGHT in pixels")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the segmentation")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    import warnings

    # A toast about the Qt binding would cover the canvas; it says nothing about the plugin.
    warnings.filterwarnings("ignore", message=".*PyQt5 backend.*")
    warnings.filterwarnings("ignore", message=".*System theme detection.*")

    import napari
    import numpy as np
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-sartorius", show=True)
    viewer.window._qt_window.resize(width, height)
    viewer.open_sample("napari-sartorius", "cort")
    viewer.layers["cort ground truth"].visible = False
    _, dock = viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    dock.image_layer.value = viewer.layers["cort sample"]
    app = QApplication.instance()
    if dock.run() is None:
        print("screenshot: the dock refused to start", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    while dock.is_running:
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > args.timeout:
            dock.cancel()
            print("screenshot: segmentation timed out", file=sys.stderr)
            return 1
    if dock.labels_layer is None:
        print(f"screenshot: no labels ({dock.status.value})", file=sys.stderr)
        return 1
    viewer.layers.selection.active = dock.labels_layer
    viewer.reset_view()
    viewer.camera.zoom *= 1.08
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    _close_toasts(viewer)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    rgb = Image.fromarray(np.asarray(shot)[..., :3])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    size_kb = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({rgb.width}x{rgb.height}, {size_kb:.0f} KB): {dock.status.value}")
    viewer.close()
    return 0


def _close_toasts(viewer) -> None:
    """Hide napari's pop-up notifications (e.g. about the Qt binding) so they do not cover the canvas."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    for w in QApplication.topLevelWidgets() + viewer.window._qt_window.findChildren(NapariQtNotification):
        if isinstance(w, NapariQtNotification):
            w.hide()
    QApplication.processEvents()


if __name__ == "__main__":
    sys.exit(main())
