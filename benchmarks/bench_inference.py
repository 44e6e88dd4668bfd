"""Cost of fusing an ensemble: 3 models x 4 TTA variants, ~800 cells each, on a 520 x 704 image.

Synthetic sources stand in for the models: every source sees ~95 % of the 800 cells (box corners
jittered by ~1.5 px, a disc-shaped probability crop per cell, shifted with the box), plus ~5 % false
positives and ~10 % duplicate candidates, as raw Mask R-CNN output has. For each ensemble method it
prints the median wall time of ``fuse_instances`` over several runs, the time of post-processing the
fused result (``napari_sartorius.postprocess``), and the process's peak resident memory.

The issue's target: fusion + post-processing under 15 % of one model's forward time on the same CPU,
and peak RSS under 3 GB. Pass ``--forward-s SECONDS`` (one model's forward time on this image) to
print the ratio.

    python benchmarks/bench_inference.py [--runs 5] [--cells 800] [--forward-s 6.0]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import numpy as np

from napari_sartorius.inference.ensemble import METHODS, fuse_instances
from napari_sartorius.instances import Instances

SIZE = (520, 704)


def disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    d = np.sqrt((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2)
    return (1.0 / (1.0 + np.exp((d - r) * 1.5))).astype(np.float32)


def synthetic_source(rng: np.random.Generator, centres, radii, classes) -> Instances:
    h_img, w_img = SIZE
    n = len(centres)
    seen = np.flatnonzero(rng.random(n) < 0.95)
    dup = rng.choice(seen, size=n // 10)
    idx = np.concatenate([seen, dup])
    c = centres[idx] + rng.normal(0, 1.0, (len(idx), 2))
    r = radii[idx] * rng.uniform(0.9, 1.1, len(idx))
    # false positives anywhere
    n_fp = n // 20
    c = np.concatenate([c, rng.uniform([10, 10], [w_img - 10, h_img - 10], (n_fp, 2))])
    r = np.concatenate([r, rng.uniform(5, 10, n_fp)])
    cls = np.concatenate([classes[idx], rng.integers(0, 3, n_fp)])
    boxes = np.concatenate([c - r[:, None], c + r[:, None]], axis=1) + rng.normal(0, 1.5, (len(c), 4))
    boxes = np.clip(boxes, 0, [w_img, h_img, w_img, h_img])
    masks, origins = [], []
    for (x0, y0, x1, y1), (cx, cy), rr in zip(boxes, c, r):
        oy, ox = int(y0), int(x0)
        hh, ww = max(int(np.ceil(y1)) - oy, 1), max(int(np.ceil(x1)) - ox, 1)
        masks.append(disc(hh, ww, cy - oy, cx - ox, rr))
        origins.append((oy, ox))
    scores = np.clip(rng.beta(5, 2, len(c)), 0.05, 1.0)
    scores[len(idx) :] *= 0.3
    return Instances(SIZE, boxes, scores, cls, masks, np.asarray(origins, np.int64))


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cells", type=int, default=800)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--forward-s", type=float, default=None, help="one model's forward time (s) for the ratio")
    args = ap.parse_args(argv)

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    h_img, w_img = SIZE
    centres = rng.uniform([8, 8], [w_img - 8, h_img - 8], (args.cells, 2))
    radii = rng.uniform(6.0, 11.0, args.cells)  # mean area ~ 225 px, as SH-SY5Y
    classes = np.zeros(args.cells, np.int64)
    n_src = args.models * args.variants
    t0 = time.perf_counter()
    sources = [synthetic_source(rng, centres, radii, classes) for _ in range(n_src)]
    weights = np.repeat(np.linspace(1.0, 0.6, args.models), args.variants)
    n_cand = sum(len(s) for s in sources)
    print(
        f"{args.models} models x {args.variants} TTA variants = {n_src} sources, {n_cand} candidates "
        f"({n_cand / n_src:.0f} per source) on {h_img}x{w_img}; built in {time.perf_counter() - t0:.1f} s; "
        f"RSS so far {peak_rss_mb():.0f} MB"
    )

    try:
        from napari_sartorius.postprocess import PostprocessSettings, postprocess
    except ImportError:  # post-processing lives in another module; time fusion alone without it
        postprocess = None

    print("wall-clock medians, and the fusion's CPU time (process_time; less sensitive to a busy machine)")
    print(f"{'method':>10} {'fusion median':>14} {'min':>8} {'fusion CPU':>11} {'fused':>6} {'postprocess':>12} {'total':>8}"
          + ("  % of forward" if args.forward_s else ""))
    for method in METHODS:
        times, cpu, fused = [], [], None
        for _ in range(args.runs):
            t, c = time.perf_counter(), time.process_time()
            fused = fuse_instances(sources, weights, method, iou_thr=0.5, skip_box_thr=0.0)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        post = float("nan")
        if postprocess is not None:
            pt = []
            for _ in range(max(1, args.runs // 2)):
                t = time.perf_counter()
                postprocess(fused, PostprocessSettings(cell_type="shsy5y"))
                pt.append(time.perf_counter() - t)
            post = statistics.median(pt)
        med = statistics.median(times)
        total = med + (0.0 if np.isnan(post) else post)
        line = f"{method:>10} {med * 1000:11.0f} ms {min(times) * 1000:5.0f} ms {statistics.median(cpu) * 1000:8.0f} ms {len(fused):6d} {post * 1000:9.0f} ms {total * 1000:5.0f} ms"
        if args.forward_s:
            line += f"  {100 * total / args.forward_s:10.1f} %"
        print(line)
    print(f"peak RSS: {peak_rss_mb():.0f} MB (target < 3000 MB)")


if __name__ == "__main__":
    main()
