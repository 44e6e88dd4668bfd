"""CPU time of everything after the network forward, with engines that return canned detections.

No network runs: each :class:`CannedEngine` returns ``--detections`` (1000) detections per image with
mask crops of the engine's output shape (the box's pixel window, detectron2's paste window, as
:func:`~napari_sartorius.models.mask_paste.paste_crops` gives). Detections sit around ``--cells`` cells
of a 520 x 704 image, a few per cell with jittered boxes, different for every engine; under flip TTA
the engine recognises the flipped image and returns the same cells flipped, so the variants of one
image agree as a trained model's would and fusion sees clusters of many members.

Prints, per image (best of ``--repeats``):

* ``segment_image`` with ``--models`` engines x 4 flips (12 sources, 12,000 candidates): total, and
  inside it TTA de-augmentation, fusion (uncertainty included) and the rest;
* fusion alone, with and without the uncertainty, for WBF, NMS and mask NMS on the same 12 sources, and
  WBF and mask NMS with their loops in Python (as where numba is missing) instead of numba's compiled loops;
* post-processing of the fused result;
* ``segment_folder`` (the ``segment`` command's engine) on a folder of ``--images`` PNGs with one engine
  without TTA: time per image (label images, RLE, JSON lines, merge, summary.csv), with the
  post-processing in the process and (wall time) in ``--post-workers`` worker processes.

Times are the process's CPU time (``time.process_time``: the machine may be shared; run with
``OMP_NUM_THREADS=1``). ``--profile`` adds a cProfile listing (top 25 by cumulative time) of the 3 x 4 run.

    python benchmarks/bench_postforward.py [--models 3] [--detections 1000] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np


class CannedEngine:
    """An engine (the contract of :mod:`napari_sartorius.inference.engine`) that returns canned
    detections instead of running a network.

    Args:
        reference: the ``(H, W)`` image the detections belong to; a left-right / up-down flip of it is
            recognised and answered with the flipped detections (any other image gets the unflipped ones).
        n_det: detections per image; n_cells: cells they sit around; seed: varies the detections.
    """

    class_names = ("shsy5y", "astro", "cort")

    def __init__(self, reference: np.ndarray, n_det: int = 1000, n_cells: int = 400, seed: int = 0,
                 cell_seed: int = 1234) -> None:
        self.name = f"canned{seed}"
        self.reference = np.asarray(reference)
        h, w = self.reference.shape[:2]
        cells = np.random.default_rng(cell_seed)
        cy, cx = cells.uniform(10, h - 10, n_cells), cells.uniform(10, w - 10, n_cells)
        ch, cw = cells.uniform(8, 24, n_cells), cells.uniform(8, 24, n_cells)
        rng = np.random.default_rng(seed)
        of = rng.integers(0, n_cells, n_det)
        jitter = rng.normal(0, 1.5, (n_det, 4))
        x0 = np.clip(cx[of] - cw[of] / 2 + jitter[:, 0], 0, w - 2)
        y0 = np.clip(cy[of] - ch[of] / 2 + jitter[:, 1], 0, h - 2)
        x1 = np.clip(cx[of] + cw[of] / 2 + jitter[:, 2], x0 + 1, w)
        y1 = np.clip(cy[of] + ch[of] / 2 + jitter[:, 3], y0 + 1, h)
        self.boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
        self.scores = rng.uniform(0.05, 1.0, n_det).astype(np.float32)
        self.classes = (rng.random(n_det) < 0.1).astype(np.int64)
        self.masks, origins = [], []
        for (bx0, by0, bx1, by1) in self.boxes.tolist():
            wy0, wx0 = max(int(np.floor(by0)) - 1, 0), max(int(np.floor(bx0)) - 1, 0)
            wy1, wx1 = min(int(np.ceil(by1)) + 1, h), min(int(np.ceil(bx1)) + 1, w)
            yy, xx = np.mgrid[wy0:wy1, wx0:wx1] + 0.5
            r = ((yy - (by0 + by1) / 2) / max(by1 - by0, 1) * 2) ** 2 + ((xx - (bx0 + bx1) / 2) / max(bx1 - bx0, 1) * 2) ** 2
            m = np.clip(1.2 - r + rng.normal(0, 0.1, r.shape), 0, 1).astype(np.float32)
            self.masks.append(m)
            origins.append((wy0, wx0))
        self.origins = np.asarray(origins, np.int64)
        self._variants: dict = {}

    def _variant(self, flip_x: bool, flip_y: bool):
        key = (flip_x, flip_y)
        if key not in self._variants:
            h, w = self.reference.shape[:2]
            b = self.boxes.copy()
            o = self.origins.copy()
            masks = self.masks
            if flip_x:
                b[:, [0, 2]] = w - self.boxes[:, [2, 0]]
                o[:, 1] = w - self.origins[:, 1] - np.array([m.shape[1] for m in masks])
                masks = [np.ascontiguousarray(m[:, ::-1]) for m in masks]
            if flip_y:
                b[:, [1, 3]] = h - self.boxes[:, [3, 1]]
                o[:, 0] = h - self.origins[:, 0] - np.array([m.shape[0] for m in masks])
                masks = [np.ascontiguousarray(m[::-1]) for m in masks]
            self._variants[key] = (b, o, masks)
        return self._variants[key]

    def predict_batch(self, images):
        from napari_sartorius.instances import Instances

        out = []
        ref = self.reference
        for image in images:
            key = (False, False)
            if image.shape == ref.shape:
                for fx, fy in ((False, False), (True, False), (False, True), (True, True)):
                    v = ref[::-1 if fy else 1, ::-1 if fx else 1]
                    if np.array_equal(image, v):
                        key = (fx, fy)
                        break
            b, o, masks = self._variant(*key)
            # what MaskRCNNEngine._to_instances builds from the network's output
            out.append(Instances(image.shape[:2], b, self.scores, self.classes, masks, o))
        return out


def best_time(fn, repeats: int):
    """(best CPU seconds of ``repeats`` calls, last result): the best, not the median, because the
    machine may be shared and contention only ever adds time."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        result = fn()
        times.append(time.process_time() - t0)
    return min(times), result


def python_loop_time(sources, method: str, repeats: int) -> float | None:
    """Best CPU seconds of ``method``'s fusion (with uncertainty) with its sequential loop in Python, as
    where numba is missing; None for a method without a compiled loop, or where numba is missing (the
    figures printed before are then already the Python loop's)."""
    import napari_sartorius.inference.fusion_methods as fm
    from napari_sartorius.inference.ensemble import fuse_instances

    name = {"wbf": "wbf_grid_loop", "mask_nms": "mask_nms_loop"}.get(method)
    if name is None or fm._compiled(name, 0, True) is None:
        return None
    real = fm._compiled
    fm._compiled = lambda *args: None
    try:
        return best_time(lambda: fuse_instances(sources, method=method), repeats)[0]
    finally:
        fm._compiled = real


def ensemble_figures(image, engines, repeats: int, profile: bool) -> None:
    import napari_sartorius.inference.segment as seg
    import napari_sartorius.inference.tta as tta
    from napari_sartorius.inference.ensemble import fuse_instances
    from napari_sartorius.postprocess import PostprocessSettings, postprocess

    sections = {"tta inverse": 0.0, "fusion": 0.0}
    real_invert, real_fuse = seg.invert_batch, seg.fuse_instances

    def timed(name, fn):
        def call(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                sections[name] += time.process_time() - t0
        return call

    def run():
        return seg.run_to_completion(seg.segment_image(image, engines, tta="flips"))

    seg.invert_batch, seg.fuse_instances = timed("tta inverse", real_invert), timed("fusion", real_fuse)
    try:
        run()  # warm-up (the engines cache their flipped detections)
        best = None
        for _ in range(repeats):  # the sections of the fastest run
            for k in sections:
                sections[k] = 0.0
            t0 = time.process_time()
            fused = run()
            total = time.process_time() - t0
            if best is None or total < best[0]:
                best = (total, dict(sections))
        total, per = best
    finally:
        seg.invert_batch, seg.fuse_instances = real_invert, real_fuse
    rest = total - sum(per.values())
    print(f"segment_image, {len(engines)} engines x 4 flips: {total * 1000:.0f} ms per image -> {len(fused)} instances "
          f"(TTA inverse {per['tta inverse'] * 1000:.0f} ms, fusion {per['fusion'] * 1000:.0f} ms, "
          f"other {rest * 1000:.0f} ms)", flush=True)

    sources = tta.run_tta(engines[0], image, "flips")
    for e in engines[1:]:
        sources += tta.run_tta(e, image, "flips")
    n = sum(len(s) for s in sources)
    for method in ("wbf", "nms", "mask_nms"):
        off, _ = best_time(lambda: fuse_instances(sources, method=method, uncertainty=False), repeats)
        on, _ = best_time(lambda: fuse_instances(sources, method=method, uncertainty=True), repeats)
        print(f"fusion {method} of {len(sources)} sources, {n} candidates: {off * 1000:.0f} ms, with uncertainty "
              f"{on * 1000:.0f} ms (uncertainty {100 * (on - off) / off:.0f} % of fusion)", flush=True)
        python_loop = python_loop_time(sources, method, repeats)
        if python_loop is not None:
            print(f"  the same with uncertainty, its loop in Python instead of numba's compiled loop: "
                  f"{python_loop * 1000:.0f} ms", flush=True)
    settings = PostprocessSettings(class_names=engines[0].class_names)
    t_post, res = best_time(lambda: postprocess(fused, settings), repeats)
    print(f"post-processing of {len(fused)} fused instances: {t_post * 1000:.0f} ms -> {len(res)} cells", flush=True)
    if profile:
        print_profile(run, "cumulative", 25)


def print_profile(fn, sort: str, rows: int) -> None:
    """cProfile listing of one call of ``fn``: the top ``rows`` functions by ``sort``."""
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats(sort).print_stats(rows)
    print(out.getvalue())


def folder_figures(images, engine, repeats: int, profile: bool, post_workers: int) -> None:
    import inspect

    from skimage.io import imsave

    from napari_sartorius.inference.folder_run import FolderSettings, segment_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = []
        for k, image in enumerate(images):
            p = folder / f"img{k:04d}.png"
            imsave(p, image, check_contrast=False)
            paths.append(p)
        runs = [0]

        def run(**kwargs):
            runs[0] += 1
            return segment_folder(paths, [engine], Path(tmp) / f"out{runs[0]}", FolderSettings(), say=lambda s: None,
                                  **kwargs)

        run()
        cpu, _ = best_time(run, repeats)
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
        wall = (time.perf_counter() - t0) / repeats
        print(f"segment_folder, 1 engine, no TTA, {len(paths)} PNGs, post-processing in this process: "
              f"{cpu / len(paths) * 1000:.0f} ms CPU, {wall / len(paths) * 1000:.0f} ms wall per image", flush=True)
        if post_workers and "post_workers" in inspect.signature(segment_folder).parameters:
            run(post_workers=post_workers)
            t0 = time.perf_counter()
            for _ in range(repeats):
                run(post_workers=post_workers)
            wall = (time.perf_counter() - t0) / repeats
            print(f"segment_folder, the same with {post_workers} post-processing workers: "
                  f"{wall / len(paths) * 1000:.0f} ms wall per image", flush=True)
        if profile:
            print_profile(run, "tottime", 20)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--detections", type=int, default=1000)
    ap.add_argument("--cells", type=int, default=400)
    ap.add_argument("--images", type=int, default=4, help="PNGs of the folder run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--post-workers", type=int, default=2, help="post-processing workers of the second folder run")
    ap.add_argument("--skip-folder", action="store_true")
    args = ap.parse_args(argv)
    from napari_sartorius.synthetic import make_sample

    image = make_sample("shsy5y", seed=0).image
    engines = [CannedEngine(image, args.detections, args.cells, seed=s) for s in range(args.models)]
    print(f"{args.models} canned engines, {args.detections} detections per image around {args.cells} cells, "
          f"image {image.shape[0]} x {image.shape[1]}", flush=True)
    ensemble_figures(image, engines, args.repeats, args.profile)
    if not args.skip_folder:
        images = [make_sample("shsy5y", seed=k).image for k in range(args.images)]
        folder_figures(images, CannedEngine(image, args.detections, args.cells, seed=0), args.repeats, args.profile,
                       args.post_workers)


if __name__ == "__main__":
    main()
