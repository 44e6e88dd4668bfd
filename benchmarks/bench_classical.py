"""Benchmark of the weight-free classical engine: speed and competition score.

Prints
- the median time to segment one 520 x 704 image (single thread),
- the competition score on synthetic images of each style (3 seeds each), with the cell type given
  and with the engine's own guess (``auto``), and how often the guess is right,
- the score on the real annotated cort images in ``../shared/data/real`` when that folder exists.

Each score is given for the raw engine output (every object it returns) and after the default
post-processing (per-type score threshold and minimum area, ``napari_sartorius.postprocess``), which
is what ``segment`` and the plugin show.

Run: ``python benchmarks/bench_classical.py [--real DIR] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from napari_sartorius.classical import ClassicalEngine, ClassicalSettings  # noqa: E402
from napari_sartorius.instances import Instances  # noqa: E402
from napari_sartorius.metrics import competition_score  # noqa: E402
from napari_sartorius.postprocess import PostprocessSettings, postprocess  # noqa: E402
from napari_sartorius.synthetic import STYLES, make_sample  # noqa: E402

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _decode_kaggle_rle(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Kaggle RLE (1-indexed starts, row-major over (H, W)) -> bool (H, W)."""
    flat = np.zeros(shape[0] * shape[1], bool)
    v = np.asarray(rle.split(), np.int64)
    for start, length in zip(v[0::2] - 1, v[1::2]):
        flat[start : start + length] = True
    return flat.reshape(shape)


def load_real(folder: Path) -> list[tuple[str, np.ndarray, Instances]]:
    """The annotated images of ``folder`` (train.csv + images/*.png) as (id, uint8 image, gt)."""
    from skimage.io import imread

    rows: dict[str, list[dict]] = {}
    with open(folder / "train.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["id"], []).append(row)
    out = []
    for image_id, rs in sorted(rows.items()):
        img = imread(folder / "images" / f"{image_id}.png")
        shape = (int(rs[0]["height"]), int(rs[0]["width"]))
        masks = [_decode_kaggle_rle(r["annotation"], shape) for r in rs]
        out.append((image_id, img, Instances.from_full_masks(masks, image_size=shape)))
    return out


def synthetic_set(seeds: int) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    return [
        (style, seed, s.image, s.labels)
        for style in STYLES
        for seed in range(100, 100 + seeds)
        for s in [make_sample(style, seed=seed)]
    ]


def post(inst: Instances, cell_type: str | None) -> np.ndarray:
    """Default post-processing of raw instances -> label image."""
    return postprocess(inst, PostprocessSettings(cell_type=cell_type)).labels


def timing(engine: ClassicalEngine, images: list[np.ndarray], repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        for im in images:
            t0 = time.perf_counter()
            engine.predict(im)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="folder with train.csv and images/")
    ap.add_argument("--seeds", type=int, default=3, help="synthetic images per style")
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    data = synthetic_set(args.seeds)
    print(f"classical engine, default settings: {ClassicalSettings()}")
    t = timing(ClassicalEngine(), [im for _, _, im, _ in data])
    print(f"time per 520x704 image (median of {len(data)}): {t * 1000:.0f} ms")

    print("\nsynthetic images (competition score, mean over seeds; raw / post-processed):")
    print(f"{'style':8s} {'type given':>13s} {'auto':>13s} {'auto class':>10s} {'cells':>6s} {'found':>6s}")
    totals = []
    for style in STYLES:
        given = ClassicalEngine(ClassicalSettings(cell_type=style))
        auto = ClassicalEngine()
        sg, sgp, sa, sap, right, n_gt, n_pred = [], [], [], [], 0, 0, 0
        for st, _, im, lab in data:
            if st != style:
                continue
            pg = given.predict(im)
            pa = auto.predict(im)
            sg.append(competition_score(pg, lab))
            sgp.append(competition_score(post(pg, style), lab))
            sa.append(competition_score(pa, lab))
            sap.append(competition_score(post(pa, None), lab))
            right += int(len(pa) > 0 and auto.class_names[int(pa.classes[0])] == style)
            n_gt += int(lab.max())
            n_pred += len(pg)
        totals.append((np.mean(sg), np.mean(sgp), np.mean(sa), np.mean(sap)))
        print(
            f"{style:8s} {np.mean(sg):6.3f}/{np.mean(sgp):.3f} {np.mean(sa):6.3f}/{np.mean(sap):.3f} "
            f"{right:>8d}/{len(sg)} {n_gt / len(sg):6.0f} {n_pred / len(sg):6.0f}"
        )
    m = np.mean(totals, axis=0)
    print(f"{'mean':8s} {m[0]:6.3f}/{m[1]:.3f} {m[2]:6.3f}/{m[3]:.3f}")

    if (args.real / "train.csv").is_file():
        real = load_real(args.real)
        engine = ClassicalEngine(ClassicalSettings(cell_type="cort"))
        print(f"\nreal annotated images in {args.real} (cell type given: cort):")
        scores = []
        for image_id, img, gt in real:
            pred = engine.predict(img)
            labels = post(pred, "cort")
            scores.append((competition_score(pred, gt), competition_score(labels, gt)))
            print(
                f"  {image_id}: score raw {scores[-1][0]:.3f}, post-processed {scores[-1][1]:.3f}  "
                f"({len(gt)} annotated, {len(pred)} found, {int(labels.max())} kept)"
            )
        m = np.mean(scores, axis=0)
        print(f"  mean: raw {m[0]:.3f}, post-processed {m[1]:.3f}")
    else:
        print(f"\n(no real data at {args.real}; skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
