"""Take the review panel's screenshot: a real cort image (``../shared/data/real`` beside the repository),
the weight-free engine with multiscale TTA (so every cell has an uncertainty), the uncertain cells
marked, and the panel on the most uncertain cell after one was accepted.

    xvfb-run -a python scripts/screenshot_review.py [--image PATH] [--out docs/review_panel.png]

The image is never copied into the repository; only the screenshot is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT / ".." / "shared" / "data" / "real" / "images" / "0f7d009bc5d3.png"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "review_panel.png")
    ap.add_argument("--size", default="1500x1000", help="window size WIDTHxHEIGHT in pixels")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the segmentation")
    args = ap.parse_args(argv)
    if not args.image.is_file():
        print(f"screenshot: no image at {args.image}; pass --image", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.lower().split("x"))

    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend.*")
    warnings.filterwarnings("ignore", message=".*System theme detection.*")

    import napari
    import numpy as np
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from napari_sartorius.io.images import read_image

    sys.path.insert(0, str(ROOT / "scripts"))
    from screenshot import _close_toasts

    viewer = napari.Viewer(title="napari-sartorius", show=True)
    viewer.window._qt_window.resize(width, height)
    viewer.add_image(read_image(args.image), name=args.image.stem)
    _, dock = viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    dock.tta.value = "multiscale"
    dock.cell_type.value = "cort"
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
    dock.review.mark_uncertain()
    dock.review.next_cell()
    dock.review.accept()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    dock.native.parent().parent().ensureWidgetVisible(dock.review.native) if hasattr(
        dock.native.parent().parent(), "ensureWidgetVisible") else None
    _close_toasts(viewer)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    rgb = Image.fromarray(np.asarray(shot)[..., :3])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({rgb.width}x{rgb.height}, {args.out.stat().st_size / 1024:.0f} KB): "
          f"{dock.review.counter.value}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
