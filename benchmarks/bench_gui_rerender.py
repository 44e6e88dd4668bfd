"""Time the "Segment cells" dock's slider path: cached raw instances -> postprocess -> Labels layer update.

Run under an X server (``xvfb-run -a python benchmarks/bench_gui_rerender.py``). The input is a synthetic
SH-SY5Y-style image of 520 x 704 pixels with 800 cells. Its raw "predictions" imitate an ensemble's
output: every cell as a soft probability crop (its mask blurred, padded by 3 px) with a random score,
plus a shifted, lower-scored duplicate of 40 % of the cells (the overlapping candidates that
post-processing has to remove).

Printed figures (milliseconds, median over the repeats, after one warm-up):
    postprocess   ``postprocess`` alone (the core);
    render        the dock's whole render: postprocess + features + ``layer.data``/``features`` update;
    render+paint  the render plus one pass of the Qt event loop (the canvas redraw).
The goal in the issue: a slider move re-renders in well under 200 ms. Wall times swell on a shared,
loaded machine; the CPU time of the process (in brackets) is the steadier figure there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from scipy import ndimage


def raw_predictions(n_cells: int = 800, seed: int = 0, duplicate_fraction: float = 0.4):
    from napari_sartorius.instances import Instances
    from napari_sartorius.synthetic import make_sample

    s = make_sample("shsy5y", seed=seed, n_cells=n_cells)
    rng = np.random.default_rng(seed)
    h, w = s.labels.shape
    boxes, scores, masks, origins = [], [], [], []
    slices = ndimage.find_objects(s.labels)

    def add(sl, lab, shift, score):
        y0 = max(sl[0].start - 3 + shift[0], 0)
        x0 = max(sl[1].start - 3 + shift[1], 0)
        y1 = min(sl[0].stop + 3 + shift[0], h)
        x1 = min(sl[1].stop + 3 + shift[1], w)
        if y1 - y0 < 2 or x1 - x0 < 2:
            return
        src = s.labels[max(y0 - shift[0], 0) : y1 - shift[0], max(x0 - shift[1], 0) : x1 - shift[1]] == lab
        crop = np.zeros((y1 - y0, x1 - x0), np.float32)
        crop[: src.shape[0], : src.shape[1]] = src
        crop = ndimage.gaussian_filter(crop, 1.0)
        crop /= max(float(crop.max()), 1e-6)
        masks.append(crop)
        origins.append((y0, x0))
        boxes.append((x0, y0, x1, y1))
        scores.append(score)

    for lab, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        add(sl, lab, (0, 0), float(rng.uniform(0.3, 1.0)))
        if rng.random() < duplicate_fraction:
            add(sl, lab, tuple(rng.integers(-2, 3, size=2)), float(rng.uniform(0.1, 0.6)))
    inst = Instances(
        image_size=(h, w),
        boxes=np.asarray(boxes, np.float32),
        scores=np.asarray(scores, np.float32),
        classes=np.zeros(len(masks), np.int64),  # shsy5y
        masks=masks,
        mask_origins=np.asarray(origins, np.int64),
    )
    return s, inst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sartorius._widgets.segment import SegmentCellsWidget
    from napari_sartorius.cell_types import DEFAULT_CLASSES
    from napari_sartorius.postprocess import postprocess

    sample, inst = raw_predictions(args.cells)
    viewer = napari.Viewer(show=True)
    image = viewer.add_image(sample.image, name="shsy5y")
    dock = SegmentCellsWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Segment cells")
    app = QApplication.instance()
    dock.set_predictions([inst], DEFAULT_CLASSES, image)
    app.processEvents()
    layer = dock.labels_layer
    print(f"{len(inst)} raw candidates, {int(layer.data.max())} cells rendered, image {sample.labels.shape}")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(wall clock; load average {load:.1f} on {os.cpu_count()} CPUs; CPU time of this process in brackets)")
    # A mask-threshold move recomputes every cleaned crop; a score move reuses them (CleanedCrops).
    score = dock.class_row("shsy5y").score
    for name, slider, values in (("mask threshold", dock.mask_threshold, [0.50, 0.55]), ("score threshold", score, [0.15, 0.20])):
        pp, render, painted, pp_cpu, render_cpu = [], [], [], [], []
        for k in range(args.repeats + 1):
            slider.value = values[k % 2]
            dock._render_timer.stop()  # time the render itself, not the debounce delay
            settings = dock.settings()
            c0, t0 = time.process_time(), time.perf_counter()
            postprocess(inst, settings)
            c1, t1 = time.process_time(), time.perf_counter()
            dock.rerender()
            c2, t2 = time.process_time(), time.perf_counter()
            app.processEvents()
            t3 = time.perf_counter()
            assert dock.labels_layer is layer, "the render went to a new layer"
            if k:  # the first pass warms caches
                pp.append(1000 * (t1 - t0))
                render.append(1000 * (t2 - t1))
                painted.append(1000 * (t3 - t1))
                pp_cpu.append(1000 * (c1 - c0))
                render_cpu.append(1000 * (c2 - c1))
        print(f"-- moving the {name} slider")
        print(f"postprocess, uncached  median {statistics.median(pp):7.1f} ms  (min {min(pp):.1f}) [cpu {statistics.median(pp_cpu):.1f}]")
        print(f"dock render            median {statistics.median(render):7.1f} ms  (min {min(render):.1f}) [cpu {statistics.median(render_cpu):.1f}]")
        print(f"dock render + paint    median {statistics.median(painted):7.1f} ms  (min {min(painted):.1f})")
    viewer.close()


if __name__ == "__main__":
    main()
