"""Time post-processing of 1000 and 300 raw instances on a 520 x 704 image, single-threaded.

Target (issue 2): under 150 ms per image on one core, fast enough to drive threshold sliders; issue 11:
as little CPU as possible per image of a GPU folder run (1000 detections per image).

    python benchmarks/bench_postprocess.py [--n 1000 300] [--repeat 15]

Prints, per instance count and setting combination, the best (minimum) and the median CPU time
(``time.process_time``: the machine may be shared, the best of N is the figure to compare). The instances imitate a dense SH-SY5Y
prediction: blob-like crops of 15-30 px holding smooth mask probabilities (some with holes, some with
stray fragments), placed at random so that many overlap, with random scores and mostly one class.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from napari_sartorius.instances import Instances  # noqa: E402
from napari_sartorius.postprocess import PostprocessSettings, postprocess  # noqa: E402


def make_instances(n: int = 800, image_size=(520, 704), seed: int = 0) -> Instances:
    """``n`` random blob-shaped instances with probability crops, overlapping, random scores."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    masks, origins, boxes = [], [], []
    for _ in range(n):
        ch, cw = (int(v) for v in rng.integers(15, 31, size=2))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
        cy, cx = (ch - 1) / 2, (cw - 1) / 2
        ry, rx = ch / 2.2, cw / 2.2
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + 0.15 * np.sin(3 * theta + rng.uniform(0, 6.3))
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) / wobble
        prob = 1 / (1 + np.exp((r - 1) * 8))
        u = rng.uniform()
        if u < 0.15:  # a hollow one
            prob = np.where(r < 0.3, 0.1, prob)
        elif u < 0.3:  # a stray fragment in a corner
            prob[:3, :3] = 0.9
        masks.append(prob.astype(np.float32))
        origins.append((y0, x0))
        boxes.append((x0, y0, x0 + cw, y0 + ch))
    classes = rng.choice(3, size=n, p=[0.8, 0.1, 0.1])
    return Instances(
        image_size=image_size,
        boxes=np.asarray(boxes, np.float32),
        scores=rng.uniform(0.05, 1.0, size=n).astype(np.float32),
        classes=classes,
        masks=masks,
        mask_origins=np.asarray(origins, np.int64),
    )


def time_it(fn, repeat: int) -> list[float]:
    """CPU seconds of ``repeat`` calls of ``fn`` (after one warm-up call)."""
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 300], help="instance counts (default 1000 300)")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    base = PostprocessSettings()
    cases = {
        "all on (defaults)": base,
        "no fill_holes": base.with_(fill_holes=False),
        "no keep_largest": base.with_(keep_largest=False),
        "no fill, no keep_largest": base.with_(fill_holes=False, keep_largest=False),
        "all on, score threshold 0": base.with_(score_thresholds=(0.0, 0.0, 0.0)),
        "all on, max_overlap 1.0": base.with_(max_overlap=1.0),
    }
    for n in args.n:
        inst = make_instances(n)
        print(f"{n} instances on a {inst.image_size[0]}x{inst.image_size[1]} image, one thread, "
              f"CPU time of {args.repeat} runs each")
        print(f"{'settings':<30}{'kept':>6}{'best ms':>9}{'median ms':>11}")
        for name, s in cases.items():
            kept = len(postprocess(inst, s))
            t = time_it(lambda: postprocess(inst, s), args.repeat)
            print(f"{name:<30}{kept:>6}{min(t) * 1e3:>9.1f}{statistics.median(t) * 1e3:>11.1f}")
        print()


if __name__ == "__main__":
    main()
