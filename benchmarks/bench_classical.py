"""Benchmark of the weight-free classical engine: competition score and speed.

Prints one table:
- synthetic images of each style (``--seeds`` seeds each, 520 x 704): the competition score with the
  cell type given and with the engine's own guess (``auto``), how often the guess is right, cells and
  objects per image;
- the real annotated images in ``../shared/data/real`` (cort, read with
  ``napari_sartorius.io.load_annotations``) per image and their mean, when that folder exists;
- the median time to segment one image (single thread), with the type given and with ``auto``
  (which segments at two diameters), and the time to draw one synthetic image.

Each score is given for the raw engine output (every object it returns, overlaps resolved by score)
and after the default post-processing (per-type score threshold and minimum area,
``napari_sartorius.postprocess``), which is what ``segment`` and the plugin show: ``raw/post``.

Run: ``python benchmarks/bench_classical.py [--real DIR] [--seeds N]``.
"""

from __future__ import annotations

import argparse
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


def load_real(folder: Path) -> list[tuple[str, np.ndarray, Instances, str]]:
    """The annotated images of ``folder`` (coco.json + images/) as (id, uint8 image, truth, type)."""
    from napari_sartorius.io import load_annotations
    from napari_sartorius.io.images import read_image

    annots = load_annotations(folder / "coco.json", images_dir=folder / "images")
    return [
        (a.image_id, read_image(folder / "images" / a.file_name), a.instances, a.cell_type or "cort")
        for a in annots.images
    ]


def post(inst: Instances, cell_type: str | None) -> np.ndarray:
    """Default post-processing of raw instances -> label image."""
    return postprocess(inst, PostprocessSettings(cell_type=cell_type)).labels


def _timed(engine: ClassicalEngine, image: np.ndarray, times: list[float]) -> Instances:
    t0 = time.perf_counter()
    out = engine.predict(image)
    times.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="folder with coco.json and images/")
    ap.add_argument("--seeds", type=int, default=3, help="synthetic images per style")
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    t_given: list[float] = []
    t_auto: list[float] = []
    t_synth: list[float] = []
    auto = ClassicalEngine()
    print("classical engine, default settings (cell type given or auto); scores raw/post-processed")
    print(f"{'data':22s} {'type given':>13s} {'auto':>13s} {'auto class':>10s} {'cells':>6s} {'objects':>7s}")
    rows = []
    for style in STYLES:
        given = ClassicalEngine(ClassicalSettings(cell_type=style))
        sg, sgp, sa, sap, right, n_gt, n_pred = [], [], [], [], 0, 0, 0
        for seed in range(100, 100 + args.seeds):
            t0 = time.perf_counter()
            sample = make_sample(style, seed=seed)
            t_synth.append(time.perf_counter() - t0)
            im, lab = sample.image, sample.labels
            pg = _timed(given, im, t_given)
            pa = _timed(auto, im, t_auto)
            sg.append(competition_score(pg, lab))
            sgp.append(competition_score(post(pg, style), lab))
            sa.append(competition_score(pa, lab))
            sap.append(competition_score(post(pa, None), lab))
            right += int(len(pa) > 0 and auto.class_names[int(pa.classes[0])] == style)
            n_gt += int(lab.max())
            n_pred += len(pg)
        k = len(sg)
        rows.append((np.mean(sg), np.mean(sgp), np.mean(sa), np.mean(sap)))
        print(
            f"{'synthetic ' + style:22s} {rows[-1][0]:6.3f}/{rows[-1][1]:.3f} {rows[-1][2]:6.3f}/{rows[-1][3]:.3f} "
            f"{right:>8d}/{k} {n_gt / k:6.0f} {n_pred / k:7.0f}"
        )
    m = np.mean(rows, axis=0)
    print(f"{'synthetic mean':22s} {m[0]:6.3f}/{m[1]:.3f} {m[2]:6.3f}/{m[3]:.3f}")

    if (args.real / "coco.json").is_file():
        scores = []
        for image_id, img, gt, cell_type in load_real(args.real):
            given = ClassicalEngine(ClassicalSettings(cell_type=cell_type))
            pg = _timed(given, img, t_given)
            pa = _timed(auto, img, t_auto)
            scores.append((
                competition_score(pg, gt), competition_score(post(pg, cell_type), gt),
                competition_score(pa, gt), competition_score(post(pa, None), gt),
            ))
            guess = auto.class_names[int(pa.classes[0])] if len(pa) else "-"
            s = scores[-1]
            print(
                f"{'real ' + image_id:22s} {s[0]:6.3f}/{s[1]:.3f} {s[2]:6.3f}/{s[3]:.3f} {guess:>10s} "
                f"{len(gt):6d} {len(pg):7d}"
            )
        m = np.mean(scores, axis=0)
        print(f"{'real mean':22s} {m[0]:6.3f}/{m[1]:.3f} {m[2]:6.3f}/{m[3]:.3f}")
    else:
        print(f"(no real data at {args.real}; skipped)")
    print(
        f"time per 520x704 image, median: type given {statistics.median(t_given) * 1000:.0f} ms, "
        f"auto {statistics.median(t_auto) * 1000:.0f} ms; make_sample {statistics.median(t_synth) * 1000:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
