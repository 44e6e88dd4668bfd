"""Time COCO mask AP on a dense 520 x 704 image: pycocotools vs faster-coco-eval (same numbers).

    python benchmarks/bench_coco_eval.py [--cells 800] [--repeat 3]

The ground truth is up to ``--cells`` non-overlapping discs (radius 5-9 px) placed at random until
the image is full; the predictions are the truth shifted by one pixel with a fifth of the cells
dropped, plus as many false positives (the truth moved by 37 x 53 px), all with random scores.
Prints the median time per backend and both APs (they agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.coco_eval import coco_mask_ap


def dense_pair(cells: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    h, w = 520, 704
    labels = np.zeros((h, w), np.int32)
    n = 0
    while n < cells:  # non-overlapping random discs of radius 5-9 px
        r = int(rng.integers(5, 10))
        y, x = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
        disc = yy**2 + xx**2 <= r * r
        window = labels[y - r : y + r + 1, x - r : x + r + 1]
        if window[disc].any():
            if rng.random() < 0.001:
                break
            continue
        n += 1
        window[disc] = n
    truth = Instances.from_label_image(labels)
    pred_labels = np.roll(labels, 1, axis=1)
    pred_labels[np.isin(pred_labels, rng.choice(np.arange(1, n + 1), n // 5, replace=False))] = 0
    fp = np.roll(np.roll(labels, 37, axis=0), 53, axis=1)
    pred = Instances.from_label_image(pred_labels)
    extra = Instances.from_label_image(fp)
    both = Instances.cat([pred, extra])
    both.scores = rng.uniform(0.05, 1.0, len(both)).astype(np.float32)
    names = ("shsy5y", "astro", "cort")
    return (
        AnnotationSet([ImageAnnotations("x", both, cell_type="shsy5y")], class_names=names),
        AnnotationSet([ImageAnnotations("x", truth, cell_type="shsy5y")], class_names=names),
        n,
        len(both),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=800)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    pred, gt, n_gt, n_pred = dense_pair(args.cells)
    print(f"{n_gt} ground-truth cells, {n_pred} predictions, 520 x 704")
    for backend in ("pycocotools", "faster"):
        times, result = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = coco_mask_ap(pred, gt, backend=backend)
            times.append(time.perf_counter() - t0)
        print(f"{backend:<12} median {statistics.median(times):6.2f} s   AP {result['AP']:.6f}  AP50 {result['AP50']:.6f}")


if __name__ == "__main__":
    main()
