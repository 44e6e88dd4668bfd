"""Take the Fine-tune dock's screenshot: a 1366 x 768 napari window (a laptop screen) with the
synthetic cort sample, its labels, and the "Fine-tune" dock after a real quick-preset run from a
fresh model (live loss curve included).

    xvfb-run -a python scripts/screenshot_finetune.py [--out docs/finetune_1366x768.png] [--iters 12]

The dock is driven as a user would drive it: open the sample, segment it with the weight-free engine,
open Fine-tune (which pairs the image with its labels), keep the quick preset, press Fine-tune, wait.
The training size is lowered to 256 px so that the run takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait(app, busy, timeout: float) -> bool:
    t0 = time.monotonic()
    while busy():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout:
            return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "finetune_1366x768.png")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)

    import tempfile
    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend.*")
    warnings.filterwarnings("ignore", message=".*System theme detection.*")

    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-sartorius", show=True)
    viewer.window._qt_window.resize(1366, 768)
    viewer.open_sample("napari-sartorius", "cort")
    labels = viewer.layers["cort ground truth"]  # stands for the corrected labels
    image = viewer.layers["cort sample"]
    viewer.layers.selection.active = labels
    _, dock = viewer.window.add_plugin_dock_widget("napari-sartorius", "Fine-tune")
    app = QApplication.instance()
    dock.set_validation(None)
    (row,) = dock.pair_rows
    row.set_pair(image, labels, "cort")
    dock.device.value = "cpu"
    dock.iterations.value = args.iters
    dock.train_size.value = 256
    dock.batch_size.value = 1
    with tempfile.TemporaryDirectory() as tmp:
        dock.output.value = Path(tmp) / "finetuned.pt"
        if dock.run() is None:
            print(f"screenshot: the dock refused to start ({dock.status.value})", file=sys.stderr)
            return 1
        if not _wait(app, lambda: dock.is_running, args.timeout):
            dock.cancel()
            print("screenshot: fine-tuning timed out", file=sys.stderr)
            return 1
        for _ in range(20):
            app.processEvents()
            time.sleep(0.05)
        shot = viewer.window._qt_window.grab()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_png = Path(tmp) / "shot.png"
        shot.save(str(tmp_png))
        img = Image.open(tmp_png).convert("RGB").quantize(colors=128)
        img.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB): {dock.status.value}")
    print("losses:", ", ".join(f"{v:.3f}" for _, v in dock.loss_plot.losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
