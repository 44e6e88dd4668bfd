"""Inference throughput of R50-FPN Mask R-CNNs on a GPU (or the CPU, with smaller counts).

Prints one table:

* images/s of one model without TTA, fp32 and fp16 (fp16 autocast on CUDA only), ``--batch`` images
  per pass, as built (plain) and prepared as checkpoint engines run (FrozenBN folded, channels-last);
* images/s of ``--models`` models x 4 flips (one TTA batch per model, fused with WBF);
* images/s of the ``segment`` command end to end on a folder of ``--images`` PNGs (one checkpoint, no
  TTA: decoding, network, pasting, post-processing, label images and ``predictions.json``; ``--workers``
  processes decode ahead of the model and as many post-process behind it), and its steady state (the
  same on twice the images, minus the first run: what a long folder run reaches once the fixed cost of
  loading the model and starting the workers is paid; that cost is printed too);
* the share of the 3 x 4 run's time in the network forward, mask pasting, fusion and post-processing;
* peak GPU memory (CUDA) or peak resident memory (CPU).

Targets on one H100/H200 (issue 11): >= 25 images/s for one R50-FPN fp16 without TTA, >= 2.5 images/s for
3 x 4. The models are randomly initialised (nothing is downloaded): at the default score threshold every
proposal passes, so each image gives ``detections_per_img`` (1000) detections, the most a trained model
gives on dense SH-SY5Y images, and pasting and post-processing work as hard as they ever do.
Images are synthetic SH-SY5Y samples of 520 x 704 px, resized inside the models to the test size.

    python benchmarks/bench_gpu.py                       # GPU if there is one: test size 1024, 32 images
    python benchmarks/bench_gpu.py --device cpu          # CPU: test size 512, 2 images (minutes)
    python benchmarks/bench_gpu.py --images 64 --batch 8 --test-size 1024 --models 3
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class Timers:
    """Seconds spent in named sections (CUDA synchronised at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def section(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.section(name):
                return fn(*args, **kwargs)

        return timed


def make_images(n: int, seed: int = 0) -> list[np.ndarray]:
    from napari_sartorius.synthetic import make_sample

    return [make_sample("shsy5y", seed=seed + k).image for k in range(n)]


def make_engine(device: str, test_size: int, seed: int, amp: bool, detections: int, fast: bool = True):
    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.config import ModelConfig
    from napari_sartorius.models.predictor import MaskRCNNEngine

    torch.manual_seed(seed)
    config = ModelConfig("mask_rcnn_R_50_FPN", min_size_test=test_size, max_size_test=2 * test_size,
                         detections_per_img=detections)
    return MaskRCNNEngine(build_model(config), config, device=device, name=f"R50-{seed}", amp=amp, fast=fast)


def images_per_second(engine, images, batch: int, timers: Timers) -> tuple[float, float]:
    """(images/s, mean detections per image) of ``engine.predict_batch`` over ``images``."""
    engine.predict_batch(images[:batch])  # warm-up (cuDNN autotuning, allocator)
    n_det = 0
    with timers.section("run"):
        for start in range(0, len(images), batch):
            n_det += sum(len(r) for r in engine.predict_batch(images[start : start + batch]))
    seconds = timers.seconds.pop("run")
    return len(images) / seconds, n_det / len(images)


def ensemble_run(engines, images, timers: Timers) -> float:
    """images/s of ``engines`` x 4 flips, fused and post-processed; fills the forward/paste/fusion/
    post-processing sections of ``timers``."""
    import napari_sartorius.inference.segment as seg
    import napari_sartorius.models.mask_paste as mp
    from napari_sartorius.postprocess import PostprocessSettings, postprocess

    settings = PostprocessSettings(class_names=engines[0].class_names)
    hooks = []
    starts: list[float] = []
    for e in engines:
        def pre(_m, _i):
            timers.sync()
            starts.append(time.perf_counter())

        def post(_m, _i, _o):
            timers.sync()
            timers.seconds["forward"] = timers.seconds.get("forward", 0.0) + time.perf_counter() - starts.pop()

        hooks += [e.model.register_forward_pre_hook(pre), e.model.register_forward_hook(post)]
    real_paste, real_fuse = mp.paste_crops_batch, seg.fuse_instances
    mp.paste_crops_batch = timers.wrap("pasting", real_paste)
    seg.fuse_instances = timers.wrap("fusion", real_fuse)
    try:
        seg.run_to_completion(seg.segment_image(images[0], engines, tta="flips"))  # warm-up
        timers.seconds.clear()
        with timers.section("total"):
            for image in images:
                raw = seg.run_to_completion(seg.segment_image(image, engines, tta="flips"))
                with timers.section("post-processing"):
                    postprocess(raw, settings)
    finally:
        mp.paste_crops_batch, seg.fuse_instances = real_paste, real_fuse
        for h in hooks:
            h.remove()
    return len(images) / timers.seconds["total"]


def cli_run(engine, images, device: str, batch: int, workers: int) -> tuple[float, float, float]:
    """``napari-sartorius segment`` on a folder of the images (one checkpoint, no TTA), then on a folder of
    twice as many (the images repeated). Returns ``(images/s of the first run, steady-state images/s,
    fixed seconds)``: the steady state is the second run's extra images over its extra time, so what
    every run pays once (loading the checkpoint, starting the worker processes, CUDA warm-up, the merge)
    is left out of it and reported as the fixed seconds."""
    from skimage.io import imsave

    from napari_sartorius.cli import main as cli_main
    from napari_sartorius.models.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "model.pt", engine.model.cpu(), engine.config)
        engine.model.to(engine.device)
        seconds = []
        for copies in (1, 2):
            folder = Path(tmp) / f"images{copies}"
            folder.mkdir()
            for k, image in enumerate(images * copies):
                imsave(folder / f"img{k:04d}.png", image, check_contrast=False)
            argv = ["segment", str(folder), "--out", str(Path(tmp) / f"out{copies}"), "--model", str(ckpt),
                    "--device", device, "--batch", str(batch), "--workers", str(workers)]
            t0 = time.perf_counter()
            with open(Path(tmp) / "log.txt", "w") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
                code = cli_main(argv)
            seconds.append(time.perf_counter() - t0)
            if code != 0:
                raise RuntimeError(f"segment exited with {code}: {(Path(tmp) / 'log.txt').read_text()[-500:]}")
    n = len(images)
    extra = seconds[1] - seconds[0]
    steady = n / extra if extra > 0 else float("inf")
    return n / seconds[0], steady, max(seconds[0] - n / steady, 0.0)


def fusion_loops() -> str:
    """Whether fusion ran numba's compiled loops (a 3 x 4 run has over 2,000 candidates per class) or the
    Python ones (numba missing here)."""
    kernels = sys.modules.get("napari_sartorius.inference.fusion_kernels")
    if kernels is None:
        return "Python (numba not importable here, or too few candidates to load it)"
    return f"compiled (numba {kernels.numba.__version__})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, help="images per measurement (default 32 on a GPU, 2 on the CPU)")
    ap.add_argument("--test-size", type=int, help="shorter side inside the models (default 1024 GPU, 512 CPU)")
    ap.add_argument("--batch", type=int, help="images per pass without TTA (default 4 GPU, 1 CPU)")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--detections", type=int,
                    help="detections per image (default 1000 on a GPU; 100 on the CPU, where the mask head on "
                    "1000 boxes alone is ~450 GFLOP per image)")
    ap.add_argument("--workers", type=int,
                    help="--workers of the CLI run: decoding and as many post-processing processes (default 4 GPU, 0 CPU)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    n = args.images or (32 if gpu else 2)
    size = args.test_size or (1024 if gpu else 512)
    batch = args.batch or (4 if gpu else 1)
    detections = args.detections or (1000 if gpu else 100)
    workers = args.workers if args.workers is not None else (4 if gpu else 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timers = Timers(device)
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"R50-FPN, test size {size}, {n} synthetic SH-SY5Y images of 520 x 704 px, batch {batch}, "
          f"up to {detections} detections per image, on {where}", flush=True)
    images = make_images(n)
    rows: list[tuple[str, str]] = []

    # plain: the network as built; fast: FrozenBN folded, channels-last weights (what checkpoint engines run)
    for fast in (False, True):
        kind = "folded + channels-last" if fast else "plain"
        engine = make_engine(args.device, size, 0, amp=False, detections=detections, fast=fast)
        ips, det = images_per_second(engine, images, batch, timers)
        rows.append((f"1 model, no TTA, fp32, {kind}", f"{ips:.2f} images/s ({det:.0f} detections/image)"))
        print(*rows[-1], sep=": ", file=sys.stderr, flush=True)  # progress only: the table is on stdout
        if gpu:
            engine.amp = True
            ips, det = images_per_second(engine, images, batch, timers)
            rows.append((f"1 model, no TTA, fp16, {kind}",
                         f"{ips:.2f} images/s ({det:.0f} detections/image)  [target >= 25]"))
            print(*rows[-1], sep=": ", file=sys.stderr, flush=True)
            engine.amp = False
        else:
            rows.append((f"1 model, no TTA, fp16, {kind}", "n/a (fp16 autocast runs on CUDA only)"))

    engine.amp = gpu
    engines = [engine] + [make_engine(args.device, size, s, amp=gpu, detections=detections) for s in range(1, args.models)]
    ens_images = images[: max(1, n // 4)] if gpu else images[:1]
    ips = ensemble_run(engines, ens_images, timers)
    target = "  [target >= 2.5]" if gpu else ""
    rows.append((f"{args.models} models x 4 flips (+ fusion, post-processing)", f"{ips:.2f} images/s{target}"))
    shares = dict(timers.seconds)
    total = shares.pop("total")

    # the checkpoint needs the network as built (a folded model has no BatchNorm tensors to save)
    ips, steady, fixed = cli_run(make_engine(args.device, size, 0, amp=False, detections=detections, fast=False),
                                 images, args.device, batch, workers)
    rows.append((f"segment CLI on a folder of {n} PNGs (--workers {workers})",
                 f"{ips:.2f} images/s; steady state {steady:.2f} images/s (a folder of {2 * n} minus one of {n}), "
                 f"fixed cost {fixed:.1f} s per run"))

    parts = ["forward", "pasting", "fusion", "post-processing"]
    known = sum(shares.get(p, 0.0) for p in parts)
    share = ", ".join(f"{p} {100 * shares.get(p, 0.0) / total:.0f} %" for p in parts)
    rows.append((f"time shares of the {args.models} x 4 run", f"{share}, other {100 * (total - known) / total:.0f} %"))
    rows.append(("fusion's sequential loops", fusion_loops()))
    if gpu:
        rows.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"))
    else:
        rows.append(("peak resident memory", f"{peak_rss_mb() / 1024:.2f} GiB"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
